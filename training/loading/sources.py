"""Where a base model's tensors come from: a safetensors file (memory-mapped, zero copy), a GGUF file,
or a state dict already in memory (a ComfyUI MODEL's). One small interface so the loader reads them
all the same way, one tensor at a time.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Protocol

import torch


class ModelLoadError(ValueError):
    """A base model file that cannot be used: missing, wrong family, unreadable or not understood."""


class TensorSource(Protocol):
    name: str  # what error messages call it (a file name, or "the MODEL input")
    metadata: dict[str, str]

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str) -> torch.Tensor: ...


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """A safetensors file read through a private (copy-on-write) memory map: ``get`` returns a tensor
    backed by the file's pages, so nothing is copied until it is converted, and untouched tensors
    (e.g. the large ``pos_embed`` table, of which training uses a crop) cost no RAM."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        try:
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 100_000_000:
                    raise ValueError("header too large")
                header = json.loads(f.read(length))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.path.getsize(path) else None
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as err:
            raise ModelLoadError(f"cannot read {path.name} as safetensors ({err})") from err
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + length
        self._entries = header
        for key, e in header.items():
            if e.get("dtype") not in _ST_DTYPES:
                raise ModelLoadError(
                    f"{path.name}: tensor {key!r} has dtype {e.get('dtype')!r}, which is not understood"
                )

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._entries[key]["dtype"]]

    def get(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        dtype, shape = _ST_DTYPES[e["dtype"]], tuple(e["shape"])
        begin, end = e["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._start + begin)
        return flat.view(dtype).reshape(shape)

    def release(self, keys: list[str]) -> None:
        """Drop these tensors' pages from this process (a private file mapping re-reads them on demand)."""
        page = mmap.PAGESIZE
        for key in keys:
            e = self._entries.get(key)
            if e is None or self._map is None:
                continue
            begin, end = (self._start + o for o in e["data_offsets"])
            start = begin - begin % page
            if end > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


class StateDictSource:
    """Tensors already in memory (e.g. a ComfyUI MODEL's diffusion model): shared, never copied."""

    def __init__(self, state: dict[str, torch.Tensor], name: str, metadata: dict[str, str] | None = None):
        self._state, self.name, self.metadata = state, name, metadata or {}

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._state[key].dtype

    def get(self, key: str) -> torch.Tensor:
        tensor = self._state[key]
        return _normal_alias(tensor) if tensor.is_inference() else tensor


def _normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor over an inference tensor's memory (ComfyUI loads models under inference_mode, and
    autograd refuses to save inference tensors for backward): same storage, no copy."""
    with torch.inference_mode(False), torch.no_grad():
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())
