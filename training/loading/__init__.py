"""Load an SD3 / SD3.5 transformer from any file a ComfyUI user has, or from a ComfyUI MODEL's weights.

``load_base`` is the one entry point: it recognises the layout (``formats``), reads tensors from a
memory-mapped safetensors file, a GGUF file or an in-memory state dict (``sources``), and builds the
diffusers ``SD3Transformer2DModel`` block by block, quantising as it goes (``build``), with a numeric
self-check against mis-scaled weights (``selfcheck``). Nothing is ever downloaded: the config comes
from the tensor shapes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .build import Progress, build
from .formats import STABILITY_PREFIX, detect_family, plan
from .quantize import QUANT, quantize_base
from .sources import ModelLoadError, SafetensorsFile, StateDictSource, TensorSource

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class InMemoryBase:
    """A base model already in memory (e.g. a ComfyUI MODEL's diffusion model): bare MMDiT keys, plus
    header-style metadata such as ``_quantization_metadata``. Loading it shares its tensors."""

    state: dict[str, torch.Tensor]
    name: str
    metadata: dict[str, str] = field(default_factory=dict)


def base_name(base) -> str:
    """What to call a base in logs and in the LoRA's metadata: its file name, or the in-memory name."""
    return base.name if isinstance(base, InMemoryBase) else Path(base).name


__all__ = [
    "DTYPES",
    "QUANT",
    "STABILITY_PREFIX",
    "InMemoryBase",
    "ModelLoadError",
    "base_name",
    "config_from_state_dict",
    "detect_family",
    "load_base",
    "load_from_state_dict",
    "load_transformer",
    "read_config",
    "quantize_base",
]


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config of diffusers-keyed weights, from their shapes."""
    if "pos_embed.pos_embed" not in shapes:
        raise ModelLoadError("the checkpoint has no pos_embed tensor; it is not a complete SD3 transformer")
    hidden, in_channels, patch = shapes["pos_embed.proj.weight"][:3]
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}
    qk_norm = "transformer_blocks.0.attn.norm_q.weight" in shapes
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0] if qk_norm else 64
    return {
        "sample_size": 128,
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "out_channels": int(shapes["proj_out.weight"][0] // (patch * patch)),
        "num_layers": len(blocks),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(shapes["context_embedder.weight"][1]),
        "caption_projection_dim": int(shapes["context_embedder.weight"][0]),
        "pooled_projection_dim": int(shapes["time_text_embed.text_embedder.linear_1.weight"][1]),
        "pos_embed_max_size": int(math.isqrt(shapes["pos_embed.pos_embed"][1])),
        "dual_attention_layers": tuple(
            sorted(i for i in blocks if f"transformer_blocks.{i}.attn2.to_q.weight" in shapes)
        ),
        "qk_norm": "rms_norm" if qk_norm else None,
    }


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Derive the ``SD3Transformer2DModel`` config from diffusers-keyed weights' shapes."""
    return config_from_shapes({k: tuple(v.shape) for k, v in sd.items()})


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _load_folder(path: Path, dtype: torch.dtype, quantization: str, device, blocks_device):
    from diffusers import SD3Transformer2DModel

    folder = path / "transformer" if (path / "transformer" / "config.json").exists() else path
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{path} is a folder without config.json; give a diffusers SD3 transformer folder")
    config = json.loads((folder / "config.json").read_text())
    if config.get("_class_name") not in (None, "SD3Transformer2DModel"):
        raise ModelLoadError(f"{folder / 'config.json'} describes a {config['_class_name']}, not an SD3 transformer")
    model = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
    model = model.to(blocks_device or device).eval().requires_grad_(False)  # offload: the caller moves the rest
    quantize_base(model, quantization)
    return model


def open_source(path: Path) -> TensorSource:
    if path.suffix == ".gguf":
        from .gguf import GGUFFile

        return GGUFFile(path)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path.name}: only .safetensors and .gguf checkpoints are loaded (never pickle files)")
    return SafetensorsFile(path)


def load_base(
    path: str | os.PathLike,
    dtype: str = "fp32",
    quantization: str = "none",
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    blocks_device: str | torch.device | None = None,
):
    """Load an SD3 / SD3.5 transformer, frozen, its blocks quantised as asked, without any download.

    ``path``: a single file (Stability keys, optionally under ``model.diffusion_model.``, with or without
    VAE / text encoders; diffusers keys; ComfyUI fp8 scaled or per-layer fp8; plain fp8; ComfyUI-GGUF
    ``.gguf``), a diffusers model folder or a pipeline folder with ``transformer/``. ``dtype``: ``fp32``,
    ``bf16`` or ``fp16`` for the frozen weights. ``quantization``: ``none``, ``int8``, ``int4``, ``fp8``.
    An ``InMemoryBase`` is built from its tensors, sharing those that need no conversion. With
    ``blocks_device`` (block offload: ``"cpu"``) each joint block goes there once built on ``device``.
    """
    if isinstance(path, InMemoryBase):
        src = StateDictSource(path.state, path.name, path.metadata)
        layout = plan(src, config_from_shapes)
        return build(src, layout, _check_dtype(dtype), quantization, device, progress, blocks_device)
    torch_dtype = _check_dtype(dtype)
    if quantization not in QUANT:
        raise ValueError(f"quantization must be one of {QUANT}, got {quantization!r}")
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"base model {path} does not exist; put an SD3 / SD3.5 checkpoint there")
    if path.is_dir():
        return _load_folder(path, torch_dtype, quantization, device, blocks_device)
    src = open_source(path)
    return build(src, plan(src, config_from_shapes), torch_dtype, quantization, device, progress, blocks_device)


def load_from_state_dict(
    state: dict[str, torch.Tensor],
    dtype: str = "fp32",
    quantization: str = "none",
    device: str | torch.device = "cpu",
    name: str = "the MODEL input",
    progress: Progress | None = None,
):
    """The same from weights already in memory (bare MMDiT keys, e.g. a ComfyUI MODEL's diffusion model):
    tensors that need no conversion are shared (fused qkv as views), not copied."""
    torch_dtype = _check_dtype(dtype)
    src = StateDictSource(state, name)
    return build(src, plan(src, config_from_shapes), torch_dtype, quantization, device, progress)


def read_config(base) -> dict[str, Any]:
    """The ``SD3Transformer2DModel`` config of a base (file, folder or ``InMemoryBase``) from its header
    or shapes alone: no weight is read, so a memory check can run before loading."""
    if isinstance(base, InMemoryBase):
        src = StateDictSource(base.state, base.name, base.metadata)
    else:
        path = Path(base)
        if path.is_dir():
            folder = path / "transformer" if (path / "transformer" / "config.json").exists() else path
            config = json.loads((folder / "config.json").read_text())
            return {k: v for k, v in config.items() if not k.startswith("_")}
        src = open_source(path)
    return plan(src, config_from_shapes).config


def load_transformer(path: str | os.PathLike, dtype: str = "fp32"):
    """Load the base unquantised (kept for callers that quantise separately)."""
    return load_base(path, dtype)
