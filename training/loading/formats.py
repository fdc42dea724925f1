"""Recognise an SD3 file's layout and account for every tensor in it, before anything is loaded.

Layouts: Stability's MMDiT keys (bare or under ``model.diffusion_model.``, alone or next to a VAE and
text encoders), diffusers keys, ComfyUI's fp8 files (legacy ``scaled_fp8`` marker + ``.scale_weight``;
the per-layer ``.weight_scale`` + ``.comfy_quant`` / ``_quantization_metadata`` form; plain fp8) and
GGUF. Nothing is dropped silently: each tensor is a weight the model uses, a scale that belongs to
one, or under a part we knowingly skip (VAE, text encoders). Anything else is refused, naming the key
and the file: a tensor we do not know, a scale without its layer, a quantisation format we cannot read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import mmdit
from .sources import ModelLoadError, TensorSource

STABILITY_PREFIX = "model.diffusion_model."
# Parts of an all-in-one checkpoint that are not the transformer: the VAE and the text encoders.
IGNORED_PARTS = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")
FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")
REFUSE_SUFFIXES = (".weight_scale_2", ".pre_quant_scale", ".weight_s_rel", ".weight_s_channel")


@dataclass
class Quant:
    """How one stored Linear weight becomes real numbers: ``stored.float() * scale``."""

    format: str  # "float8_e4m3fn", "float8_e5m2" (per-tensor scale) or "gguf"
    scale_key: str | None = None  # the tensor holding the per-tensor scale (None: scale 1)


@dataclass
class Plan:
    """What to read from a source: the transformer's tensors and how, plus what is knowingly skipped."""

    layout: str  # "mmdit" or "diffusers"
    prefix: str
    config: dict[str, Any]
    quant: dict[str, Quant] = field(default_factory=dict)  # source key of a weight -> how to dequantise
    ignored: list[str] = field(default_factory=list)
    description: str = ""


def detect_family(keys: Iterable[str]) -> str:
    """``"sd3-stability"`` or ``"sd3-diffusers"`` for usable files; raises naming a refused family."""
    keys = set(keys)

    def has(*candidates: str) -> bool:
        return any(k in keys or STABILITY_PREFIX + k in keys for k in candidates)

    if has("joint_blocks.0.context_block.adaLN_modulation.1.bias", "joint_blocks.0.x_block.attn.qkv.weight"):
        return "sd3-stability"
    if has("double_blocks.0.img_attn.qkv.weight") or "single_transformer_blocks.0.attn.to_q.weight" in keys:
        raise ModelLoadError("it is a Flux model; SD3.5 Tuner trains SD3 / SD3.5 transformers only")
    if "transformer_blocks.0.attn.add_q_proj.weight" in keys and "context_embedder.weight" in keys:
        return "sd3-diffusers"
    if has("input_blocks.0.0.weight") or any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelLoadError("it is an SD1.x/SDXL UNet checkpoint; SD3.5 Tuner trains SD3 / SD3.5 transformers only")
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in keys):
        raise ModelLoadError("it looks like a Flux model; SD3.5 Tuner trains SD3 / SD3.5 transformers only")
    sample = ", ".join(sorted(keys)[:3])
    raise ModelLoadError(f"no SD3 transformer keys found (first keys: {sample}); pick an SD3 / SD3.5 checkpoint")


def _layer_formats(src: TensorSource, prefix: str) -> dict[str, str]:
    """Per-layer quantisation formats from ``.comfy_quant`` tensors or a ``_quantization_metadata`` header
    (layer names with or without the checkpoint prefix, as ComfyUI versions differ)."""
    formats: dict[str, str] = {}
    header = src.metadata.get("_quantization_metadata")
    if header:
        try:
            layers = json.loads(header)["layers"]
        except (ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"{src.name}: its _quantization_metadata header cannot be read ({err})") from err
        for layer, conf in layers.items():
            fmt = conf.get("format") if isinstance(conf, dict) else conf
            formats[layer.removeprefix(prefix)] = str(fmt)
    for key in src.keys():
        if key.endswith(".comfy_quant") and key.startswith(prefix):
            try:
                conf = json.loads(bytes(src.get(key).tolist()).decode())
            except (ValueError, UnicodeDecodeError) as err:
                raise ModelLoadError(f"{src.name}: {key} is not readable quantisation JSON ({err})") from err
            formats[key[len(prefix) : -len(".comfy_quant")]] = str(conf.get("format"))
    return formats


def _mmdit_quant(src: TensorSource, prefix: str, rel: set[str], expected: set[str]) -> dict[str, Quant]:
    """Pair every fp8 weight with its scale; refuse scales without a layer and unknown formats."""
    marker = prefix + "scaled_fp8"
    legacy = marker in src.keys()
    formats = _layer_formats(src, prefix)
    quant: dict[str, Quant] = {}
    for key in sorted(rel):
        suffix = next((s for s in SCALE_SUFFIXES if key.endswith(s)), None)
        if key.endswith(REFUSE_SUFFIXES):
            raise ModelLoadError(
                f"{src.name}: tensor {prefix + key!r} belongs to a quantisation format SD3.5 Tuner cannot read "
                "(only per-tensor fp8 scales are understood); use a bf16/fp16 or fp8-scaled file"
            )
        if suffix is None:
            continue
        layer = key[: -len(suffix)]
        if layer + ".weight" not in expected:
            raise ModelLoadError(f"{src.name}: scale tensor {prefix + key!r} has no layer {prefix + layer}.weight")
        if suffix == ".scale_weight" and not legacy:
            raise ModelLoadError(
                f"{src.name}: {prefix + key!r} is an fp8 scale but the file has no '{marker}' marker, so "
                "ComfyUI would not apply it either; the file is damaged or from an unknown tool"
            )
        if suffix == ".weight_scale" and layer not in formats:
            raise ModelLoadError(
                f"{src.name}: {prefix + key!r} has no quantisation format (no .comfy_quant tensor or "
                "_quantization_metadata entry for that layer)"
            )
        if suffix in (".scale_weight", ".weight_scale"):
            quant[layer + ".weight"] = Quant("float8_e4m3fn", prefix + key)
    for layer, fmt in formats.items():
        if layer + ".weight" not in expected:
            raise ModelLoadError(f"{src.name}: quantisation metadata names layer {prefix + layer}, which is not in it")
        if fmt not in FP8:
            raise ModelLoadError(
                f"{src.name}: layer {prefix + layer} is quantised as {fmt!r}; SD3.5 Tuner reads per-tensor fp8 "
                "(float8_e4m3fn, float8_e5m2) only. Use a bf16/fp16 or fp8-scaled file"
            )
        scale = prefix + layer + ".weight_scale"
        quant[layer + ".weight"] = Quant(fmt, scale if scale in src.keys() else None)
    for key in expected:  # fp8 weights with no scale (plain fp8): scale 1, as ComfyUI reads them
        if key not in quant and src.dtype(prefix + key) in FP8.values():
            quant[key] = Quant("float8_e4m3fn" if src.dtype(prefix + key) == torch.float8_e4m3fn else "float8_e5m2")
    return quant


def plan_mmdit(src: TensorSource) -> Plan:
    keys = src.keys()
    prefix = STABILITY_PREFIX if any(k.startswith(STABILITY_PREFIX) for k in keys) else ""
    ignored = [k for k in keys if k.startswith(IGNORED_PARTS)]
    outside = [k for k in keys if not k.startswith(prefix) and k not in ignored]
    if outside:
        raise ModelLoadError(
            f"{src.name}: tensor {outside[0]!r} is neither part of the SD3 transformer ({prefix or 'bare keys'}) "
            f"nor of a VAE / text encoder; refusing rather than guessing ({len(outside)} such tensors)"
        )
    rel = {k[len(prefix) :] for k in keys if k.startswith(prefix) and k not in ignored}
    rel.discard("scaled_fp8")
    globals_, blocks = mmdit.all_entries(rel)
    expected = {e.source for e in globals_} | {e.source for b in blocks for e in b}
    missing = sorted(expected - rel)
    if missing:
        raise ModelLoadError(
            f"{src.name}: tensor {prefix + missing[0]!r} is missing ({len(missing)} missing); "
            "the file may be truncated or not a complete SD3 transformer"
        )
    quant = _mmdit_quant(src, prefix, rel, expected)
    extra = sorted(k for k in rel - expected if not k.endswith(SCALE_SUFFIXES))
    if extra:
        raise ModelLoadError(
            f"{src.name}: tensor {prefix + extra[0]!r} is not part of the SD3 layout derived from its shapes "
            f"({len(extra)} unknown tensors); refusing rather than dropping it silently"
        )
    config = mmdit.config_from_shapes(lambda k: src.shape(prefix + k), rel)
    kind = "fp8-scaled" if prefix + "scaled_fp8" in keys else "per-layer fp8" if quant else "Stability"
    return Plan("mmdit", prefix, config, quant, ignored, f"{kind} MMDiT, {len(blocks)} blocks")


def plan_diffusers(src: TensorSource, config_fn) -> Plan:
    state_shapes = {k: src.shape(k) for k in src.keys()}
    quant = {k: Quant("float8_e4m3fn") for k in src.keys() if src.dtype(k) == torch.float8_e4m3fn}
    return Plan("diffusers", "", config_fn(state_shapes), quant, [], "diffusers-keyed transformer")


def plan(src: TensorSource, config_fn) -> Plan:
    """The plan for any supported source; ``config_fn`` derives a diffusers config from diffusers shapes."""
    family = detect_family(src.keys())
    return plan_mmdit(src) if family == "sd3-stability" else plan_diffusers(src, config_fn)


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """fp8 stored weight x per-tensor scale, in ``dtype`` (ComfyUI computes the same product)."""
    out = stored.float()
    if scale is not None:
        out = out * scale.float()
    return out.to(dtype)
