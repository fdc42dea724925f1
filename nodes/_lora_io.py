"""The trainer's LoRA plumbing in ComfyUI's own types: core's LORA_MODEL out, a LoRA to start from in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import folder_paths

if TYPE_CHECKING:
    from ..training.start_lora import StartLora

NO_LORA = "[None]"  # core's TrainLoraNode spells "no existing LoRA" the same way


def existing_lora_options() -> list[str]:
    return [NO_LORA, *folder_paths.get_filename_list("loras")]


def start_lora(existing_lora: str, lora: dict | None) -> StartLora | None:
    """The LoRA a run continues: the ``lora`` input (a LORA_MODEL) or the ``existing_lora`` file, or None."""
    from safetensors.torch import load_file

    from ..training.start_lora import StartLora

    if lora is not None and existing_lora != NO_LORA:
        raise ValueError(
            f"existing_lora is {existing_lora!r} and a LORA_MODEL is connected to 'lora': start from one LoRA, "
            f"set existing_lora to {NO_LORA} or disconnect 'lora'"
        )
    if lora is not None:
        return StartLora.from_state_dict(lora, "the LORA_MODEL on 'lora'")
    if existing_lora == NO_LORA:
        return None
    path = folder_paths.get_full_path_or_raise("loras", existing_lora)
    return StartLora.from_state_dict(load_file(path), f"existing_lora {existing_lora!r}")


def trained_adapter(lora_path: Path) -> dict:
    """The written LoRA as core's LORA_MODEL (its tensors by key): LoraModelLoader applies it as LoraLoader
    applies the file, and SaveLoRA writes it again."""
    from safetensors.torch import load_file

    return load_file(str(lora_path))
