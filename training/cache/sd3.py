"""What SD3/SD3.5 expects from the encoders the cache calls, and the checks that name a wrong one.

The VAE gives 16-channel latents at 1/8 of the pixels; the trainer works in the shifted and scaled
space ``(raw - SD3_SHIFT_FACTOR) * SD3_SCALE_FACTOR`` (the values of SD3's VAE config and of ComfyUI's
``latent_formats.SD3``; this is the library's one definition). The text side gives cond [1, L, 4096]
(CLIP-L/G zero-padded to T5's width) and pooled [1, 2048] (CLIP-L 768 + CLIP-G 1280).

Encoders are plain callables with an identity (part of every cache key), so this package never
imports ComfyUI and unit tests pass small fakes; the cache node wraps ComfyUI's VAE and CLIP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SD3_LATENT_CHANNELS = 16
SD3_SHIFT_FACTOR = 0.0609
SD3_SCALE_FACTOR = 1.5305
TEXT_DIM = 4096
POOLED_DIM = 2048
MAX_TOKENS = 77  # per text encoder; longer captions are truncated (and reported)
BUCKET_MULTIPLE = 16  # VAE downscale 8 x SD3 patch size 2


@dataclass(frozen=True)
class LatentEncoder:
    """A VAE as callables: ``encode(pixels [B,H,W,3] in 0..1, bucket) -> raw latents [B,C,H/8,W/8]``."""

    identity: str
    encode: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
    channels: int
    variant: Callable[[tuple[int, int]], str] = lambda bucket: "full"  # part of the key (e.g. tiled encode)
    name: str = "VAE"


@dataclass(frozen=True)
class TextEncoding:
    cond: torch.Tensor  # [1, L, 4096]
    pooled: torch.Tensor  # [1, 2048]
    truncated: bool = False


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder as a callable: ``encode(text) -> TextEncoding`` (tokenize, cap length, encode)."""

    identity: str
    encode: Callable[[str], TextEncoding]
    max_tokens: int = MAX_TOKENS
    name: str = "CLIP"


def check_text(encoder: TextEncoder, enc: TextEncoding, caption: str, text_len: int | None) -> None:
    """ValueError saying which encoder gave what, if ``enc`` is not SD3 conditioning of length ``text_len``."""
    cond, pooled = enc.cond, enc.pooled
    if cond.ndim != 3 or cond.shape[0] != 1 or cond.shape[-1] != TEXT_DIM or pooled.shape[-1] != POOLED_DIM:
        raise ValueError(
            f"{encoder.name} gave cond {tuple(cond.shape)} and pooled {tuple(pooled.shape)}; an SD3 "
            f"text encoder gives cond [1, L, {TEXT_DIM}] and pooled [1, {POOLED_DIM}]. Load SD3 text encoders "
            "(TripleCLIPLoader, or CLIPLoader / DualCLIPLoader with type sd3)."
        )
    if not (torch.isfinite(cond).all() and torch.isfinite(pooled).all()):
        raise ValueError(
            f"{encoder.name} produced NaN or infinite values for the caption {caption[:60]!r}: its "
            "weights are broken or incomplete (e.g. a TripleCLIPLoader slot holding the wrong model). "
            "Check the text encoder files."
        )
    if text_len is not None and cond.shape[1] != text_len:
        raise ValueError(f"text encoder gave cond length {cond.shape[1]} after {text_len} for {caption[:60]!r}")


def check_latents(encoder: LatentEncoder, latents: torch.Tensor, bucket: tuple[int, int], sources: list[str]) -> None:
    """ValueError naming the VAE (or the image) if ``latents`` are not finite SD3 latents of ``bucket``."""
    expect = (len(sources), SD3_LATENT_CHANNELS, bucket[1] // 8, bucket[0] // 8)
    if tuple(latents.shape) != expect:
        raise ValueError(
            f"{encoder.name} returned latents {tuple(latents.shape)} for a {bucket[0]}x{bucket[1]} "
            f"batch; expected {expect}. Use an SD3/SD3.5 VAE."
        )
    for source, lat in zip(sources, latents, strict=True):
        if not torch.isfinite(lat).all():
            raise ValueError(
                f"{source}: {encoder.name} produced NaN or infinite latents. An fp16 VAE "
                "can overflow: load the VAE in fp32/bf16, or check the VAE file."
            )


def narrow(t: torch.Tensor) -> torch.Tensor:
    """Store float32 values in 16 bits when that is exact (fp16/bf16 encoders), else keep float32."""
    t = t.detach().to("cpu", torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        small = t.to(dtype)
        if torch.equal(small.to(torch.float32), t):
            return small
    return t
