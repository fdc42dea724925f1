"""The CFG-vs-APG viewer (web/js/apg_compare.js) in the real frontend: it appears on the comparison
node, shows both halves of a real run, and its slider and toggle change what is on screen."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tools.browser import frontend
from tools.builtin import point_at_builtin_models
from tools.workflow_api import set_inputs, ui_to_api
from tools.workflow_specs import CFG_VS_APG, bundled

WORKFLOW = bundled(CFG_VS_APG)
NODE = "SD35TunerCompareCFGAPG"
VIEWER = ".sd35-apg-compare"


@pytest.fixture(scope="module")
def ui(comfy):
    with frontend(comfy) as session:
        yield session


def state(ui) -> dict:
    return ui.page.evaluate(
        """(sel) => {
            const root = document.querySelector(sel);
            const apg = root.querySelector('.sd35-apg-apg');
            return {mode: root.dataset.mode, split: Number(root.dataset.split), loaded: root.dataset.loaded,
                    clip: apg.style.clipPath, cfgSrc: root.querySelector('.sd35-apg-cfg').src, apgSrc: apg.src,
                    caption: root.querySelector('.sd35-apg-caption').textContent};
        }""",
        VIEWER,
    )


def stage_pixels(ui, path: Path) -> np.ndarray:
    png = ui.page.locator(f"{VIEWER} .sd35-apg-frame").screenshot(path=str(path))
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_viewer_appears_shows_a_run_and_switches(ui, comfy, tmp_path):
    workflow = json.loads(WORKFLOW.read_text())
    assert ui.load_workflow(workflow, WORKFLOW.name) == []
    has_widget = ui.page.evaluate(
        "(type) => window.app.graph.nodes.find((n) => n.type === type).widgets.some((w) => w.name === 'apg_compare')",
        NODE,
    )
    assert has_widget
    assert ui.page.locator(VIEWER).count() == 1
    assert state(ui)["loaded"] == "0"
    # before any run: a placeholder says what will appear, no empty (broken) pictures
    assert ui.page.locator(f"{VIEWER} .sd35-apg-placeholder").is_visible()
    assert not ui.page.locator(f"{VIEWER} .sd35-apg-frame").is_visible()
    ui.screenshot(tmp_path / "apg_compare_before_run.png")

    # run the same graph (on the built-in models) for this page's client: the node's onExecuted fills the viewer
    prompt = point_at_builtin_models(ui_to_api(workflow, comfy.object_info()), size=64)
    set_inputs(prompt, NODE, steps=3)
    set_inputs(prompt, "SaveImage", filename_prefix="apg_browser_test")
    client_id = ui.page.evaluate("() => window.comfyAPI.api.api.clientId")
    prompt_id = comfy.post("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
    entry = comfy.wait(prompt_id)
    assert entry["status"]["status_str"] == "success"
    ui.page.wait_for_function(f"() => document.querySelector('{VIEWER}').dataset.loaded === '1'", timeout=180_000)

    assert not ui.page.locator(f"{VIEWER} .sd35-apg-placeholder").is_visible()
    halves = entry["outputs"][next(k for k, v in prompt.items() if v["class_type"] == NODE)]["sd35_apg_compare"][0]
    s = state(ui)
    assert halves["cfg"][0]["filename"] in s["cfgSrc"] and halves["apg"][0]["filename"] in s["apgSrc"]
    assert "saturation CFG" in s["caption"] and "APG/CFG" in s["caption"]
    assert s["mode"] == "split" and s["split"] == 50 and s["clip"] == "inset(0px 0px 0px 50%)"
    # the node on screen, as a user scrolls to it
    ui.page.evaluate(
        "(type) => window.app.canvas.centerOnNode(window.app.graph.nodes.find((n) => n.type === type))", NODE
    )
    ui.page.wait_for_timeout(300)
    ui.screenshot(tmp_path / "apg_compare_page.png")
    split = stage_pixels(ui, tmp_path / "split50.png")

    # drag the slider to a fifth of its width, as a user would
    box = ui.page.locator(".sd35-apg-slider").bounding_box()
    ui.page.mouse.click(box["x"] + 0.2 * box["width"], box["y"] + box["height"] / 2)
    s = state(ui)
    assert 15 <= s["split"] <= 25 and s["clip"] == f"inset(0px 0px 0px {s['split']}%)"
    moved = stage_pixels(ui, tmp_path / "split20.png")
    assert moved.shape == split.shape and abs(moved.shape[0] - moved.shape[1]) <= 2  # the frame keeps 1:1
    assert np.abs(moved - split).max() > 2

    toggle = ui.page.locator(".sd35-apg-toggle")
    toggle.click()
    assert state(ui)["mode"] == "cfg"
    cfg_only = stage_pixels(ui, tmp_path / "cfg.png")
    toggle.click()
    assert state(ui)["mode"] == "apg"
    apg_only = stage_pixels(ui, tmp_path / "apg.png")
    assert np.abs(cfg_only - apg_only).max() > 2  # the two halves are different pictures on screen
    toggle.click()
    assert state(ui)["mode"] == "split"
    assert ui.unexpected_errors() == []
