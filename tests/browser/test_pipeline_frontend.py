"""The pipeline template as a new user meets it in the real frontend: opened from the pack's template
route, it says what this ComfyUI lacks before any edit — the model files in the frontend's own
missing-models list (with their folders), the dataset folder and the trainer's base model on the nodes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tools import paths
from tools.browser import FrontendSession, frontend
from tools.comfy_server import PACK_DIR_NAME
from tools.workflow_api import widget_names
from tools.workflow_specs import CHECKPOINT_MODELS, CLIP_MODELS, PIPELINE, SAMPLE_FOLDER

MODELS = CHECKPOINT_MODELS + CLIP_MODELS
HINT = ".sd35-missing-hint"


def screenshot(ui: FrontendSession, folder: Path, name: str) -> Path:
    """Save a screenshot under the test's folder; with SD35_TUNER_SCREENSHOTS set, also copy it to out/screenshots/."""
    path = ui.screenshot(folder / name)
    if os.environ.get("SD35_TUNER_SCREENSHOTS"):
        keep = paths.REPO / "out" / "screenshots"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, keep / name)
    return path


def open_template(ui: FrontendSession, name: str) -> None:
    """What the Templates dialog does: fetch the pack's template from the server, load it as a template."""
    workflow = ui.page.evaluate(
        """async ([pack, name]) => {
            const url = window.comfyAPI.api.api.apiURL(`/workflow_templates/${pack}/${name}.json`);
            return await (await fetch(url)).json();
        }""",
        [PACK_DIR_NAME, name],
    )
    assert ui.load_workflow(workflow, name, missing_models=True) == []


def missing_model_report(ui: FrontendSession) -> str:
    """The frontend's own list of missing models: a dialog in frontend 1.32, the Errors panel in 1.49."""
    page = ui.page
    page.wait_for_function(
        """() => document.querySelector('.comfy-missing-models')
            || [...document.querySelectorAll('button')].some((b) => b.textContent.trim() === 'View details')""",
        timeout=30_000,
    )
    if page.locator(".comfy-missing-models").count():
        return page.locator(".comfy-missing-models").inner_text()
    page.get_by_role("button", name="View details").first.click()
    return page.evaluate(
        """() => {
            const heading = [...document.querySelectorAll('body *')]
                .find((e) => e.children.length === 0 && e.textContent.trim() === 'Missing Models');
            let box = heading;
            while (box && !box.innerText.includes('Download all')) box = box.parentElement;
            return box ? box.innerText : '';
        }"""
    )


def hints(ui: FrontendSession) -> dict[str, str]:
    return ui.page.evaluate(
        """(sel) => Object.fromEntries(window.app.graph.nodes
            .map((n) => [n.type, n.widgets?.find((w) => w.name === 'sd35_missing')?.sd35El])
            .filter(([, el]) => el && el.style.display !== 'none')
            .map(([type, el]) => [type, el.textContent]))""",
        HINT,
    )


@pytest.fixture
def photos_folder(comfy):
    folder = Path(comfy.base_dir) / "input" / "uxweb_my_photos"
    folder.mkdir(exist_ok=True)
    return folder.name


def test_the_pipeline_template_flags_what_is_missing_before_any_edit(comfy, photos_folder, tmp_path):
    placeholder = Path(comfy.base_dir) / "input" / SAMPLE_FOLDER
    assert not placeholder.exists(), f"another test on this shared server made {placeholder}: use a folder of its own"
    with frontend(comfy) as ui:
        open_template(ui, PIPELINE)
        toast = ui.page.locator(".p-toast-message").filter(has_text="does not have").inner_text()
        assert f"folder '{SAMPLE_FOLDER}'" in toast
        shown = hints(ui)  # the trainer takes the loader's MODEL: only the folder is ours to flag
        assert set(shown) == {"SD35TunerLoadDataset"}
        assert f"folder '{SAMPLE_FOLDER}'" in shown["SD35TunerLoadDataset"]
        assert "ComfyUI/input/" in shown["SD35TunerLoadDataset"]

        report = missing_model_report(ui)
        for model in MODELS:
            assert model["name"] in report and model["directory"] in report, report
        screenshot(ui, tmp_path, "pipeline_opened.png")
        ui.page.keyboard.press("Escape")

        # the user adds a folder under input/, presses R and picks it: the hint goes
        ui.page.keyboard.press("r")
        ui.page.wait_for_function(
            """(name) => window.app.graph.nodes.find((n) => n.type === 'SD35TunerLoadDataset')
                .widgets.find((w) => w.name === 'folder').options.values.includes(name)""",
            arg=photos_folder,
            timeout=30_000,
        )
        ui.page.evaluate(
            """(name) => {
                const node = window.app.graph.nodes.find((n) => n.type === 'SD35TunerLoadDataset');
                node.widgets.find((w) => w.name === 'folder').setValue(name, {node, canvas: window.app.canvas});
            }""",
            photos_folder,
        )
        assert hints(ui) == {}
        assert ui.unexpected_errors() == []


def set_widget(node: dict, name: str, value: object, info: dict) -> None:
    position = 0
    for widget, has_control in widget_names(info[node["type"]]):
        if widget == name:
            node["widgets_values"][position] = value
            return
        position += 2 if has_control else 1
    raise KeyError(name)


def test_a_graph_that_has_everything_shows_no_hint(comfy, photos_folder):
    info = comfy.object_info()
    workflow = json.loads((paths.WORKFLOWS / f"{PIPELINE}.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "SD35TunerLoadDataset":
            set_widget(node, "folder", photos_folder, info)
        if node["type"] == "CheckpointLoaderSimple":
            set_widget(node, "ckpt_name", paths.SD35_CHECKPOINT, info)
    with frontend(comfy) as ui:
        assert ui.load_workflow(workflow, PIPELINE) == []
        assert hints(ui) == {}
        assert ui.page.locator(".p-toast-message").filter(has_text="does not have").count() == 0
        assert ui.unexpected_errors() == []
