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

import torch
from torch import Tensor

from .settings import check_momentum

__all__ = ["MomentumState", "apply_apg", "cfg"]


class MomentumState:
    """The running update ``m ← Δ + β·m`` of APG's momentum, for one sampling run.

    β < 0 is the paper's "reverse momentum" (it subtracts a share of the previous steps' update); β = 0
    disables momentum (``update`` returns Δ and keeps nothing). The state forgets itself whenever Δ's
    shape, dtype or device differs from the stored one (a new batch or resolution is a new run), and
    callers reset it at the start of every sampling run so nothing leaks between prompts. |β| is limited
    to ``settings.MOMENTUM_LIMIT`` (< 1), where the running update stays bounded.
    """

    def __init__(self, beta: float) -> None:
        if problem := check_momentum(beta):
            raise ValueError(problem)
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
    With ``eta=1, norm_threshold=0`` and no momentum it equals CFG at ``scale``. The settings are checked
    once, where they are made (``apg.settings``), not here on every step.

    The paper's steps (momentum, clamp, projection in float64, combination) are fused into per-sample
    scalars so the float64 work is a few passes over the latent: with the clamp factor f and Δ∥ = k·D_cond,
    ``k = f·⟨Δ, D_cond⟩ / ‖D_cond‖²``, the result is ``(1 − (w − 1)(1 − η)·k)·D_cond + (w − 1)·f·Δ``.
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"APG needs cond and uncond of one shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
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
