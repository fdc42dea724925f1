"""The rectified-flow objective SD3 was trained with (Esser et al., arXiv 2403.03206).

``x_t = (1 - σ)·x0 + σ·ε`` and the transformer predicts the velocity ``ε − x0``. σ is drawn with
diffusers' ``compute_density_for_timestep_sampling`` (logit-normal, mode or uniform) and then moved
by the SD3 resolution shift ``σ' = s·σ / (1 + (s − 1)·σ)``, the same map as the
FlowMatchEulerDiscreteScheduler's ``shift``, applied continuously instead of through a table of
1000 timesteps. Optional per-sample weighting comes from ``compute_loss_weighting_for_sd3``.
"""

from __future__ import annotations

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch_size: int,
    generator: torch.Generator,
    scheme: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    shift: float = 3.0,
) -> torch.Tensor:
    """σ in (0, 1) per sample, drawn from ``generator`` (so runs are reproducible and resumable)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        generator=generator,
    )
    return shift_sigmas(u.clamp(1e-5, 1 - 1e-5), shift)


def flow_matching_loss(
    transformer,
    latents: torch.Tensor,
    cond: torch.Tensor,
    pooled: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    weighting: str = "none",
) -> torch.Tensor:
    """Mean weighted squared error between the predicted and true velocity ``ε − x0``."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    dtype = base_dtype(transformer)
    s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
    noisy = (1 - s) * latents + s * noise
    pred = transformer(
        hidden_states=noisy.to(dtype),
        encoder_hidden_states=cond.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=sigmas * 1000,
        return_dict=False,
    )[0].float()
    target = noise - latents
    weights = compute_loss_weighting_for_sd3(weighting, sigmas=s).float()
    per_sample = (weights * (pred - target.float()) ** 2).reshape(latents.shape[0], -1).mean(dim=1)
    return per_sample.mean()


def base_dtype(transformer) -> torch.dtype:
    """The dtype inputs must have to enter the (frozen) base model (also through a DDP wrapper)."""
    return getattr(transformer, "module", transformer).pos_embed.proj.weight.dtype
