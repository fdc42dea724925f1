"""Validation samples during training: a flow-matching Euler sampler with CFG and with APG.

The sampler runs the training transformer (LoRA active) from seeded noise over the SD3-shifted σ
schedule. At each step both guidances are formed on denoised (x0) predictions, the space APG is
defined in, with ``apg.guidance`` (the pack's one implementation of the math): CFG as
``D_u + w·(D_c − D_u)``, APG as the paper's Algorithm 1. Decoding to pixels is the caller's job
(the node passes ComfyUI's VAE), so no VAE is ever loaded here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss import base_dtype, shift_sigmas


def _guidance():
    try:
        from ..apg import guidance
    except ImportError:  # imported as top-level ``training`` (tests, CLI): ``apg`` is a sibling package
        from apg import guidance
    return guidance


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 20
    scale: float = 4.0
    shift: float = 3.0
    apg_eta: float = 0.0
    apg_norm_threshold: float = 5.0
    apg_momentum: float = 0.0
    seed: int = 0


def flow_sigmas(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` σ values from 1 to 0, shifted like SD3's FlowMatchEulerDiscreteScheduler."""
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1), shift)


@torch.no_grad()
def sample(
    transformer,
    cond: torch.Tensor,
    pooled: torch.Tensor,
    uncond: torch.Tensor,
    uncond_pooled: torch.Tensor,
    shape: tuple[int, int, int],
    settings: SampleSettings,
    guidance: str = "cfg",
) -> torch.Tensor:
    """Sample one latent per prompt row of ``cond`` ([N, L, D]); returns [N, C, h, w] in the transformer's space.

    ``guidance``: ``"cfg"`` or ``"apg"``; with scale 1 both are the plain conditional sampler.
    """
    apg = _guidance()
    device, dtype = transformer.pos_embed.proj.weight.device, base_dtype(transformer)
    n = cond.shape[0]
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(settings.seed))
    x = noise.to(device)
    ctx = torch.cat([cond, uncond.expand(n, *uncond.shape[1:])]).to(device, dtype)
    pool = torch.cat([pooled, uncond_pooled.expand(n, *uncond_pooled.shape[1:])]).to(device, dtype)
    state = apg.MomentumState(settings.apg_momentum) if settings.apg_momentum != 0 else None
    sigmas = flow_sigmas(settings.steps, settings.shift)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        v = transformer(
            hidden_states=torch.cat([x, x]).to(dtype),
            encoder_hidden_states=ctx,
            pooled_projections=pool,
            timestep=torch.full((2 * n,), sigma * 1000, device=device),
            return_dict=False,
        )[0].float()
        x0_cond, x0_uncond = (torch.cat([x, x]) - sigma * v).chunk(2)
        if guidance == "apg":
            x0 = apg.apply_apg(
                x0_cond, x0_uncond, settings.scale, settings.apg_eta, settings.apg_norm_threshold, state
            )
        else:
            x0 = apg.cfg(x0_cond, x0_uncond, settings.scale)
        # Euler on the ODE dx/dσ = (x − x0) / σ
        x = x + (x - x0) / sigma * (sigma_next - sigma)
    return x.cpu()


def sample_prompts(
    transformer,
    prompts: list[tuple[str, torch.Tensor, torch.Tensor]],
    empty: tuple[torch.Tensor, torch.Tensor],
    shape: tuple[int, int, int],
    settings: SampleSettings,
) -> dict[str, torch.Tensor]:
    """CFG and APG latents for every validation prompt, same seed: ``{"cfg": [N,C,h,w], "apg": [N,C,h,w]}``."""
    cond = torch.cat([c if c.dim() == 3 else c[None] for _, c, _ in prompts])
    pooled = torch.cat([p if p.dim() == 2 else p[None] for _, _, p in prompts])
    was_training = transformer.training
    transformer.eval()
    try:
        return {g: sample(transformer, cond, pooled, empty[0], empty[1], shape, settings, g) for g in ("cfg", "apg")}
    finally:
        transformer.train(was_training)
