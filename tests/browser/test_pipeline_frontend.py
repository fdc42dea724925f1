"""The pipeline template as a new user meets it in the real frontend: opened from the pack's template
route, it says what this ComfyUI lacks before any edit — the model files in the frontend's own
missing-models list (with their folders), the dataset folder and the trainer's base model on the nodes.
Pointed at the built-in models and run from the page, it shows the cache report, the "validating…"
state, each labelled validation grid as it is made and the trainer's display name in the frontend's
progress; after Cancel the trainer says where the checkpoint is and how to resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.integration.test_train_workflow import sample_photos
from tools import paths
from tools.browser import FrontendSession, frontend, queue_from_frontend
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
        withdrawn = ui.page.evaluate_handle(  # the toasts the page takes back from now on
            """() => {
                const toast = window.app.extensionManager.toast, removed = [], remove = toast.remove.bind(toast);
                toast.remove = (message) => { removed.push(message.summary); return remove(message); };
                return removed;
            }"""
        )
        ui.page.evaluate(
            """(name) => {
                const node = window.app.graph.nodes.find((n) => n.type === 'SD35TunerLoadDataset');
                node.widgets.find((w) => w.name === 'folder').setValue(name, {node, canvas: window.app.canvas});
            }""",
            photos_folder,
        )
        assert hints(ui) == {}
        assert any("does not have" in summary for summary in withdrawn.json_value())  # its warning too
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


# What a user does to run the template on this machine's models: pick the built-in checkpoint, swap the
# three SD3.5 text encoders for one CLIP-L loader (tools/builtin.py says why), feed the cache and the
# validation samples a TAESD3 VAE (the checkpoint's full-size VAE costs minutes of CPU here), pick the
# photos, and shrink the run: 256 px, fp32 on CPU, a 1-step validation every 2 steps, a run long
# enough to be cancelled.
POINT_AT_BUILTIN = """([values, vae]) => {
    const graph = window.app.graph;
    const byType = (type) => graph.nodes.find((n) => n.type === type);
    const pick = (node, name, value) =>
        node.widgets.find((w) => w.name === name).setValue(value, {node, canvas: window.app.canvas});
    const replaceOutput = (old, slot, node) => {
        for (const id of [...(old.outputs[slot].links ?? [])]) {
            const link = graph.links.get?.(id) ?? graph.links[id];
            node.connect(0, graph.getNodeById(link.target_id), link.target_slot);
        }
    };
    const add = (type, near, widgets, below = 0) => {
        const node = window.LiteGraph.createNode(type);
        graph.add(node);
        node.pos = [near.pos[0], near.pos[1] + below];
        Object.entries(widgets).forEach(([name, value]) => pick(node, name, value));
        return node;
    };
    const triple = byType("TripleCLIPLoader");
    replaceOutput(triple, 0, add("CLIPLoader", triple, values.CLIPLoader));
    graph.remove(triple);
    const ckpt = byType("CheckpointLoaderSimple");
    replaceOutput(ckpt, 2, add("VAELoader", triple, {vae_name: vae}, 140));
    for (const [type, widgets] of Object.entries(values))
        if (type !== "CLIPLoader") Object.entries(widgets).forEach(([name, value]) => pick(byType(type), name, value));
}"""
# every state the trainer's view takes, with its status line then: "validating" lasts a few seconds
RECORD_STATES = """() => {
    const root = document.querySelector(".sd35-train-monitor");
    window.sd35States = [];
    new MutationObserver(() => window.sd35States.push([root.dataset.state,
        root.querySelector(".sd35-train-status").textContent])).observe(root, {attributeFilter: ["data-state"]});
}"""
MONITOR = """() => {
    const root = document.querySelector(".sd35-train-monitor");
    const picture = root.querySelector(".sd35-train-grid");
    return {...root.dataset, status: root.querySelector(".sd35-train-status").textContent,
            caption: root.querySelector(".sd35-train-grid-caption").textContent,
            steps: [...root.querySelectorAll(".sd35-train-grid-steps button")].map((b) => b.textContent),
            picture: [picture.src, picture.naturalWidth, picture.naturalHeight],
            message: root.querySelector(".sd35-train-message").textContent};
}"""
# the frontend's progress: "Current node: <name> <percent>" beside the Run button (1.32) / in the job queue (1.49)
CURRENT_NODE = """() => [...document.querySelectorAll("body *")]
    .filter((e) => e.children.length === 0 && e.textContent.trim() === "Current node:")
    .map((e) => e.parentElement.innerText.replace(/\\s+/g, " ").trim())"""


def show(ui: FrontendSession, node_type: str) -> None:
    """Zoom so the node fits the page's height and centre it, as a user would before looking."""
    ui.page.evaluate(
        """(type) => {
            const canvas = window.app.canvas;
            const node = window.app.graph.nodes.find((n) => n.type === type);
            canvas.ds.scale = Math.min(1, (canvas.canvas.clientHeight - 120) / (node.size[1] + 60));
            canvas.centerOnNode(node);
            canvas.setDirty(true, true);
        }""",
        node_type,
    )


def test_the_pipeline_runs_from_the_page_and_says_how_to_resume_after_cancel(comfy, tmp_path):
    photos = sample_photos(comfy, "pipeline_frontend_photos")
    name = "pipeline_frontend_lora"
    values = {
        "CheckpointLoaderSimple": {"ckpt_name": paths.SD3_CHECKPOINT},
        "CLIPLoader": {"clip_name": paths.CLIP_L, "type": "sd3"},
        "SD35TunerLoadDataset": {"folder": photos},
        "SD35TunerSmartCrop": {"resolution": 256},
        "SD35TunerTrainSettings": {"base_dtype": "fp32"},
        "SD35TunerTrainLora": {"quantization": "none", "lora_name": name, "steps": 1000}
        | {"validation_every": 2, "validation_steps": 1},
    }
    display_name = comfy.object_info()["SD35TunerTrainLora"]["display_name"]
    print(f"screenshots: {tmp_path}")
    try:
        with frontend(comfy) as ui:
            open_template(ui, PIPELINE)
            assert set(hints(ui)) == {"SD35TunerLoadDataset"}  # before any edit
            ui.page.keyboard.press("Escape")  # the missing-models list
            ui.page.evaluate(POINT_AT_BUILTIN, [values, paths.DEMO_VAE])
            assert hints(ui) == {}
            ui.page.evaluate(RECORD_STATES)
            assert queue_from_frontend(ui)["node_errors"] == {}

            cache_report = ui.page.locator(".sd35-report").filter(has_text="latents:")
            cache_report.wait_for(state="attached", timeout=600_000)
            assert "2 encoded" in cache_report.text_content() and "cache size" in cache_report.text_content()
            show(ui, "SD35TunerCacheLatents")
            screenshot(ui, tmp_path, "pipeline_cache_report.png")

            ui.page.wait_for_function(
                "() => Number(document.querySelector('.sd35-train-monitor').dataset.grids) >= 2", timeout=600_000
            )
            ui.page.wait_for_function(  # the latest grid, served by /view, loaded in the node
                "() => document.querySelector('.sd35-train-grid').naturalWidth > 0", timeout=60_000
            )
            monitor = ui.page.evaluate(MONITOR)
            assert monitor["state"] in ("training", "validating"), monitor  # the grids came while it trains
            assert monitor["steps"][:2] == ["step 2", "step 4"]
            assert "rows CFG" in monitor["caption"] and "/ APG" in monitor["caption"], monitor["caption"]
            src, width, height = monitor["picture"]
            assert "/view?" in src and width > 0 and height > 0, monitor["picture"]
            states = ui.page.evaluate("() => window.sd35States")
            assert any(state == "validating" and status.startswith("validating…") for state, status in states), states
            current = ui.page.evaluate(CURRENT_NODE)
            assert any(display_name in text for text in current), current  # its name, not SD35TunerTrainLora
            show(ui, "SD35TunerTrainLora")
            screenshot(ui, tmp_path, "pipeline_training.png")
            (tmp_path / "pipeline_validation_grid.png").write_bytes(ui.page.request.get(src).body())  # full size

            ui.page.get_by_role("button", name="Cancel current run").click()
            ui.page.wait_for_function(
                "() => document.querySelector('.sd35-train-monitor').dataset.state === 'cancelled'", timeout=300_000
            )
            message = ui.page.evaluate(MONITOR)["message"]
            checkpoint = next((Path(comfy.base_dir) / "output" / "sd35_tuner_runs" / name).glob("checkpoint-*"))
            assert f"Checkpoint: output/sd35_tuner_runs/{name}/{checkpoint.name}" in message, message
            assert f"tick 'resume' with lora_name '{name}'" in message, message
            screenshot(ui, tmp_path, "pipeline_cancelled.png")
            assert ui.unexpected_errors() == []
    finally:  # a failed check must not leave a 1000-step run to the tests after it
        if comfy.get("/queue")["queue_running"]:
            comfy.interrupt()
