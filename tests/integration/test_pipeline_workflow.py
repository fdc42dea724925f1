"""The whole-pipeline workflow (the README's main job) runs end to end on the built-in models."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from safetensors import safe_open

from tests.integration.test_train_workflow import sample_photos
from tools.builtin import point_at_builtin_models
from tools.workflow_api import set_inputs, ui_to_api
from tools.workflow_specs import PIPELINE, bundled

WORKFLOW = bundled(PIPELINE)


def test_folder_to_lora_to_cfg_vs_apg(comfy):
    folder = sample_photos(comfy)  # the training workflow test's 2 photos; its cache is reused too
    prompt = point_at_builtin_models(ui_to_api(json.loads(WORKFLOW.read_text()), comfy.object_info()), size=64)
    set_inputs(prompt, "SD35TunerLoadDataset", folder=folder)
    set_inputs(prompt, "SD35TunerSmartCrop", resolution=256)
    set_inputs(prompt, "SD35TunerCacheLatents", cache_name=f"sd35_cache/{folder}")
    set_inputs(prompt, "SD35TunerTrainSettings", base_dtype="fp32")
    set_inputs(
        prompt, "SD35TunerTrainLora", steps=3, quantization="none", lora_name="pipeline_lora", validation_every=0
    )
    set_inputs(prompt, "SD35TunerCompareCFGAPG", steps=2)
    entry = comfy.run(prompt, timeout=900)
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "SD35TunerTrainLora")
    assert entry["outputs"][train_id]["lora_name"] == ["pipeline_lora.safetensors"], entry["outputs"][train_id].get(
        "lora_name"
    )

    with safe_open(str(comfy.base_dir / "models" / "loras" / "pipeline_lora.safetensors"), "pt") as lora:
        assert lora.metadata()["sd35_tuner.steps"] == "3"
        assert any(key.startswith("transformer.") and key.endswith("lora_B.weight") for key in lora.keys())
    saved = {
        prompt[node]["inputs"]["filename_prefix"]: comfy.output_files(entry, node)
        for node in prompt
        if prompt[node]["class_type"] == "SaveImage"
    }
    [comparison] = saved["sd35_tuner_cfg_vs_apg"]
    [chart] = saved["sd35_tuner_loss_chart"]
    width, height = Image.open(comparison).size
    assert width >= 2 * 64 and height >= 64, "CFG and APG side by side"
    assert np.asarray(Image.open(chart)).std() > 0
