"""dataset_prep.json in the real frontend: it loads with its widget values where they belong and
queues from the page (the frontend's own UI -> API conversion) into a finished dataset."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from dataset.manifest import Dataset
from tools.browser import frontend, queue_from_frontend
from tools.comfy_server import execution_error
from tools.sample_data import SAMPLES, write_sample_folder
from tools.workflow_specs import DATASET_PREP, SAMPLE_FOLDER, bundled

WORKFLOW = bundled(DATASET_PREP)


PHOTOS = "dataset_frontend_photos"  # the user's own folder; the template's placeholder stays absent


@pytest.fixture(scope="module")
def ui(comfy):
    folder = Path(comfy.base_dir) / "input" / PHOTOS
    if not folder.exists():
        write_sample_folder(folder)
    with frontend(comfy) as session:
        yield session


def widgets(ui, node_type: str) -> dict:
    return ui.page.evaluate(
        """(type) => {
            const node = window.app.graph.nodes.find((n) => n.type === type);
            return Object.fromEntries(node.widgets.map((w) => [w.name, w.value]));
        }""",
        node_type,
    )


def test_dataset_prep_loads_and_runs_from_the_frontend(ui, comfy, tmp_path) -> None:
    assert ui.load_workflow(json.loads(WORKFLOW.read_text()), WORKFLOW.name) == []
    load = widgets(ui, "SD35TunerLoadDataset")
    assert load["folder"] == SAMPLE_FOLDER and load["recursive"] is True and load["background"] == "white"
    crop = widgets(ui, "SD35TunerSmartCrop")
    assert crop["mode"] == "face_then_saliency" and crop["resolution"] == 512 and crop["max_upscale"] == 2.0
    caption = widgets(ui, "SD35TunerCaption")
    assert caption["captioner"].startswith("none") and caption["trigger"] == "sd35sample"

    target = f"frontend_{uuid.uuid4().hex[:8]}"
    ui.page.evaluate(  # as a user does: pick the picture folder, name the output folder
        """([photos, target]) => {
            const pick = (type, name, value) => {
                const node = window.app.graph.nodes.find((n) => n.type === type);
                node.widgets.find((w) => w.name === name).setValue(value, {node, canvas: window.app.canvas});
            };
            pick("SD35TunerLoadDataset", "folder", photos);
            pick("SD35TunerSaveDataset", "folder", target);
        }""",
        [PHOTOS, target],
    )
    answer = queue_from_frontend(ui)
    entry = comfy.wait(answer["prompt_id"], timeout=300)
    assert execution_error(entry) is None
    saved = Dataset.read_jsonl(Path(comfy.base_dir) / "output" / target / "dataset.jsonl")
    assert len(saved) == len(SAMPLES)
    assert all(item.caption.startswith("sd35sample, ") for item in saved.items)
    ui.page.wait_for_function(  # the preview node shows its tiles on the canvas
        """() => (window.app.graph.nodes.find((n) => n.type === "SD35TunerPreviewDataset").imgs || []).length > 0""",
        timeout=30_000,
    )
    reports = ui.page.evaluate(
        """() => Object.fromEntries(window.app.graph.nodes
            .filter((n) => n.sd35Report?.root.dataset.ran === "1")
            .map((n) => [n.type, n.sd35Report.root.textContent]))"""
    )
    assert reports["SD35TunerLoadDataset"].startswith(f"{len(SAMPLES)} image(s) from ")
    assert reports["SD35TunerSmartCrop"].startswith(f"{len(SAMPLES)} of {len(SAMPLES)} image(s) cropped (face: 1")
    assert reports["SD35TunerSaveDataset"].startswith(f"{len(SAMPLES)} image(s) saved to ")
    ui.screenshot(tmp_path / "dataset_prep.png")
    assert ui.unexpected_errors() == []
