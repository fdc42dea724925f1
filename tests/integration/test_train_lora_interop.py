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


# -- every file layout: ComfyUI's own loader reads the same weights, and our LoRA applies to it ------


def _format_file(kind: str, folder) -> str:
    """Write the built-in SD3.5 tiny transformer in layout ``kind`` into a ComfyUI model folder."""
    from safetensors.torch import save_file

    from tools import model_formats as fmt

    full = load_file(str(paths.MODELS / "checkpoints" / paths.SD35_CHECKPOINT))
    mm = {k.removeprefix(fmt.PREFIX): v for k, v in full.items() if k.startswith(fmt.PREFIX)}
    meta = None
    if kind == "bare":
        tensors = fmt.stability(mm, prefix="")
    elif kind == "all_in_one":
        clip_l = load_file(str(paths.MODELS / "text_encoders" / paths.CLIP_L))
        vae = {k.removeprefix("first_stage_model."): v for k, v in full.items() if k.startswith("first_stage_model.")}
        tensors = fmt.stability(mm, first_stage_model=vae, **{"text_encoders.clip_l.transformer": clip_l})
    elif kind == "fp8_scaled":
        tensors = fmt.fp8_scaled(mm, prefix="")
    elif kind == "fp8_header":
        tensors, meta = fmt.fp8_layerwise(mm, prefix="", header=True, input_scale=False)
    elif kind == "fp8_plain":
        tensors = fmt.fp8_plain(mm, prefix="")
    elif kind == "gguf_dequantised":  # the weights our GGUF loader reads, as a file ComfyUI core can load
        path = fmt.write_gguf(mm, folder / f"{kind}.gguf", "Q8_0")
        tensors = fmt.stability(fmt.gguf_reference_weights(path), prefix="")
    else:
        raise ValueError(kind)
    name = f"fmt_{kind}_{uuid.uuid4().hex[:6]}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name), metadata=meta)
    return name


def _one_training_step(model) -> None:
    """One real optimizer step on the LoRA (flow-matching loss on a random batch)."""
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    pred = model(
        hidden_states=0.5 * x0 + 0.5 * noise,
        encoder_hidden_states=torch.randn(1, 8, 4096, generator=g),
        pooled_projections=torch.randn(1, 2048, generator=g),
        timestep=torch.tensor([500.0]),
    ).sample
    (pred - (noise - x0)).square().mean().backward()
    opt.step()


FORMATS = ["bare", "all_in_one", "fp8_scaled", "fp8_header", "fp8_plain", "gguf_dequantised"]


@pytest.mark.parametrize("kind", FORMATS)
def test_each_layout_loads_as_comfyui_reads_it_and_the_lora_applies(comfy, one_thread, kind):
    from training.loading import load_base

    folder = comfy.base_dir / "models" / ("checkpoints" if kind == "all_in_one" else "diffusion_models")
    name = _format_file(kind, folder)
    base = load_base(folder / name)
    trained = copy.deepcopy(base)
    spec = add_lora(trained, 4, 4.0, lora_target_modules(trained, "attention_ff"))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    with torch.enable_grad():
        _one_training_step(trained)
    prefix = f"fmt_{kind}_{uuid.uuid4().hex[:6]}"
    lora_path = comfy.base_dir / "models" / "loras" / f"{prefix}.safetensors"
    export_lora(trained, spec, lora_path)

    prompt = _prompt(name, lora_path.name, prefix)
    if kind != "all_in_one":
        prompt["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    entry = comfy.run(prompt, timeout=300)
    got_base = load_file(str(comfy.output_files(entry, "9", "latents")[0]))["latent_tensor"]
    got_lora = load_file(str(comfy.output_files(entry, "10", "latents")[0]))["latent_tensor"]

    # ComfyUI's loader and ours read the same weights. (ComfyUI 0.3.75 also stores the *biases* of a
    # scaled-fp8 file's Linear layers in fp8, unscaled; 0.33 keeps them in full precision, as we do.)
    fp8_biases = kind == "fp8_scaled" and comfy.version < (0, 4)
    assert _rel(got_base, _replica(_fp8_biases(base) if fp8_biases else base)) <= 1e-4
    want = _replica(trained)
    assert _rel(got_base, want) > 1e-3
    if kind in ("fp8_scaled", "fp8_header"):
        # ComfyUI 0.3.75 writes the LoRA-patched weight back into fp8 (stochastic rounding), which cannot
        # hold a small LoRA delta to 1e-4: the LoRA must still move ComfyUI's output most of the way to ours.
        assert _rel(got_lora, want) <= 0.5 * _rel(got_base, want)
    else:
        assert _rel(got_lora, want) <= 1e-4


def _fp8_biases(model):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(module.bias.to(torch.float8_e4m3fn).float())
    return out


def test_gguf_files_are_offered_as_the_trainers_base_model(comfy):
    folder = comfy.base_dir / "models" / "diffusion_models"
    _format_file("gguf_dequantised", folder)  # writes gguf_dequantised.gguf next to its safetensors reading
    spec = comfy.object_info()["SD35TunerTrainLora"]["input"]["required"]["base_model"]
    options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
    assert "gguf_dequantised.gguf" in options
