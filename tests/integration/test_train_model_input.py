"""Training on the graph's MODEL: the same LoRA as from the file, on ComfyUI's own tensors (shared)."""

from __future__ import annotations

import re
import uuid

import pytest
from safetensors.torch import load_file

from tests.integration.test_train_lora_model import _latent, _sample
from tests.integration.test_train_node import _prompt, base_prompt  # noqa: F401  (fixture)
from tools import paths
from tools.comfy_server import ComfyError


def test_model_input_trains_the_same_lora_as_the_file_on_shared_tensors(comfy, base_prompt):  # noqa: F811
    loras = comfy.base_dir / "models" / "loras"
    from_file = f"from_file_{uuid.uuid4().hex[:6]}"
    comfy.run(_prompt(base_prompt, from_file), timeout=600)
    log_before = comfy.log()

    from_model = f"from_model_{uuid.uuid4().hex[:6]}"
    prompt = _prompt(base_prompt, from_model, base_model="(use the MODEL input)", model=["6", 0])
    prompt["6"]["inputs"]["ckpt_name"] = paths.SD3_CHECKPOINT
    comfy.run(prompt, timeout=600)

    a = load_file(str(loras / f"{from_file}.safetensors"))
    b = load_file(str(loras / f"{from_model}.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6 * max(1.0, float(a[key].abs().max())), key

    # the loader reports, from inside the server, how many of its tensors are ComfyUI's own (data_ptr equal)
    line = next(x for x in comfy.log()[len(log_before) :].splitlines() if "weight tensors shared with it" in x)
    shared, total = map(int, re.search(r"(\d+) of (\d+) weight tensors shared", line).groups())
    # all but the two adaLN modulations that MMDiT stores as shift|scale (reordered: weight + bias, copied)
    assert total > 40 and total - shared == 4, line
    # reading the MODEL's config leaves no "you accessed ... which doesn't exist" warning (ComfyUI 0.33)
    assert "you accessed" not in comfy.log()[len(log_before) :]


def test_the_trained_model_output_computes_with_the_lora_and_leaves_the_base_as_it_was(comfy, base_prompt):  # noqa: F811
    """The trainer's MODEL output (the LoRA applied as ComfyUI weight wrappers, no patched copies) samples as
    LoraLoaderModelOnly at strength 1 with the written file does (which patches the weights), and the
    base MODEL samples the same before and after it (the wrappers stay with the output's clone)."""
    tag = uuid.uuid4().hex[:6]
    before = {"6": base_prompt["6"], "4": base_prompt["4"]}
    _sample(before, "40", ["6", 0], f"model_out/{tag}_base_before")
    base_before = _latent(comfy, comfy.run(before, timeout=300), "40")

    prompt = _prompt(base_prompt, f"model_out_{tag}", base_model="(use the MODEL input)", model=["6", 0])
    _sample(prompt, "41", ["8", 1], f"model_out/{tag}_output")
    entry = comfy.run(prompt, timeout=600)
    output = _latent(comfy, entry, "41")

    check = {"6": base_prompt["6"], "4": base_prompt["4"]}
    check["30"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["6", 0], "lora_name": entry["outputs"]["8"]["lora_name"][0], "strength_model": 1.0},
    }
    _sample(check, "42", ["30", 0], f"model_out/{tag}_loader")
    _sample(check, "43", ["6", 0], f"model_out/{tag}_base_after")
    again = comfy.run(check, timeout=300)
    loader, base_after = _latent(comfy, again, "42"), _latent(comfy, again, "43")

    difference = float((output - loader).abs().max())
    effect = float((output - base_before).abs().max())
    print(f"trainer MODEL output vs LoraLoader: max |diff| {difference:.2e}; LoRA's effect {effect:.2e}")
    assert difference <= 1e-4 * max(1.0, float(loader.abs().max()))
    assert effect > 100 * max(difference, 1e-6)
    assert float((base_after - base_before).abs().max()) <= 1e-6


def test_model_choice_without_a_model_is_refused(comfy, base_prompt):  # noqa: F811
    with pytest.raises(ComfyError, match="nothing is connected to 'model'"):
        comfy.run(_prompt(base_prompt, "no_model", base_model="(use the MODEL input)"), timeout=300)
