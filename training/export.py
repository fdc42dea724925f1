"""Write the trained LoRA as a ``.safetensors`` file that ComfyUI and diffusers both load exactly.

Keys are diffusers' SD3 LoRA format, ``transformer.<module>.lora_A.weight`` / ``lora_B.weight``
(ComfyUI silently drops raw peft keys without the ``transformer.`` prefix). ComfyUI's LoraLoader
ignores an alpha stored in the header, so ``alpha / rank`` is folded into ``lora_B``: the file is
then correct for any loader that assumes alpha = rank (ComfyUI, diffusers' ``load_lora_weights``).
Training metadata goes into the safetensors header (string values only).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .model import DTYPES, LoraSpec

PACK_VERSION = "0.1.0"


# mkstemp creates 0600 files; a LoRA must be readable by a ComfyUI running as another user.
SHARED_FILE_MODE = 0o644


def atomic_save_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Save safetensors to a temp file beside ``path`` and rename it into place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, SHARED_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, SHARED_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def header(spec: LoraSpec, info: Mapping[str, Any]) -> dict[str, str]:
    """Header metadata: the LoRA's shape and the run's facts, every value a string."""
    meta = {
        "sd35_tuner.version": PACK_VERSION,
        "sd35_tuner.format": "diffusers-sd3-lora",
        "sd35_tuner.rank": str(spec.rank),
        "sd35_tuner.alpha": str(spec.alpha),
        "sd35_tuner.alpha_folded": "lora_B is scaled by alpha/rank; load with alpha = rank (strength 1.0)",
        "sd35_tuner.targets": json.dumps(list(spec.targets)),
    }
    for key, value in info.items():
        meta[f"sd35_tuner.{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def export_lora(
    transformer, spec: LoraSpec, path: str | os.PathLike, info: Mapping[str, Any] | None = None, dtype: str = "fp32"
) -> Path:
    """Write the LoRA file atomically and return its path."""
    path = Path(path)
    atomic_save_file(lora_state_dict(transformer, spec, dtype), path, header(spec, info or {}))
    return path


def output_path(folder: str | os.PathLike, name: str, field: str = "lora_name") -> Path:
    """``folder/<name>.safetensors`` confined to ``folder``; an existing file gets a ``_2``, ``_3``... version."""
    folder = Path(folder).resolve()
    stem = name.strip().removesuffix(".safetensors")
    bad = not stem or Path(stem).is_absolute() or ".." in Path(stem).parts or any(c in stem for c in ':*?"<>|\\\0')
    if bad:
        raise ValueError(
            f"{field} {name!r} is not a plain file name; use something like 'my_style' or 'people/my_style' "
            "(no '..', no absolute path)"
        )
    path = (folder / f"{stem}.safetensors").resolve()
    if not path.is_relative_to(folder):
        raise ValueError(f"{field} {name!r} points outside {folder}")
    version = 2
    while path.exists():
        path = path.with_name(f"{Path(stem).name}_{version}.safetensors")
        version += 1
    return path
