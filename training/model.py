"""Load an SD3 / SD3.5 transformer into diffusers' ``SD3Transformer2DModel`` and attach a LoRA.

Why this module exists: ComfyUI users keep single-file checkpoints (Stability's MMDiT keys, with or
without ``model.diffusion_model.``, or diffusers keys) in ``checkpoints/`` and ``diffusion_models/``.
diffusers' own single-file loader wants a hub config; instead the config is derived here from the
checkpoint's tensor shapes, so nothing is ever downloaded and every SD3 size (Medium, 3.5 Medium,
3.5 Large, tiny test models) loads through one path. Wrong families (SDXL, Flux, ...) are refused
with a message that names them.

LoRA targets are chosen by preset and block range and listed as full module names, so the adapter
covers exactly what was asked. A quantised base is quantised and frozen *before* the adapter is
added (the other order quantises the LoRA itself).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

STABILITY_PREFIX = "model.diffusion_model."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Module-name suffixes inside one diffusers JointTransformerBlock.
_X_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v")
_X_ATTN = (*_X_ATTN, "attn2.to_out.0")
_CTX_ATTN = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
_X_FF = ("ff.net.0.proj", "ff.net.2")
_CTX_FF = ("ff_context.net.0.proj", "ff_context.net.2")

PRESETS: dict[str, tuple[str, ...]] = {
    # SimpleTuner's default for SD3: the image stream's attention projections only.
    "attention": _X_ATTN,
    # Attention of both streams plus both feed-forwards (the adaLN modulation stays frozen).
    "attention_ff": (*_X_ATTN, *_CTX_ATTN, *_X_FF, *_CTX_FF),
    # Every linear layer inside the joint blocks, adaLN modulation included.
    "all_linear": (*_X_ATTN, *_CTX_ATTN, *_X_FF, *_CTX_FF, "norm1.linear", "norm1_context.linear"),
    "x_stream": (*_X_ATTN, *_X_FF, "norm1.linear"),
    "context_stream": (*_CTX_ATTN, *_CTX_FF, "norm1_context.linear"),
}


class ModelLoadError(ValueError):
    """A base model file that cannot be used: missing, wrong family or unreadable."""


# -- family detection ----------------------------------------------------------------------------


def detect_family(keys: Iterable[str]) -> str:
    """Name the model family a state dict's keys belong to: ``sd3`` or a refused family.

    Returns ``"sd3-stability"`` or ``"sd3-diffusers"`` for usable files; raises ModelLoadError
    naming the family otherwise.
    """
    keys = set(keys)

    def has(*candidates: str) -> bool:
        return any(k in keys or STABILITY_PREFIX + k in keys for k in candidates)

    if has("joint_blocks.0.context_block.adaLN_modulation.1.bias", "joint_blocks.0.x_block.attn.qkv.weight"):
        return "sd3-stability"
    if has("double_blocks.0.img_attn.qkv.weight") or "single_transformer_blocks.0.attn.to_q.weight" in keys:
        raise ModelLoadError("it is a Flux model; SD3.5 Tuner trains SD3 / SD3.5 transformers only")
    if "transformer_blocks.0.attn.add_q_proj.weight" in keys and "context_embedder.weight" in keys:
        return "sd3-diffusers"
    if has("input_blocks.0.0.weight") or any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelLoadError("it is an SD1.x/SDXL UNet checkpoint; SD3.5 Tuner trains SD3 / SD3.5 transformers only")
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys):
        raise ModelLoadError("it looks like a Flux model; SD3.5 Tuner trains SD3 / SD3.5 transformers only")
    sample = ", ".join(sorted(keys)[:3])
    raise ModelLoadError(f"no SD3 transformer keys found (first keys: {sample}); pick an SD3 / SD3.5 checkpoint")


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Derive the ``SD3Transformer2DModel`` config from diffusers-keyed weights' shapes."""
    proj = sd["pos_embed.proj.weight"]  # [hidden, in_channels, patch, patch]
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in sd
    head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0] if qk_norm else 64
    pos = sd.get("pos_embed.pos_embed")
    if pos is None:
        raise ModelLoadError("the checkpoint has no pos_embed tensor; it is not a complete SD3 transformer")
    return {
        "sample_size": 128,
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "out_channels": int(sd["proj_out.weight"].shape[0] // (patch * patch)),
        "num_layers": len(blocks),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
        "caption_projection_dim": int(sd["context_embedder.weight"].shape[0]),
        "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        "pos_embed_max_size": int(math.isqrt(pos.shape[1])),
        "dual_attention_layers": tuple(sorted(i for i in blocks if f"transformer_blocks.{i}.attn2.to_q.weight" in sd)),
        "qk_norm": "rms_norm" if qk_norm else None,
    }


# -- loading -------------------------------------------------------------------------------------


def _read_transformer_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read only the transformer's tensors of a single-file checkpoint, as diffusers keys."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise ModelLoadError(f"cannot read {path.name} as safetensors ({err})") from err
    with handle as f:
        keys = list(f.keys())
        family = detect_family(keys)
        if family == "sd3-diffusers":
            return {k: f.get_tensor(k) for k in keys}
        wanted = [k for k in keys if not k.startswith(("first_stage_model.", "text_encoders.", "cond_stage_model."))]
        state = {k.removeprefix(STABILITY_PREFIX): f.get_tensor(k) for k in wanted}
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(state))


def load_transformer(path: str | os.PathLike, dtype: str = "fp32"):
    """Load an SD3 / SD3.5 transformer from a single file or a diffusers folder, without any download.

    ``path``: a ``.safetensors`` checkpoint (Stability keys, optionally under ``model.diffusion_model.``,
    or diffusers keys), a diffusers model folder (``config.json`` + weights) or a pipeline folder with a
    ``transformer/`` subfolder. ``dtype``: ``fp32``, ``bf16`` or ``fp16`` for the frozen base.
    """
    from diffusers import SD3Transformer2DModel

    path = Path(path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not path.exists():
        raise ModelLoadError(f"base model {path} does not exist; put an SD3 / SD3.5 checkpoint there")
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder without config.json; give a diffusers SD3 transformer folder")
        config = json.loads((folder / "config.json").read_text())
        if config.get("_class_name") not in (None, "SD3Transformer2DModel"):
            raise ModelLoadError(
                f"{folder / 'config.json'} describes a {config['_class_name']}, not an SD3 transformer"
            )
        model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=DTYPES[dtype], local_files_only=True)
        return model.eval().requires_grad_(False)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path.name}: only .safetensors checkpoints are loaded (never pickle files)")
    state = {
        k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in _read_transformer_tensors(path).items()
    }
    config = config_from_state_dict(state)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path.name} does not match the SD3 layout derived from its shapes "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the file may be truncated or a merge"
        )
    return model.eval().requires_grad_(False)


# -- quantisation --------------------------------------------------------------------------------

QUANT = ("none", "int8", "int4", "fp8")


def quantize_base(transformer, quantization: str) -> None:
    """Quantise the frozen base with optimum-quanto, then freeze it. Call before adding the LoRA."""
    if quantization == "none":
        return
    if quantization not in QUANT:
        raise ValueError(f"quantization must be one of {QUANT}, got {quantization!r}")
    from optimum.quanto import freeze, qfloat8, qint4, qint8, quantize

    weights = {"int8": qint8, "int4": qint4, "fp8": qfloat8}[quantization]
    # The patch embedding, the embedders and the output projection are small and sensitive: keep them.
    exclude = ["pos_embed*", "time_text_embed*", "context_embedder", "norm_out*", "proj_out"]
    quantize(transformer, weights=weights, exclude=exclude)
    freeze(transformer)
    transformer.requires_grad_(False)


# -- LoRA targets --------------------------------------------------------------------------------


def parse_blocks(spec: str, num_layers: int, field: str = "blocks") -> list[int]:
    """Parse ``"12-24,30"`` into block indices. An empty spec means every block."""
    if not spec.strip():
        return list(range(num_layers))
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"{field}: cannot read {part!r}; write block indices like '12-24,30'")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if lo > hi or hi >= num_layers:
            raise ValueError(f"{field}: {part!r} is outside the model's blocks 0-{num_layers - 1}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def lora_target_modules(transformer, preset: str, blocks: str = "", exclude_blocks: str = "") -> list[str]:
    """Full names of the linear modules a preset selects inside the chosen blocks."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    n = transformer.config.num_layers
    chosen = set(parse_blocks(blocks, n, "blocks")) - (
        set(parse_blocks(exclude_blocks, n, "exclude_blocks")) if exclude_blocks.strip() else set()
    )
    suffixes = PRESETS[preset]
    names = []
    for name, module in transformer.named_modules():
        match = re.match(r"transformer_blocks\.(\d+)\.(.+)$", name)
        # isinstance also admits optimum-quanto's QLinear (a torch.nn.Linear subclass) on a quantised base
        if (
            match
            and int(match.group(1)) in chosen
            and match.group(2) in suffixes
            and isinstance(module, torch.nn.Linear)
        ):
            names.append(name)
    if not names:
        raise ValueError(f"preset {preset!r} with blocks {blocks or 'all'!r} selects no layer to train")
    return names


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


def add_lora(
    transformer, rank: int, alpha: float, targets: list[str], dropout: float = 0.0, seed: int = 0
) -> LoraSpec:
    """Attach a fresh peft LoRA adapter (``default``) to ``targets``; only its weights train, in fp32."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    transformer.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=list(targets)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    cast_training_params(transformer, torch.float32)
    return LoraSpec(rank=rank, alpha=float(alpha), dropout=dropout, targets=tuple(targets))


def lora_parameters(transformer) -> list[torch.nn.Parameter]:
    """The adapter's parameters: after ``add_lora`` they are the only ones that train."""
    if not getattr(transformer, "peft_config", None):
        raise ValueError("the transformer carries no LoRA; call model.add_lora first")
    return [p for p in transformer.parameters() if p.requires_grad]


def adapter_state(transformer) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's names (``<module>.lora_A.weight``), as checkpoints store them."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer)


def adapter_mismatch(want: dict[str, tuple[int, ...]], have: dict[str, tuple[int, ...]]) -> str | None:
    """Why tensors of shapes ``have`` cannot be the adapter with shapes ``want`` (None if they can)."""
    if want.keys() != have.keys():
        differ = sorted(want.keys() ^ have.keys())
        return f"it holds other LoRA targets ({len(differ)} names differ, e.g. {differ[0]})"
    for name, shape in want.items():
        if tuple(have[name]) != tuple(shape):
            return f"{name} has shape {tuple(have[name])} where this run's adapter has {tuple(shape)} (another rank)"
    return None


def load_adapter_state(transformer, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Set the adapter's weights in place from ``tensors`` (names as ``adapter_state`` gives them).

    The one way an adapter gets weights from outside: checkpoints, and a LoRA to start from. Refuses
    tensors for other targets or another rank, naming ``where``.
    """
    from peft.utils import set_peft_model_state_dict

    want = {k: tuple(v.shape) for k, v in adapter_state(transformer).items()}
    why = adapter_mismatch(want, {k: tuple(v.shape) for k, v in tensors.items()})
    if why:
        raise ValueError(f"{where} does not fit this run's LoRA: {why}; use the same preset, blocks and rank")
    set_peft_model_state_dict(transformer, tensors)


def count_trainable(transformer) -> int:
    return sum(p.numel() for p in transformer.parameters() if p.requires_grad)
