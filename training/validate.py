"""Validation samples during training: a flow-matching Euler sampler with CFG and with APG.

The sampler runs the training transformer (LoRA active) from seeded noise over the SD3-shifted σ
schedule. At each step both guidances are formed on denoised (x0) predictions, the space APG is
defined in, with ``apg.guidance`` (the pack's one implementation of the math): CFG as
``D_u + w·(D_c − D_u)``, APG as the paper's Algorithm 1. Decoding to pixels is the caller's job
(the node passes ComfyUI's VAE), so no VAE is ever loaded here.

:class:`Validation` is what a training run calls every ``validation_every`` steps: sample every
validation prompt with both guidances, decode, write PNGs. Its ``on_validation(step, done, total)``
hook is called before sampling and after every transformer evaluation (``total`` counts both
guidances); it may raise, which is how a Cancel between validation evaluations stops the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .fs import atomic_file
from .loss import base_dtype, shift_sigmas


def _apg():
    try:
        from ..apg import guidance, schedule
    except ImportError:  # imported as top-level ``training`` (tests, CLI): ``apg`` is a sibling package
        from apg import guidance, schedule
    return guidance, schedule


@dataclass(frozen=True)
class SampleSettings:
    steps: int = 20
    scale: float = 4.0
    shift: float = 3.0
    apg_eta: float = 0.0
    apg_norm_threshold: float = 15.0  # scaled to the latent size, as the APG node's default 'scaled' mode
    apg_momentum: float = -0.5
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
    after_eval: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Sample one latent per prompt row of ``cond`` ([N, L, D]); returns [N, C, h, w] in the transformer's space.

    ``guidance``: ``"cfg"`` or ``"apg"``; with scale 1 both are the plain conditional sampler.
    ``after_eval``: called after every transformer evaluation (one per sampler step).
    """
    apg, schedule = _apg()
    device, dtype = transformer.pos_embed.proj.weight.device, base_dtype(transformer)
    n = cond.shape[0]
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(settings.seed))
    x = noise.to(device)
    ctx = torch.cat([cond, uncond.expand(n, *uncond.shape[1:])]).to(device, dtype)
    pool = torch.cat([pooled, uncond_pooled.expand(n, *uncond_pooled.shape[1:])]).to(device, dtype)
    state = apg.MomentumState(settings.apg_momentum) if settings.apg_momentum != 0 else None
    threshold = schedule.scaled_norm_threshold(settings.apg_norm_threshold, math.prod(shape))
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
            x0 = apg.apply_apg(x0_cond, x0_uncond, settings.scale, settings.apg_eta, threshold, state)
        else:
            x0 = apg.cfg(x0_cond, x0_uncond, settings.scale)
        # Euler on the ODE dx/dσ = (x − x0) / σ
        x = x + (x - x0) / sigma * (sigma_next - sigma)
        if after_eval is not None:
            after_eval()
    return x.cpu()


def sample_prompts(
    transformer,
    prompts: list[tuple[str, torch.Tensor, torch.Tensor]],
    empty: tuple[torch.Tensor, torch.Tensor],
    shape: tuple[int, int, int],
    settings: SampleSettings,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """CFG and APG latents for every validation prompt, same seed: ``{"cfg": [N,C,h,w], "apg": [N,C,h,w]}``.

    ``progress(done, total)``: called with 0 first, then after every transformer evaluation; may raise.
    """
    cond = torch.cat([c if c.dim() == 3 else c[None] for _, c, _ in prompts])
    pooled = torch.cat([p if p.dim() == 2 else p[None] for _, _, p in prompts])
    guidances = ("cfg", "apg")
    total, done = len(guidances) * settings.steps, 0

    def after_eval() -> None:
        nonlocal done
        done += 1
        progress(done, total)

    if progress is not None:
        progress(0, total)
    was_training = transformer.training
    transformer.eval()
    try:
        return {
            g: sample(
                transformer, cond, pooled, empty[0], empty[1], shape, settings, g, after_eval if progress else None
            )
            for g in guidances
        }
    finally:
        transformer.train(was_training)


OnValidation = Callable[[int, int, int], None]  # (training step, evaluations done, evaluations in all); may raise
Decode = Callable[[torch.Tensor], torch.Tensor]  # latents [N,C,h,w] (transformer space) -> images [N,H,W,3] in 0..1
OnImages = Callable[[int, dict[str, torch.Tensor]], None]  # (training step, decoded images per guidance)
Prompts = list[tuple[str, torch.Tensor, torch.Tensor]]  # (prompt, cond, pooled) per validation prompt


class Validation:
    """Validation samples of a training run: every validation prompt of ``source`` with CFG and APG,
    at the size of the source's first sample, decoded and written as PNGs under ``folder``."""

    def __init__(
        self,
        transformer,
        source,
        settings: SampleSettings,
        folder: str | os.PathLike,
        decode: Decode | None = None,
        on_validation: OnValidation | None = None,
        prompts: Prompts | None = None,
        on_images: OnImages | None = None,
    ) -> None:
        self.transformer, self.source, self.settings, self.folder = transformer, source, settings, Path(folder)
        self.decode, self.on_validation, self.on_images = decode, on_validation, on_images
        self.prompts = source.validation_prompts() if prompts is None else prompts
        self.decoded: dict[str, torch.Tensor] = {}  # the latest samples, decoded [N,H,W,3] per guidance
        self.step: int | None = None  # the training step of the latest samples

    def __call__(self, step: int) -> None:
        if not self.prompts:
            return
        hook = self.on_validation
        progress = (lambda done, total: hook(step, done, total)) if hook is not None else None
        first = next(self.source.batches(1, self.settings.seed, 0, drop_last=True))
        shape = tuple(first.latents.shape[1:])
        latents = sample_prompts(
            self.transformer, self.prompts, self.source.empty_text(), shape, self.settings, progress
        )
        self.step = step
        if self.decode is None:
            return
        self.decoded = {g: self.decode(lat) for g, lat in latents.items()}
        for g, images in self.decoded.items():
            save_pngs(images, self.folder, f"step{step:06d}_{g}")
        if self.on_images is not None:
            self.on_images(step, self.decoded)


def save_pngs(images: torch.Tensor, folder: str | os.PathLike, stem: str) -> list[Path]:
    """``folder/<stem>_<i>.png`` for every image of [N,H,W,3] in 0..1, each written atomically."""
    from PIL import Image

    paths = []
    for i, image in enumerate(images):
        path = Path(folder) / f"{stem}_{i:02d}.png"
        with atomic_file(path) as tmp:
            Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype("uint8")).save(tmp, format="PNG")
        paths.append(path)
    return paths
