"""Build the frozen base one block at a time: read, dequantise, convert, check, quantise, next.

The model is created on the meta device (no memory), then each group of tensors (the embedders, then
each joint block) is read from its source, turned into diffusers tensors, sanity-checked and assigned;
when the base is quantised, each Linear is quantised right after it is assigned, on the training
device. So the whole-precision model never sits in RAM next to its quantised copy, and a tensor that
needs no conversion (same dtype and device, no quantisation) is the source's own memory: a view of
the memory-mapped file, or of a ComfyUI MODEL's weights.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable

import torch

from ..heap import LOADING, map_allocations_above, trim_heap
from . import mmdit
from .formats import FP8, Plan, dequantize
from .quantize import quantize_linear, workspace
from .selfcheck import explain, weight_problem
from .sources import ModelLoadError, StateDictSource, TensorSource

logger = logging.getLogger(__name__)
Progress = Callable[[int, int], None]
Quantize = Callable[[torch.nn.Module, str], None]


def _groups(src: TensorSource, plan: Plan) -> list[tuple[str, list[mmdit.Entry]]]:
    """(module prefix, entries) per group: the embedders / output first, then each joint block."""
    if plan.layout == "mmdit":
        rel = [k[len(plan.prefix) :] for k in src.keys() if k.startswith(plan.prefix)]
        globals_, blocks = mmdit.all_entries(rel)
        return [("", globals_)] + [(f"transformer_blocks.{i}.", b) for i, b in enumerate(blocks)]
    by_block: dict[str, list[mmdit.Entry]] = {}
    for key in sorted(src.keys(), key=lambda k: not k.endswith(".bias")):
        match = re.match(r"(transformer_blocks\.\d+\.)", key)
        by_block.setdefault(match.group(1) if match else "", []).append(mmdit.Entry(key, (key,)))
    return sorted(by_block.items(), key=lambda kv: (kv[0] != "", int(kv[0].split(".")[1]) if kv[0] else 0))


def _read(src: TensorSource, plan: Plan, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    full = plan.prefix + key
    q = plan.quant.get(key)
    if q is not None and q.format in FP8:
        scale = src.get(q.scale_key) if q.scale_key else None
        return dequantize(src.get(full).to(device), scale, dtype)
    tensor = src.get(full)
    if hasattr(tensor, "quant_type"):  # a GGUF-quantised weight stays quantised (see gguf.py)
        return tensor.to(device)
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device)


def _assign(model: torch.nn.Module, key: str, value: torch.Tensor, name: str) -> None:
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is not None and attr in module._parameters:
        param = value if isinstance(value, torch.nn.Parameter) else torch.nn.Parameter(value, requires_grad=False)
        module._parameters[attr] = param.requires_grad_(False)
    elif module is not None and attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise ModelLoadError(f"{name}: tensor {key!r} has no place in the SD3 transformer derived from its shapes")
    current = module._parameters.get(attr, module._buffers.get(attr))
    if tuple(current.shape) != tuple(value.shape):
        raise ModelLoadError(f"{name}: tensor {key!r} has shape {tuple(value.shape)}, which does not fit the layout")


def build(
    src: TensorSource,
    plan: Plan,
    dtype: torch.dtype,
    quantization: str = "none",
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
    blocks_device: str | torch.device | None = None,
):
    """The transformer of ``plan`` from ``src``, in ``dtype`` on ``device``, its blocks quantised; each
    joint block moves to ``blocks_device`` once built when given (block offload keeps them in RAM)."""
    from diffusers import SD3Transformer2DModel

    device = torch.device(device)
    map_allocations_above(LOADING)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**plan.config)
    groups = _groups(src, plan)
    problems: list[str] = []
    shared = total = 0
    quantize = None
    if quantization != "none":
        quantize = functools.partial(quantize_linear, quantization=quantization, scratch=workspace(quantization))
    for done, (prefix, entries) in enumerate(groups):
        for entry in entries:
            counts = _load_entry(model, src, plan, entry, dtype, device, quantize if prefix else None, problems)
            shared, total = shared + counts[0], total + counts[1]
        if problems:
            raise ModelLoadError(explain(src.name, problems))
        if src.name.endswith(".gguf"):
            from .gguf import to_gguf_linears

            to_gguf_linears(model.get_submodule(prefix[:-1]) if prefix else model, dtype)
        if prefix and blocks_device is not None:
            model.get_submodule(prefix[:-1]).to(blocks_device)
        trim_heap()
        if progress is not None:
            progress(done + 1, len(groups))
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ModelLoadError(f"{src.name}: tensor {left[0]!r} of the SD3 transformer is missing ({len(left)} missing)")
    trim_heap()
    if isinstance(src, StateDictSource):
        logger.info(
            "%s: %d of %d weight tensors shared with it, not copied (%s)", src.name, shared, total, plan.description
        )
    return model.eval().requires_grad_(False)


def _load_entry(
    model, src, plan, entry, dtype, device, quantize: Quantize | None, problems: list[str]
) -> tuple[int, int]:
    """Read one source tensor, assign its diffusers tensor(s), check them, and quantise each Linear whose
    weight just arrived, so at most one layer's float weight exists besides the quantised model."""
    tensor = _read(src, plan, entry.source, dtype, device)
    shared = total = 0
    origin = (
        src.get(plan.prefix + entry.source).untyped_storage().data_ptr() if isinstance(src, StateDictSource) else None
    )
    for key, value in mmdit.convert(entry, tensor).items():
        total += 1
        shared += value.untyped_storage().data_ptr() == origin
        _assign(model, key, value, src.name)
        if value.ndim == 2 and key.endswith(".weight") and (problem := _check(key, value)):
            problems.append(problem)  # the load stops after this block, naming the file and the key
            continue
        module_name = key.removesuffix(".weight")
        if (
            quantize is not None
            and key.endswith(".weight")
            and type(model.get_submodule(module_name)) is torch.nn.Linear
        ):
            quantize(model, module_name)
    del tensor
    if quantize is not None:
        _release(src, [plan.prefix + entry.source])
    return shared, total


def _check(key: str, value: torch.Tensor) -> str | None:
    if hasattr(value, "quant_type"):
        from .gguf import dequantized

        return weight_problem(key, dequantized(value, rows=64))
    return weight_problem(key, value)


def _release(src: TensorSource, keys: list[str]) -> None:
    """Hand back the mapped pages of tensors that were converted (quantised): they are not used again."""
    release = getattr(src, "release", None)
    if release is not None:
        release(keys)
