"""The bundled CFG-vs-APG workflow runs in a real ComfyUI on the built-in models."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from tools.builtin import point_at_builtin_models
from tools.workflow_api import FRONTEND_ONLY, set_inputs, ui_to_api
from tools.workflow_specs import CFG_VS_APG, bundled

WORKFLOW = bundled(CFG_VS_APG)


def test_workflow_names_sd35_files_and_only_known_nodes(comfy):
    workflow = json.loads(WORKFLOW.read_text())
    info = comfy.object_info()
    assert workflow["version"] == 0.4
    assert all(node["type"] in info for node in workflow["nodes"] if node["type"] not in FRONTEND_ONLY)
    widgets = {node["type"]: node["widgets_values"] for node in workflow["nodes"]}
    assert widgets["CheckpointLoaderSimple"] == ["sd3.5_large.safetensors"]
    assert widgets["TripleCLIPLoader"] == ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"]
    for kind in ("ModelSamplingSD3", "EmptySD3LatentImage", "SD35TunerCompareCFGAPG", "SaveImage"):
        assert kind in widgets


def test_workflow_runs_on_builtin_models_and_saves_the_labelled_grid(comfy):
    prompt = point_at_builtin_models(ui_to_api(json.loads(WORKFLOW.read_text()), comfy.object_info()), size=64)
    assert set_inputs(prompt, "SD35TunerCompareCFGAPG", steps=4) == 1
    set_inputs(prompt, "SaveImage", filename_prefix="apg_workflow_test")
    entry = comfy.run(prompt)
    save = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    compare = next(k for k, v in prompt.items() if v["class_type"] == "SD35TunerCompareCFGAPG")
    (path,) = comfy.output_files(entry, save)
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape[1] == 2 * 64 + 4 and grid.shape[0] > 64
    halves = grid[-64:, :64].astype(int), grid[-64:, 68:].astype(int)
    assert np.abs(halves[0] - halves[1]).max() > 2  # CFG and APG differ
    text = entry["outputs"][compare]["text"][0]
    assert "left: CFG w=7" in text and "right: APG w=7 eta=0 r=15 (scaled) beta=-0.5" in text
    assert "saturation CFG" in text and "APG/CFG" in text
