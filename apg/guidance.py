"""Adaptive Projected Guidance, Algorithm 1 of Sadat, Hilliges & Weber, "Eliminating Oversaturation and
Artifacts of High Guidance Scales in Diffusion Models" (ICLR 2025, arXiv 2410.02416).

Classifier-free guidance moves the conditional prediction along ``Δ = D_cond − D_uncond``. The paper splits
that update into the part parallel to ``D_cond`` (which mostly raises saturation) and the orthogonal part
(which carries the quality gain), down-weights the parallel part by η, clamps the update's norm to ``r``
and runs it through a "reverse momentum" average with β ≤ 0:

    Δ = D_cond − D_uncond
    m ← Δ + β·m ;  Δ ← m                         (momentum; β = 0 disables it)
    Δ ← Δ · min(1, r / ‖Δ‖₂)                     (per sample over all non-batch dims; r = 0 disables it)
    Δ∥ = (⟨Δ, D_cond⟩ / ‖D_cond‖²) · D_cond ;  Δ⊥ = Δ − Δ∥   (per sample, in float64)
    D = D_cond + (w − 1)·(Δ⊥ + η·Δ∥)

Everything works on *denoised* (x0) predictions, where the paper's author says APG works best; with η = 1,
r = 0, β = 0 the result is classifier-free guidance at scale ``w`` (``D_uncond + w·Δ``). Note the (w − 1)
convention: ComfyUI's core APG node computes ``D_cond + w·Δ'``, i.e. APG at w + 1.

This module imports torch only, so the trainer's validation sampler and the ComfyUI nodes share it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MomentumState",
    "apg_update",
    "apply_apg",
    "cfg",
    "clamp_norm",
    "project",
    "sample_dims",
]


def sample_dims(x: Tensor) -> tuple[int, ...]:
    """Every non-batch dim: one sample's norm covers [C, H, W] images and [C, T, H, W] videos alike."""
    return tuple(range(1, x.ndim))


class MomentumState:
    """The running update ``m ← Δ + β·m`` of APG's momentum, for one sampling run.

    β < 0 is the paper's "reverse momentum" (it subtracts a share of the previous steps' update); β = 0
    disables momentum (``update`` returns Δ and keeps nothing). The state forgets itself whenever Δ's
    shape, dtype or device differs from the stored one (a new batch or resolution is a new run), and
    callers reset it at the start of every sampling run so nothing leaks between prompts.
    """

    def __init__(self, beta: float) -> None:
        if not math.isfinite(beta):
            raise ValueError(f"APG momentum must be a finite number, got {beta}")
        self.beta = float(beta)
        self.running: Tensor | None = None

    def reset(self) -> None:
        self.running = None

    def update(self, delta: Tensor) -> Tensor:
        if self.beta == 0.0:
            self.running = None
            return delta
        previous = self.running
        if (
            previous is None
            or previous.shape != delta.shape
            or previous.dtype != delta.dtype
            or previous.device != delta.device
        ):
            self.running = delta.clone()
        else:
            self.running = delta + self.beta * previous
        return self.running


def clamp_norm(delta: Tensor, norm_threshold: float) -> Tensor:
    """Scale each sample of ``delta`` by ``min(1, r / ‖delta‖₂)`` so no sample's L2 norm exceeds r (0 disables)."""
    if norm_threshold < 0 or not math.isfinite(norm_threshold):
        raise ValueError(f"APG norm_threshold must be a finite number >= 0 (0 disables), got {norm_threshold}")
    if norm_threshold == 0:
        return delta
    norm = torch.linalg.vector_norm(delta, ord=2, dim=sample_dims(delta), keepdim=True)
    factor = (norm_threshold / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_max(1.0)
    return delta * factor


def project(v: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``v`` into the parts parallel and orthogonal to ``onto``, per sample, computed in float64.

    A sample whose ``onto`` is all zeros has no direction: its parallel part is zero.
    """
    dims = sample_dims(v)
    v64, onto64 = v.double(), onto.double()
    energy = (onto64 * onto64).sum(dim=dims, keepdim=True)
    coef = (v64 * onto64).sum(dim=dims, keepdim=True) / energy.clamp_min(torch.finfo(torch.float64).tiny)
    parallel = coef * onto64
    return parallel, v64 - parallel


def apg_update(
    cond: Tensor,
    uncond: Tensor,
    eta: float = 0.0,
    norm_threshold: float = 0.0,
    state: MomentumState | None = None,
) -> Tensor:
    """APG's guidance direction ``Δ⊥ + η·Δ∥`` (after momentum and norm clamp), in float64."""
    if cond.shape != uncond.shape:
        raise ValueError(f"APG needs cond and uncond of one shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    delta = cond - uncond
    if state is not None:
        delta = state.update(delta)
    delta = clamp_norm(delta, norm_threshold)
    parallel, orthogonal = project(delta, cond)
    return orthogonal + eta * parallel


def apply_apg(
    cond: Tensor,
    uncond: Tensor,
    scale: float,
    eta: float = 0.0,
    norm_threshold: float = 0.0,
    state: MomentumState | None = None,
) -> Tensor:
    """Guided denoised prediction ``D_cond + (scale − 1)·(Δ⊥ + η·Δ∥)`` of the paper's Algorithm 1.

    ``cond``/``uncond`` are the denoised (x0) predictions ``[B, ...]``; the result has ``cond``'s dtype.
    With ``eta=1, norm_threshold=0`` and no momentum it equals CFG at ``scale``.

    Same result as ``cond + (scale − 1)·apg_update(...)``, computed with per-sample scalars so the float64
    work is a few passes over the latent: with the clamp factor f and Δ∥ = k·D_cond,
    ``k = f·⟨Δ, D_cond⟩ / ‖D_cond‖²``, the result is ``(1 − (w − 1)(1 − η)·k)·D_cond + (w − 1)·f·Δ``.
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"APG needs cond and uncond of one shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    if norm_threshold < 0 or not math.isfinite(norm_threshold):
        raise ValueError(f"APG norm_threshold must be a finite number >= 0 (0 disables), got {norm_threshold}")
    delta = cond - uncond
    if state is not None:
        delta = state.update(delta)
    batch = cond.shape[0]
    c = cond.double().reshape(batch, -1)
    d = delta.double().reshape(batch, -1)
    tiny = torch.finfo(torch.float64).tiny
    if norm_threshold > 0:
        f = (norm_threshold / torch.linalg.vector_norm(d, dim=1).clamp_min(tiny)).clamp_max(1.0)
    else:
        f = torch.ones(batch, dtype=torch.float64, device=c.device)
    k = f * torch.einsum("bi,bi->b", d, c) / torch.einsum("bi,bi->b", c, c).clamp_min(tiny)
    a = 1.0 - (scale - 1.0) * (1.0 - eta) * k
    out = torch.addcmul(a[:, None] * c, ((scale - 1.0) * f)[:, None], d)
    return out.reshape(cond.shape).to(cond.dtype)


def cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on denoised predictions, the way ComfyUI computes it."""
    return uncond + (cond - uncond) * scale
