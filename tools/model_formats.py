"""Write an SD3 transformer in every file layout ComfyUI users have (tests and benchmarks only).

Each writer takes MMDiT (Stability) keys without prefix and returns the tensors (and header metadata)
of one real layout: Stability single files (bare, under ``model.diffusion_model.``, with a VAE, all-in-one
with text encoders), ComfyUI's fp8 "scaled" files (``scaled_fp8`` marker + ``.scale_weight``), the newer
per-layer form (``.weight_scale`` + ``.comfy_quant`` or a ``_quantization_metadata`` header), plain fp8,
and ComfyUI-GGUF's ``sd3`` GGUF. ``write_streamed`` writes a safetensors file tensor by tensor, so a
real-size random checkpoint never sits whole in RAM.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from training.fs import atomic_file

PREFIX = "model.diffusion_model."
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int64: "I64",
}


def write_streamed(
    path: Path,
    specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    make: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file whose tensors ``make(key, shape, dtype)`` produces one at a time."""
    specs = list(specs)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape, dtype in specs:
            tensor = make(key, shape, dtype)
            assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype, key
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            del tensor
    return path


def is_quantisable(key: str, tensor_or_shape) -> bool:
    """Linear weights of the MMDiT (what ComfyUI's fp8 ops store in fp8): 2-D ``.weight`` tensors."""
    shape = tensor_or_shape.shape if isinstance(tensor_or_shape, torch.Tensor) else tensor_or_shape
    return key.endswith(".weight") and len(shape) == 2


def to_fp8(weight: torch.Tensor, dtype=torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor absmax scaling as ComfyUI's QUANTIZATION.md describes: stored = w / scale."""
    scale = (weight.float().abs().max() / FP8_MAX[dtype]).clamp(min=1e-12)
    return (weight.float() / scale).to(dtype), scale.reshape(())


def stability(mm: dict[str, torch.Tensor], prefix: str = PREFIX, **extra: dict[str, torch.Tensor]) -> dict:
    """A Stability single file: the MMDiT under ``prefix`` plus any extra parts given as
    ``first_stage_model=vae_sd`` or ``text_encoders=te_sd`` (keys are prefixed with the part's name)."""
    out = {prefix + k: v for k, v in mm.items()}
    for part, sd in extra.items():
        out.update({f"{part}.{k}": v for k, v in sd.items()})
    return out


def fp8_scaled(mm: dict, prefix: str = PREFIX, marker=torch.float8_e4m3fn, scale_input: bool = False) -> dict:
    """ComfyUI's "scaled fp8" checkpoint: marker tensor, fp8 Linear weights with ``.scale_weight``."""
    fp8 = torch.float8_e4m3fn if marker == torch.float32 else marker
    out = {prefix + "scaled_fp8": torch.empty(0, dtype=marker)}
    for k, v in mm.items():
        if is_quantisable(k, v):
            out[prefix + k], scale = to_fp8(v, fp8)
            layer = prefix + k.removesuffix(".weight")
            out[layer + ".scale_weight"] = scale
            if scale_input:
                out[layer + ".scale_input"] = torch.ones(())
        else:
            out[prefix + k] = v
    return out


def fp8_layerwise(
    mm: dict, prefix: str = PREFIX, header: bool = False, fmt: str = "float8_e4m3fn", input_scale: bool = True
):
    """The per-layer form (ComfyUI since late 2025): ``.weight_scale`` / ``.input_scale`` and either a
    ``.comfy_quant`` JSON tensor per layer or one ``_quantization_metadata`` header entry.
    Returns (tensors, header metadata)."""
    out, layers = {}, {}
    dtype = torch.float8_e5m2 if fmt == "float8_e5m2" else torch.float8_e4m3fn
    for k, v in mm.items():
        if is_quantisable(k, v):
            layer = prefix + k.removesuffix(".weight")
            out[prefix + k], out[layer + ".weight_scale"] = to_fp8(v, dtype)
            if input_scale:  # ComfyUI then runs the layer in fp8 (activations quantised too)
                out[layer + ".input_scale"] = torch.ones(())
            layers[layer] = {"format": fmt}
            if not header:
                out[layer + ".comfy_quant"] = torch.tensor(
                    list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8
                )
        else:
            out[prefix + k] = v
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if header else {}
    return out, meta


def fp8_plain(mm: dict, prefix: str = PREFIX) -> dict:
    """fp8 Linear weights cast directly (no scales), everything else as it was."""
    return {prefix + k: v.to(torch.float8_e4m3fn) if is_quantisable(k, v) else v for k, v in mm.items()}


def write_gguf(mm: dict, path: Path, qtype: str = "Q8_0") -> Path:
    """ComfyUI-GGUF's layout: arch ``sd3``, original MMDiT keys, 2-D weights in ``qtype`` (rows whose
    length is not a multiple of the block stay F16), everything else F32 (as its converter keeps them)."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(str(path), "sd3")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "Q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    for k, v in mm.items():
        data = v.float().numpy()
        if is_quantisable(k, v) and data.shape[-1] % block == 0 and kind != gguf.GGMLQuantizationType.F16:
            writer.add_tensor(k, gguf.quants.quantize(data, kind), raw_dtype=kind)
        elif v.ndim >= 2:
            writer.add_tensor(k, data.astype(np.float16))
        else:
            writer.add_tensor(k, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_reference_weights(path: Path) -> dict[str, torch.Tensor]:
    """The gguf package's own reference dequantisation of every tensor (numpy), as float32."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        out[t.name] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)))
        out[t.name] = out[t.name].reshape(shape).float()
    return out
