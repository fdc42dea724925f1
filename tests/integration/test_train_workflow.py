"""The bundled training workflow runs end to end in a real ComfyUI on the built-in tiny models."""

from __future__ import annotations

import json

from safetensors import safe_open

from tools.builtin import point_at_builtin_models
from tools.sample_data import write_sample_folder
from tools.workflow_api import set_inputs, ui_to_api
from tools.workflow_specs import TRAIN, bundled

WORKFLOW = bundled(TRAIN)


def sample_photos(comfy, folder: str = "train_workflow_photos") -> str:
    """2 photos (one in a 2x repeats folder) under input/; tests that share the folder share its cache too."""
    photos = comfy.base_dir / "input" / folder
    if not photos.exists():
        write_sample_folder(photos)
        for photo in ("coffee.jpg", "rocket.jpg", "camera.png"):
            (photos / photo).unlink()
            (photos / photo).with_suffix(".txt").unlink(missing_ok=True)
    return folder


def ci_prompt(comfy, lora_name: str) -> dict:
    """The bundled workflow, shrunk for CPU: tiny models, 2 photos at 256 px, 2 training steps, 64 px sample."""
    folder = sample_photos(comfy)
    prompt = point_at_builtin_models(ui_to_api(json.loads(WORKFLOW.read_text()), comfy.object_info()), size=64)
    set_inputs(prompt, "SD35TunerLoadDataset", folder=folder)
    set_inputs(prompt, "SD35TunerSmartCrop", resolution=256)
    set_inputs(prompt, "SD35TunerCacheLatents", cache_name=f"sd35_cache/{folder}")
    set_inputs(prompt, "SD35TunerTrainSettings", base_dtype="fp32")
    set_inputs(
        prompt,
        "SD35TunerTrainLora",
        steps=2,
        quantization="none",
        lora_name=lora_name,
        validation_every=0,
        validation_steps=2,
    )
    set_inputs(prompt, "KSampler", steps=2)
    set_inputs(prompt, "SaveImage", filename_prefix=lora_name)
    return prompt


def test_train_workflow_runs_on_the_builtin_models(comfy):
    prompt = ci_prompt(comfy, "workflow_lora")
    entry = comfy.run(prompt, timeout=900)
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "SD35TunerTrainLora")
    assert entry["outputs"][train_id]["lora_name"] == ["workflow_lora.safetensors"]
    with safe_open(str(comfy.base_dir / "models" / "loras" / "workflow_lora.safetensors"), "pt") as f:
        assert f.metadata()["sd35_tuner.steps"] == "2"
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    assert comfy.output_files(entry, save_id)[0].is_file()
