"""The exported LoRA, applied by ComfyUI's own LoraLoader in a real server, gives the trainer's output.

One deterministic sampling step through KSampler (euler, 1 step at denoise 0.5 → σ = 0.75 with the
SD3 shift, cfg 1, zeroed conditioning, seeded noise) is the transformer's x0 estimate, saved with
SaveLatent. The same step is computed here with diffusers: once on the base model (proves the
replica of ComfyUI's sampling arithmetic) and once with the peft LoRA (proves the file).
"""

from __future__ import annotations

import copy
import uuid

import pytest
import torch
from safetensors.torch import load_file

from tools import paths
from training.export import export_lora
from training.model import add_lora, load_transformer, lora_target_modules, quantize_base

SEED = 42
SIGMA = 0.75  # simple scheduler, 1 step at denoise 0.5, shift 3: sigmas [0.75, 0]
SCALE, SHIFT = 1.5305, 0.0609  # SD3 latent format


def _prompt(ckpt: str, lora: str, prefix: str) -> dict:
    sampler = dict(
        seed=SEED,
        steps=1,
        cfg=1.0,
        sampler_name="euler",
        scheduler="simple",
        positive=["5", 0],
        negative=["5", 0],
        latent_image=["6", 0],
        denoise=0.5,
    )
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": lora, "strength_model": 1.0},
        },
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo", "clip": ["3", 0]}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["4", 0]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["1", 0], **sampler}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **sampler}},
        "9": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["7", 0], "filename_prefix": f"latents/{prefix}_base"},
        },
        "10": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["8", 0], "filename_prefix": f"latents/{prefix}_lora"},
        },
    }


def _replica(model) -> torch.Tensor:
    """ComfyUI's one euler step from an empty SD3 latent, computed with a diffusers transformer."""
    noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(SEED))
    x = SIGMA * noise  # CONST.noise_scaling with an all-zero latent (not shifted in)
    with torch.no_grad():
        v = model(
            hidden_states=x,
            encoder_hidden_states=torch.zeros(1, 77, 4096),
            pooled_projections=torch.zeros(1, 2048),
            timestep=torch.tensor([SIGMA * 1000]),
        ).sample
    return (x - SIGMA * v) / SCALE + SHIFT  # euler to σ=0 lands on x0; process_latent_out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [
    pytest.param(paths.SD3_CHECKPOINT, "all_linear", "", 4, 12.0, "none", id="sd3-all_linear-alpha12-rank4"),
    pytest.param(paths.SD35_CHECKPOINT, "attention", "1", 8, 8.0, "none", id="sd35-attention-block1"),
    pytest.param(paths.SD35_CHECKPOINT, "attention_ff", "", 4, 2.0, "int8", id="sd35-attention_ff-int8-base"),
]


@pytest.mark.parametrize(("ckpt", "preset", "blocks", "rank", "alpha", "quant"), CASES)
def test_comfyui_lora_loader_matches_the_trainer(comfy, one_thread, ckpt, preset, blocks, rank, alpha, quant):
    base = load_transformer(paths.MODELS / "checkpoints" / ckpt)
    trained = copy.deepcopy(base)
    quantize_base(trained, quant)
    spec = add_lora(trained, rank, alpha, lora_target_modules(trained, preset, blocks=blocks))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    prefix = f"interop_{uuid.uuid4().hex[:8]}"
    lora_path = comfy.base_dir / "models" / "loras" / f"{prefix}.safetensors"
    export_lora(trained, spec, lora_path)

    entry = comfy.run(_prompt(ckpt, lora_path.name, prefix), timeout=300)
    got_base = load_file(str(comfy.output_files(entry, "9", "latents")[0]))["latent_tensor"]
    got_lora = load_file(str(comfy.output_files(entry, "10", "latents")[0]))["latent_tensor"]

    assert _rel(got_base, _replica(base)) <= 1e-4
    # diffusers' own LoRA loader on the float base, from the same file
    via_diffusers = copy.deepcopy(base)
    via_diffusers.load_lora_adapter(load_file(str(lora_path)), prefix="transformer", adapter_name="file")
    want = _replica(via_diffusers)
    assert _rel(got_lora, want) <= 1e-4
    assert _rel(got_base, want) > 1e-3  # the LoRA changes the step
    if quant == "none":
        assert _rel(got_lora, _replica(trained)) <= 1e-4
    else:  # the trainer's peft model runs on int8 weights: equal up to the quantisation error only
        assert _rel(got_lora, _replica(trained)) <= 5e-2
