"""Quantise the frozen base with optimum-quanto, one Linear at a time.

The backend stays behind these two functions (optimum-quanto is in maintenance mode; torchao can take
its place here). Only the joint blocks are quantised: the patch embedding, the embedders and the
output projection are small and sensitive, and stay in the base precision.
"""

from __future__ import annotations

import torch

from ..options import QUANTIZATION as QUANT
from . import quanto_cpu

_EXCLUDE = ["pos_embed*", "time_text_embed*", "context_embedder", "norm_out*", "proj_out"]


def _qtype(quantization: str):
    if quantization not in QUANT:
        raise ValueError(f"quantization must be one of {QUANT}, got {quantization!r}")
    from optimum.quanto import qfloat8, qint4, qint8

    return {"int8": qint8, "int4": qint4, "fp8": qfloat8}[quantization]


def workspace(quantization: str) -> quanto_cpu.Workspace | None:
    """Scratch memory reused by every ``quantize_linear`` of one load (int8 and int4)."""
    return quanto_cpu.Workspace() if quantization in ("int8", "int4") else None


def quantize_linears(module: torch.nn.Module, quantization: str, scratch: quanto_cpu.Workspace | None) -> None:
    """Replace every Linear inside ``module`` by a frozen quanto QLinear, freeing each float weight as
    soon as its quantised copy exists (peak: one layer's float weight, not the whole model's)."""
    if quantization == "none":
        return
    for name, child in list(module.named_modules()):
        if type(child) is torch.nn.Linear:
            quantize_linear(module, name, quantization, scratch)


def quantize_linear(
    root: torch.nn.Module, name: str, quantization: str, scratch: quanto_cpu.Workspace | None = None
) -> None:
    """Replace the Linear ``root.<name>`` by a frozen quanto QLinear (its bias may still be loaded later).
    On CPU, ``quanto_cpu`` makes quanto's int8/int4 result, bit for bit and faster, when ``scratch`` is given."""
    from optimum.quanto.nn import quantize_module

    child = root.get_submodule(name)
    qchild = quantize_module(child, weights=_qtype(quantization))
    if scratch is not None and quanto_cpu.supports(qchild, child.weight):
        qchild.weight = torch.nn.Parameter(quanto_cpu.quantize(qchild, child.weight, scratch), requires_grad=False)
    else:
        qchild.freeze()
    qchild.requires_grad_(False)
    parent_name, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attr, qchild)
    child.weight = None


def quantize_base(transformer, quantization: str) -> None:
    """Quantise an already-loaded base in place, then freeze it. Call before adding the LoRA.
    (``load_base(..., quantization=...)`` does this while loading, without the float copy.)"""
    if quantization == "none":
        return
    _qtype(quantization)
    scratch = workspace(quantization)
    for block in transformer.transformer_blocks:
        quantize_linears(block, quantization, scratch)
    transformer.requires_grad_(False)
