"""Estimate a training run's memory before loading anything, warn when it will not fit, and pick
settings that fit a GPU (the "automatic VRAM tiers").

The estimate adds up: the frozen base by quantisation (int8 ~1 byte/parameter, int4 ~0.53, fp8 1,
bf16/fp16 2, fp32 4; the joint blocks only are quantised, the embedders stay in the base dtype), the
LoRA with its gradient and AdamW states (16 bytes per fp32 parameter), and the activations saved for
the backward pass, by resolution, batch and gradient checkpointing; block offload keeps only two
blocks of the base on the device. Figures come from the model config alone (a meta-device model:
no memory, no file read), so the check runs before the base is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0}
QUANT_BYTES = {"int8": 1.0 + 2 / 64, "int4": 0.5 + 4 / 128, "fp8": 1.0}  # + per-row / per-group scales
LORA_BYTES = 16  # fp32 weight + gradient + two AdamW moments
SAVED_PER_TOKEN = 20  # hidden-width tensors a joint block keeps for backward, per token and stream
CONTEXT_TOKENS = 77 + 256  # CLIP + T5 context of SD3
RESIDENT_BLOCKS = 2  # with block offload: the block computing and the one being fetched
# CUDA context + caching-allocator slack on a GPU; Python + torch + diffusers + quanto in RAM on a CPU
RUNTIME_BYTES = {"cuda": 1.5 * 1024**3, "cpu": 0.45 * 1024**3}
VAE_DECODE_PER_LATENT_PIXEL = 2178 * 64  # ComfyUI's own estimate for the SD3 VAE decode, per dtype byte


@dataclass
class Estimate:
    """Bytes by part; ``total`` is what the device must hold at the peak of a training step."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def text(self) -> str:
        items = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items())
        return f"~{self.total / GiB:.1f} GB ({items})"


def _param_counts(config: dict[str, Any], targets: tuple[str, ...]) -> tuple[int, int, int, int]:
    """(block linear params, other params, LoRA params per rank, blocks) of a config, on the meta device."""
    key = (tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items())), targets)
    if key not in _COUNTS:
        _COUNTS[key] = _count(config, targets)
    return _COUNTS[key]


_COUNTS: dict[tuple, tuple[int, int, int, int]] = {}


def _count(config: dict[str, Any], targets: tuple[str, ...]) -> tuple[int, int, int, int]:
    import re

    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    block_linear = other = lora_per_rank = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks."):
            block_linear += module.weight.numel()
            if re.sub(r"^transformer_blocks\.\d+\.", "", name) in targets:
                lora_per_rank += module.in_features + module.out_features
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    other = total - block_linear
    return block_linear, other, lora_per_rank, config["num_layers"]


def estimate(
    config: dict[str, Any],
    resolution: int = 1024,
    batch: int = 1,
    rank: int = 16,
    preset: str = "attention",
    quantization: str = "none",
    base_dtype: str = "bf16",
    gradient_checkpointing: bool = True,
    block_offload: bool = False,
    device: str = "cuda",
    validation: bool = False,
    shared_base: bool = False,
) -> Estimate:
    """Peak memory of one training step on ``device`` ("cuda" or "cpu": the runtime's share differs; the
    attention is fused on both, torch's CPU attention is flash-style too, so no heads x tokens^2 matrix is
    kept). With ``validation`` (a VAE and prompts connected), the decode of a validation image is the
    peak when it needs more than the step's activations (the base, the LoRA and its optimizer stay
    resident meanwhile). With ``shared_base`` the base is not counted: it is a MODEL the graph already
    holds on this device, and the trainer shares its weights. bench/bench_estimate.py measures a CPU step
    against it."""
    from .model import PRESETS

    block_linear, other, lora_per_rank, blocks = _param_counts(config, PRESETS[preset])
    per_param = QUANT_BYTES.get(quantization, WEIGHT_BYTES[base_dtype])
    blocks_weights = block_linear * per_param
    if block_offload:
        blocks_weights *= RESIDENT_BLOCKS / blocks
    act_bytes = WEIGHT_BYTES[base_dtype]
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    image_tokens = (resolution // (8 * config["patch_size"])) ** 2
    tokens = image_tokens + CONTEXT_TOKENS
    per_block = SAVED_PER_TOKEN * hidden * tokens * act_bytes * batch
    if gradient_checkpointing:  # block inputs kept; one block recomputed at a time
        activations = 2 * hidden * tokens * act_bytes * batch * blocks + per_block
    else:
        activations = per_block * blocks
    if shared_base:
        parts = {"base (the MODEL's, already here)": 0.0}
    else:
        parts = {"base blocks": blocks_weights, "base other": other * WEIGHT_BYTES[base_dtype]}
    parts |= {
        "LoRA+optimizer": lora_per_rank * rank * LORA_BYTES,
        "activations": activations,
        "runtime": RUNTIME_BYTES[device],
    }
    decode = VAE_DECODE_PER_LATENT_PIXEL * (resolution // 8) ** 2 * act_bytes
    if validation and decode > activations:
        del parts["activations"]
        parts["validation decode"] = decode
    return Estimate(parts)


def preflight(est: Estimate, available: float, where: str = "the GPU") -> tuple[str, str]:
    """("ok" | "warn" | "stop", message) for an estimate against the memory available on ``where``."""
    need, have = est.total / GiB, available / GiB
    if est.total <= 0.85 * available:
        return "ok", f"memory: needs {est.text()} of {have:.0f} GB on {where}"
    advice = (
        "to fit, in order: memory_preset auto (picks these for the GPU), or quantization int8 (then int4), "
        "gradient_checkpointing on, block_offload on, a lower resolution or batch size, a lower rank"
    )
    if est.total <= available:
        return "warn", f"memory: {need:.1f} GB of {have:.0f} GB on {where} is tight ({est.text()}); {advice}"
    return "stop", f"memory: this run needs {est.text()}, more than the {have:.0f} GB on {where}; {advice}"


# Candidates from best quality / speed to most frugal: the first that fits is chosen.
TIER_CANDIDATES: tuple[dict[str, Any], ...] = (
    dict(quantization="none", block_offload=False, rank=64, batch=2, gradient_checkpointing=False),
    dict(quantization="none", block_offload=False, rank=64, batch=1, gradient_checkpointing=True),
    dict(quantization="int8", block_offload=False, rank=64, batch=1, gradient_checkpointing=True),
    dict(quantization="int8", block_offload=False, rank=32, batch=1, gradient_checkpointing=True),
    dict(quantization="int4", block_offload=False, rank=32, batch=1, gradient_checkpointing=True),
    dict(quantization="int4", block_offload=False, rank=16, batch=1, gradient_checkpointing=True),
    dict(quantization="int8", block_offload=True, rank=16, batch=1, gradient_checkpointing=True),
    dict(quantization="int4", block_offload=True, rank=16, batch=1, gradient_checkpointing=True),
)


def vram_tier(
    config: dict[str, Any],
    vram: float,
    resolution: int = 1024,
    base_dtype: str = "bf16",
    validation: bool = True,
    rank: int | None = None,
    preset: str = "attention",
) -> tuple[dict, str]:
    """Settings for a GPU with ``vram`` bytes (8 / 12 / 16 / 24 / 48+ GB cards), and why they were chosen.
    ``rank``: keep this rank (a LoRA being continued) instead of the candidates'."""
    candidates = [{**c, "rank": rank} if rank else c for c in TIER_CANDIDATES]
    for choice in candidates:
        est = estimate(config, resolution, preset=preset, base_dtype=base_dtype, validation=validation, **choice)
        if est.total <= 0.85 * vram:
            why = (
                f"{vram / GiB:.0f} GB GPU: quantization {choice['quantization']}, block offload "
                f"{'on' if choice['block_offload'] else 'off'}, rank {choice['rank']}, batch {choice['batch']}, "
                f"gradient checkpointing {'on' if choice['gradient_checkpointing'] else 'off'} — the best setting "
                f"whose estimate, {est.text()}, leaves 15% headroom at {resolution} px"
            )
            return choice, why
    choice = candidates[-1]
    return choice, f"{vram / GiB:.0f} GB GPU: nothing fits at {resolution} px; the most frugal setting is used anyway"


def auto_settings(config: dict[str, Any], cfg, resolution: int, device, validation: bool, samples: int, rank=None):
    """``memory_preset`` "auto": ``cfg`` with the tier's quantisation, block offload, rank, batch and
    checkpointing for the detected GPU, and a line saying what was chosen and why. ``alpha`` follows the
    rank (the LoRA's strength scale alpha/rank stays as set); the batch never exceeds what ``samples``
    can fill. On a CPU the settings stay as set."""
    import torch

    if torch.device(device).type != "cuda":
        return cfg, f"memory_preset auto: no GPU ({torch.device(device).type}), the settings are used as set"
    vram, name = device_memory(device)
    choice, why = vram_tier(config, vram, resolution, cfg.base_dtype, validation, rank, cfg.preset)
    batch = max(1, min(choice["batch"], samples // cfg.grad_accum))
    new = cfg.replace(
        quantization=choice["quantization"],
        block_offload=choice["block_offload"],
        rank=choice["rank"],
        alpha=cfg.alpha * choice["rank"] / cfg.rank,
        batch_size=batch,
        gradient_checkpointing=choice["gradient_checkpointing"],
    )
    changed = [
        f"{k} {_shown(getattr(cfg, k))} -> {_shown(getattr(new, k))}"
        for k in _TIER_FIELDS
        if getattr(cfg, k) != getattr(new, k)
    ]
    what = f"; changed: {', '.join(changed)}" if changed else "; the settings already were these"
    return new, f"memory_preset auto on {name}, {why}{what}"


_TIER_FIELDS = ("quantization", "block_offload", "rank", "alpha", "batch_size", "gradient_checkpointing")


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def device_memory(device) -> tuple[float, str]:
    """(bytes available for training, a name) for a torch device: a GPU's total memory, or free RAM."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory), torch.cuda.get_device_name(device)
    try:
        import psutil

        return float(psutil.virtual_memory().available), "free RAM"
    except ImportError:
        return float("inf"), "RAM"


def shares_graph_weights(base, cfg, device) -> bool:
    """Whether the run trains over a ComfyUI MODEL's own weights where they already are: a MODEL input
    (``InMemoryBase``), a CPU run, and every joint-block weight already in the run's base dtype with no
    quantisation of its own. The trainer then shares those tensors (no copy), and the graph's RAM is the
    training device's memory."""
    import torch

    from .loading import DTYPES, InMemoryBase

    if not isinstance(base, InMemoryBase) or torch.device(device).type != "cpu":
        return False
    if base.metadata.get("_quantization_metadata"):
        return False
    weights = _block_weights(base)
    return bool(weights) and all(t.dtype == DTYPES[cfg.base_dtype] for t in weights)


def _block_weights(base) -> list:
    """The joint blocks' Linear weights of an in-memory base: what quantisation would copy."""
    return [t for k, t in base.state.items() if k.startswith("joint_blocks.") and t.ndim == 2]


def keep_graph_weights(base, cfg, device) -> tuple[Any, str | None]:
    """``cfg`` without quantisation when the run shares the graph's MODEL weights on the CPU (and a line
    saying so): a quantised copy would sit in RAM next to the weights it copies, about half the model
    more for int8, and quantised CPU steps are slower. Quantisation saves a GPU's memory."""
    if cfg.quantization == "none" or not shares_graph_weights(base, cfg, device):
        return cfg, None
    weights = sum(t.numel() for t in _block_weights(base))
    return cfg.replace(quantization="none"), (
        f"quantization {cfg.quantization} not applied: this run trains on the CPU over the MODEL input's own "
        f"{cfg.base_dtype} weights, already in RAM and shared, not copied; a quantised copy would add "
        f"~{weights * QUANT_BYTES[cfg.quantization] / GiB:.1f} GB next to them and train slower (quantisation "
        "saves a GPU's memory)"
    )


def check_run(
    config: dict[str, Any], cfg, resolution: int, device, validation: bool, shared_base: bool = False
) -> tuple[str, str]:
    """Before loading: estimate the run on ``device`` and raise MemoryError (saying what to change) when
    it cannot fit; returns ("ok" | "warn", the one-line verdict). ``shared_base``: the base is a MODEL the
    graph already holds there (``shares_graph_weights``), not counted against the memory still free."""
    import torch

    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    est = estimate(
        config,
        resolution,
        batch=cfg.batch_size,
        rank=cfg.rank,
        preset=cfg.preset,
        quantization=cfg.quantization,
        base_dtype=cfg.base_dtype,
        gradient_checkpointing=cfg.gradient_checkpointing,
        block_offload=cfg.block_offload,
        device=kind,
        validation=validation,
        shared_base=shared_base,
    )
    available, where = device_memory(device)
    level, message = preflight(est, available, where)
    if level == "stop":
        raise MemoryError(message)
    return level, message
