"""The trainer's base taken from a MODEL input: ComfyUI's own diffusion-model tensors, shared not copied.

Whatever loaded the MODEL (CheckpointLoaderSimple, UNETLoader, an fp8-scaled file) leaves its MMDiT
weights in ``model.model.diffusion_model``; the loader in ``training.loading`` builds the trainer's
diffusers transformer from them, sharing every tensor that needs no conversion (fused qkv as views).
fp8 weights are handed over with their scales (or dequantised on access when ComfyUI keeps them as
quantised tensors) and dequantised one layer at a time.
"""

from __future__ import annotations

import inspect
import logging

import torch

logger = logging.getLogger(__name__)

FROM_MODEL = "(use the MODEL input)"
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class _DequantisedOnAccess(dict):
    """A state dict whose quantised tensors (ComfyUI's QuantizedTensor) become float only when read."""

    def __getitem__(self, key: str) -> torch.Tensor:
        value = super().__getitem__(key)
        return value.dequantize() if hasattr(value, "dequantize") and not value.is_floating_point() else value


def model_dtype(model) -> str | None:
    """The MODEL's weight dtype as a trainer base_dtype name, if it is one (training on it shares memory)."""
    return _DTYPE_NAMES.get(model.model.get_dtype())


def graph_base(model, name: str | None = None):
    """An ``InMemoryBase`` over the MODEL's diffusion-model tensors (no copy), called ``name`` in logs and
    in the LoRA's metadata (the base_model choice when it names a file)."""
    from ..training.loading import InMemoryBase

    state = _DequantisedOnAccess(model.model.diffusion_model.state_dict())
    # ComfyUI up to 0.3.x popped the marker when it loaded the file; newer ones have no such attribute and
    # warn on reading it (their config's __getattr__), so it is looked up without calling that
    scaled_fp8 = inspect.getattr_static(model.model.model_config, "scaled_fp8", None)
    if scaled_fp8 is not None:
        state["scaled_fp8"] = torch.empty(0, dtype=scaled_fp8)
    if getattr(model, "patches", None):
        logger.warning(
            "the MODEL input carries %d weight patches (e.g. LoRAs); the trainer uses the unpatched base weights",
            len(model.patches),
        )
    return InMemoryBase(state, name=name or f"the MODEL input ({type(model.model).__name__})")
