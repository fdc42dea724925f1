"""The trainer speaks core's LORA_MODEL: its output goes into core's Load LoRA Model and Save LoRA nodes, and a
LORA_MODEL or an existing LoRA file starts a run (as core's existing_lora)."""

from __future__ import annotations

import copy
import uuid

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_train_node import _node, base_prompt  # noqa: F401  (base_prompt is a fixture)

TRAINER, LORA_OUT = "8", 5  # the trainer's node id in base_prompt, and its LORA_MODEL output
STRENGTH = 8.0  # a 3-step LoRA moves the tiny model little: applied strongly, its effect is far above the tolerance


def _sample(prompt: dict, node: str, model: list, prefix: str) -> None:
    """Two Euler steps from fixed noise on ``model``; the latent saved (its values show the MODEL's weights)."""
    prompt[f"{node}_enc"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 0]}}
    prompt[f"{node}_latent"] = {
        "class_type": "EmptySD3LatentImage",
        "inputs": {"width": 64, "height": 64, "batch_size": 1},
    }
    prompt[f"{node}_ks"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "seed": 5,
            "steps": 2,
            "cfg": 1.0,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": [f"{node}_enc", 0],
            "negative": [f"{node}_enc", 0],  # unused at cfg 1
            "latent_image": [f"{node}_latent", 0],
            "denoise": 1.0,
        },
    }
    prompt[node] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{node}_ks", 0], "filename_prefix": prefix}}


def _latent(comfy, entry: dict, node: str) -> torch.Tensor:
    (path,) = comfy.output_files(entry, node, kind="latents")
    return load_file(str(path))["latent_tensor"]


def _train(base: dict, name: str, **values) -> dict:
    prompt = copy.deepcopy(base)
    prompt[TRAINER]["inputs"].update({"lora_name": name, "steps": 3, **values})
    return prompt


@pytest.fixture(scope="module")
def trained(comfy, base_prompt) -> dict:  # noqa: F811
    """One run whose LORA_MODEL feeds core's Load LoRA Model (sampled) and core's Save LoRA."""
    info = comfy.object_info()
    tag = uuid.uuid4().hex[:6]
    prompt = _train(base_prompt, f"lora_model_{tag}")
    prompt["20"] = _node(info, "LoraModelLoader", model=["6", 0], lora=[TRAINER, LORA_OUT], strength_model=STRENGTH)
    _sample(prompt, "21", ["20", 0], f"lora_model/{tag}_core")
    prompt["22"] = _node(info, "SaveLoRA", lora=[TRAINER, LORA_OUT], prefix=f"lora_model/{tag}_saved")
    entry = comfy.run(prompt, timeout=900)
    name = entry["outputs"][TRAINER]["lora_name"][0]
    check = {}
    check["30"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["6", 0], "lora_name": name, "strength_model": STRENGTH},
    }
    check["6"], check["4"] = prompt["6"], prompt["4"]
    _sample(check, "31", ["30", 0], f"lora_model/{tag}_file")
    _sample(check, "32", ["6", 0], f"lora_model/{tag}_base")
    again = comfy.run(check, timeout=900)
    (saved,) = (comfy.base_dir / "output" / "lora_model").glob(f"{tag}_saved*.safetensors")
    return {
        "name": name,
        "file": load_file(str(comfy.base_dir / "models" / "loras" / name)),
        "saved": load_file(str(saved)),
        "core": _latent(comfy, entry, "21"),
        "loader": _latent(comfy, again, "31"),
        "base": _latent(comfy, again, "32"),
    }


def test_core_load_lora_model_gives_the_model_lora_loader_gives_from_the_file(trained):
    assert (trained["core"] - trained["loader"]).abs().max() <= 1e-4
    assert (trained["core"] - trained["base"]).abs().max() > 1e-2  # the LoRA does change the MODEL
    print(
        f"core LoraModelLoader vs LoraLoader: max |diff| {float((trained['core'] - trained['loader']).abs().max()):.2e}"
    )


def test_core_save_lora_writes_the_adapter_as_the_trainer_did(trained):
    assert trained["saved"].keys() == trained["file"].keys()
    assert all(torch.equal(trained["saved"][k], trained["file"][k]) for k in trained["file"])


@pytest.mark.parametrize("how", ["existing_lora", "lora"])
def test_a_run_starts_from_an_existing_lora(comfy, base_prompt, trained, how):  # noqa: F811
    tag = uuid.uuid4().hex[:6]
    if how == "existing_lora":
        prompt = _train(base_prompt, f"continued_{tag}", existing_lora=trained["name"], steps=1, learning_rate=1e-7)
        start = trained["file"]
    else:  # a second trainer continues the first one's LORA_MODEL in the same graph
        prompt = _train(base_prompt, f"first_{tag}")
        prompt["9"] = copy.deepcopy(prompt[TRAINER])
        prompt["9"]["inputs"].update(
            {"lora_name": f"continued_{tag}", "lora": [TRAINER, LORA_OUT], "steps": 1, "learning_rate": 1e-7}
        )
    entry = comfy.run(prompt, timeout=900)
    node = TRAINER if how == "existing_lora" else "9"
    continued = load_file(str(comfy.base_dir / "models" / "loras" / entry["outputs"][node]["lora_name"][0]))
    if how == "lora":
        start = load_file(str(comfy.base_dir / "models" / "loras" / entry["outputs"][TRAINER]["lora_name"][0]))
    assert continued.keys() == start.keys()
    b = next(k for k in start if k.endswith("lora_B.weight"))
    assert (continued[b].float() - start[b].float()).abs().max() <= 1e-3 * start[b].float().abs().max()
    assert start[b].abs().max() > 0  # a trained LoRA (lora_B starts at zero in a fresh one)
