"""A CFG-vs-APG sweep over guidance scales, with the figures that tell which pairs are equally strong.

Comparing two guidance methods at one raw scale flatters whichever is effectively weaker or stronger
("Guidance Matters", ICLR 2026, arXiv 2602.22570): APG's clamp and projection make APG at w much weaker
than CFG at w. So the sweep samples both at several scales from one seed and reports per image its
mean saturation and brightness and the size of the guidance update the sampler actually applied
(RMS of ``D_guided − D_cond`` per latent value, averaged over the steps, from :class:`GuidanceMeter`).
Pairs with equal update size are equally strong; ``matched_pairs`` names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .compare import as_rgb, image_figures, label_band
from .settings import check_scale

__all__ = ["MAX_SCALES", "GuidanceMeter", "SweepCell", "matched_pairs", "parse_scales", "sweep_grid", "sweep_text"]

MAX_SCALES = 8


def parse_scales(text: str) -> list[float]:
    """``"1.5, 3, 6 9"`` -> ``[1.5, 3.0, 6.0, 9.0]``; ValueError naming ``sweep_scales`` for anything else."""
    parts = [p for p in text.replace(",", " ").split() if p]
    if not parts:
        raise ValueError("sweep_scales is empty: give guidance scales separated by commas, e.g. '1.5, 3, 6, 9'")
    scales = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"sweep_scales: {part!r} is not a number; write scales like '1.5, 3, 6, 9'") from None
        if problem := check_scale(value, "sweep_scales"):
            raise ValueError(problem)
        if value < 1.0:
            raise ValueError(f"sweep_scales: {value:g} is below 1 (APG needs cfg >= 1; 1 is unguided)")
        scales.append(value)
    if len(scales) > MAX_SCALES:
        raise ValueError(f"sweep_scales: {len(scales)} scales, at most {MAX_SCALES} (each costs two sampling runs)")
    if len(set(scales)) != len(scales):
        raise ValueError(f"sweep_scales: {text!r} repeats a scale")
    return scales


@dataclass
class GuidanceMeter:
    """A ComfyUI ``sampler_post_cfg_function`` that leaves the prediction alone and records the update's size.

    Called once per model evaluation with the guided prediction (``denoised``) and the conditional one
    (``cond_denoised``): it stores the RMS of their difference per sample. ``mean()`` averages over the
    run. Copies share the record (ComfyUI deep-copies model options when it clones a model).
    """

    rms: list[Tensor] = field(default_factory=list)

    def __copy__(self) -> GuidanceMeter:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> GuidanceMeter:
        return self

    def __call__(self, args: dict[str, Any]) -> Tensor:
        denoised: Tensor = args["denoised"]
        moved = (denoised - args["cond_denoised"]).detach().float().reshape(denoised.shape[0], -1)
        self.rms.append(moved.pow(2).mean(dim=1).sqrt().cpu())
        return denoised

    def mean(self) -> list[float]:
        if not self.rms:
            return []
        return torch.stack(self.rms).mean(dim=0).tolist()


@dataclass(frozen=True)
class SweepCell:
    """The figures of one sampled image: guidance ("CFG"/"APG"), scale and what the picture shows."""

    guidance: str
    scale: float
    saturation: float
    brightness: float
    update: float

    def label(self) -> str:
        return (
            f"{self.guidance} w={self.scale:g}\nsat {self.saturation:.3f} bri {self.brightness:.3f}\n"
            f"update {self.update:.3f}"
        )


def cells_for(guidance: str, scale: float, images: Tensor, updates: list[float]) -> list[SweepCell]:
    """One SweepCell per image of a batch sampled with ``guidance`` at ``scale``."""
    figures = image_figures(images)
    return [
        SweepCell(guidance, scale, s, b, u)
        for s, b, u in zip(figures.saturation, figures.brightness, updates, strict=True)
    ]


def matched_pairs(cfg: list[SweepCell], apg: list[SweepCell]) -> list[tuple[SweepCell, SweepCell]]:
    """For every CFG cell, the APG cell whose applied update is closest in size (equal effective strength)."""
    if not apg:
        return []
    return [(c, min(apg, key=lambda a, c=c: abs(math.log(max(a.update, 1e-12) / max(c.update, 1e-12))))) for c in cfg]


def sweep_text(cfg: list[SweepCell], apg: list[SweepCell], settings_label: str) -> str:
    """A table of every cell's figures, then the pairs of equal update size."""
    lines = [
        f"sweep: rows CFG and {settings_label}; update = RMS of (guided - conditional) prediction, mean over steps",
        f"{'':4} {'w':>6} {'saturation':>10} {'brightness':>10} {'update':>8}",
    ]
    for cell in [*cfg, *apg]:
        lines.append(
            f"{cell.guidance:4} {cell.scale:6g} {cell.saturation:10.4f} {cell.brightness:10.4f} {cell.update:8.4f}"
        )
    lines.append("equal effective strength (closest update): ")
    for c, a in matched_pairs(cfg, apg):
        lines.append(
            f"  CFG w={c.scale:g} ~ APG w={a.scale:g} (update {c.update:.4f} vs {a.update:.4f}; "
            f"saturation {c.saturation:.4f} vs {a.saturation:.4f})"
        )
    return "\n".join(lines)


def sweep_grid(
    cfg_images: Tensor, apg_images: Tensor, cfg: list[SweepCell], apg: list[SweepCell], gap: int = 4
) -> Tensor:
    """Rows CFG and APG, one column per scale, each image under its figures; an IMAGE batch of one picture."""
    rows = (as_rgb(cfg_images), as_rgb(apg_images))
    if rows[0].shape != rows[1].shape or rows[0].shape[0] != len(cfg) or len(cfg) != len(apg):
        raise ValueError(f"sweep rows differ: {tuple(cfg_images.shape)} vs {tuple(apg_images.shape)}")
    columns, height, width, _ = rows[0].shape
    font_size = max(10, width // 16)
    bands = [[label_band(cell.label(), width, font_size).float().div(255.0) for cell in row] for row in (cfg, apg)]
    band_height = max(b.shape[0] for row in bands for b in row)
    cell_height = band_height + height
    out = rows[0].new_ones((2 * cell_height + gap, columns * (width + gap) - gap, 3))
    for r, (images, row_bands) in enumerate(zip(rows, bands, strict=True)):
        top = r * (cell_height + gap)
        for col in range(columns):
            left = col * (width + gap)
            band = row_bands[col]
            out[top : top + band_height, left : left + width] = 24 / 255
            out[top : top + band.shape[0], left : left + width] = band.to(out)
            out[top + band_height : top + cell_height, left : left + width] = images[col]
    return out[None]
