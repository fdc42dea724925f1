"""GGUF files (ComfyUI-GGUF's ``sd3`` arch, original MMDiT keys), read with the ``gguf`` package.

Quantised Linear weights stay quantised as the frozen base: they become diffusers' ``GGUFParameter``
inside diffusers' ``GGUFLinear`` (an ``nn.Linear`` that dequantises in its forward), which peft wraps
like any Linear, so a Q8_0 / Q4 base trains at its file size. Unquantised tensors (F32/F16/BF16) load
like any other. ``gguf`` is optional: without it a clear message says what to install.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .sources import ModelLoadError

_FLOAT = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGMLQuantizationType F32, F16, BF16


def _gguf():
    try:
        import gguf
    except ImportError as err:
        raise ModelLoadError(
            "loading .gguf files needs the 'gguf' package: run  pip install gguf  in ComfyUI's Python, "
            "then restart ComfyUI"
        ) from err
    return gguf


class GGUFFile:
    """A GGUF file as a tensor source: float tensors as torch tensors, quantised ones as GGUFParameter."""

    def __init__(self, path: Path):
        gguf = _gguf()
        self.path, self.name, self.metadata = path, path.name, {}
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as err:  # the reader raises plain ValueError/struct errors on foreign files
            raise ModelLoadError(f"cannot read {path.name} as GGUF ({err})") from err
        field = reader.fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "unknown"
        if arch != "sd3":
            raise ModelLoadError(f"{path.name} is a GGUF of architecture {arch!r}; SD3.5 Tuner trains 'sd3' models")
        self._tensors = {t.name: t for t in reader.tensors}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(x) for x in reversed(self._tensors[key].shape))

    def dtype(self, key: str) -> torch.dtype:
        return _FLOAT.get(int(self._tensors[key].tensor_type), torch.uint8)

    def get(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        data = torch.from_numpy(t.data.copy())
        kind = int(t.tensor_type)
        if kind in _FLOAT:
            return data.view(_FLOAT[kind]).reshape(self.shape(key)) if kind == 30 else data.reshape(self.shape(key))
        from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

        if t.tensor_type not in SUPPORTED_GGUF_QUANT_TYPES:
            raise ModelLoadError(f"{self.name}: tensor {key!r} is quantised as {t.tensor_type.name}, not supported")
        return GGUFParameter(data, quant_type=t.tensor_type)


def is_gguf(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "quant_type") and hasattr(tensor, "quant_shape")


def dequantized(tensor: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """A GGUF tensor (or its first ``rows`` rows) as float32."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    part = tensor if rows is None else tensor[:rows]
    return dequantize_gguf_tensor(part).float()


def to_gguf_linears(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Swap each Linear whose weight is a GGUF tensor for diffusers' GGUFLinear holding the same tensors."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    for name, child in list(module.named_modules()):
        if type(child) is not torch.nn.Linear or not is_gguf(child.weight):
            continue
        out_features, in_features = child.weight.quant_shape
        with torch.device("meta"):
            new = GGUFLinear(in_features, out_features, child.bias is not None, compute_dtype=compute_dtype)
        new.weight = child.weight
        if child.bias is not None:
            new.bias = child.bias
        new.requires_grad_(False)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, new)
