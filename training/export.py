"""Write the trained LoRA as a ``.safetensors`` file that ComfyUI and diffusers both load exactly.

Keys are diffusers' SD3 LoRA format, ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``
(ComfyUI silently drops raw peft keys without the ``transformer.`` prefix). ComfyUI's LoraLoader
ignores an alpha stored in the header, so ``alpha / rank`` is folded into ``lora_B``: the file is
then correct for any loader that assumes alpha = rank (ComfyUI, diffusers' ``load_lora_weights``).
The header carries our keys, ModelSpec and kohya's ``ss_*`` keys (``metadata.header``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import fs
from .metadata import PACK_VERSION, header
from .model import DTYPES, LoraSpec

__all__ = ["PACK_VERSION", "export_lora", "header", "lora_state_dict", "output_path"]


def lora_state_dict(transformer, spec: LoraSpec, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The adapter as diffusers SD3 LoRA keys with ``alpha / rank`` folded into every ``lora_B``."""
    from peft.utils import get_peft_model_state_dict

    scale = spec.alpha / spec.rank
    out: dict[str, torch.Tensor] = {}
    for key, tensor in get_peft_model_state_dict(transformer).items():
        tensor = tensor.detach().float()
        if ".lora_B." in key:
            tensor = tensor * scale
        out[f"transformer.{key}"] = tensor.to(DTYPES[dtype]).contiguous()
    return out


def export_lora(
    transformer, spec: LoraSpec, path: str | os.PathLike, info: Mapping[str, Any] | None = None, dtype: str = "fp32"
) -> Path:
    """Write the LoRA file atomically (fsynced, then renamed into place) and return its path."""
    return fs.atomic_save_safetensors(path, lora_state_dict(transformer, spec, dtype), header(spec, info or {}))


def output_path(folder: str | os.PathLike, name: str, field: str = "lora_name") -> Path:
    """``folder/<name>.safetensors`` confined to ``folder``; an existing file gets a ``_2``, ``_3``... version.

    Refused (ValueError naming ``field``): empty names, absolute paths, ``..``, characters Windows forbids,
    and any part starting with a dot (``.``, ``.hidden``: files ComfyUI's LoRA list never shows).
    """
    stem = name.strip().removesuffix(".safetensors")
    parts = stem.replace("\\", "/").split("/")
    bad = not stem or any(not p or p.startswith(".") for p in parts) or any(c in stem for c in ':*?"<>|\0')
    if bad:
        raise ValueError(
            f"{field} {name!r} is not a plain file name; use something like 'my_style' or 'people/my_style' "
            "(no '..', no absolute path, no part starting with '.')"
        )
    return fs.next_free(fs.resolve_inside(folder, f"{stem}.safetensors", field), ".safetensors")
