"""The CFG-vs-APG comparison node's sampling: one pair at one cfg, or a sweep over several scales.

Every run carries a :class:`apg.sweep.GuidanceMeter` as a post-CFG hook, so the figures report the size
of the guidance update each sampler actually applied next to saturation and brightness.
"""

from __future__ import annotations

from collections.abc import Callable

from comfy_api.latest import io, ui

import nodes as comfy_nodes

UI_KEY = "sd35_apg_compare"  # web/js/apg_compare.js reads the viewer data under this key
SWEEP_EXAMPLE = "1.5, 3, 6, 9"


def sweep_inputs() -> list[io.Input]:
    """The comparison node's sweep control (optional and last, so workflows saved before it still load)."""
    return [
        io.String.Input(
            "sweep_scales",
            default="",
            optional=True,
            tooltip=f"Empty (default): one CFG|APG pair at cfg, with the split slider. Scales such as '{SWEEP_EXAMPLE}' "
            "(each >= 1, at most 8): a sweep, both guidances at every scale, as a grid (rows CFG and APG, columns w) "
            "with each picture's mean saturation, brightness and the size of the guidance update applied. APG at a "
            "given w is much weaker than CFG at the same w: compare pairs of equal update. Two runs per scale.",
        ),
    ]


def metered_sampler(vae, seed, steps, sampler_name, scheduler, positive, negative, latent_image, denoise) -> Callable:
    """``sample(model, scale)`` -> (decoded IMAGE batch, per-image update size), one sampler setup for all runs."""

    def sample(sampling_model, scale: float):
        from ..apg.sweep import GuidanceMeter

        meter = GuidanceMeter()
        metered = sampling_model.clone()
        metered.set_model_sampler_post_cfg_function(meter)
        (latent,) = comfy_nodes.common_ksampler(
            metered, seed, steps, scale, sampler_name, scheduler, positive, negative, latent_image, denoise
        )
        decoded = vae.decode(latent["samples"])
        return decoded.reshape(-1, *decoded.shape[-3:]), meter.mean()

    return sample


def pair(cls, sample, model, apg_model, settings, cfg: float, run: str) -> io.NodeOutput:
    from ..apg.compare import comparison_text, image_figures, side_by_side

    (cfg_image, cfg_update), (apg_image, apg_update) = sample(model, cfg), sample(apg_model, cfg)
    cfg_label = f"CFG w={cfg:g} ({run})"
    apg_label = settings.label(cfg)
    figures = comparison_text(
        image_figures(cfg_image), image_figures(apg_image), cfg_label, apg_label, (cfg_update, apg_update)
    )
    halves = {
        "cfg": ui.ImageSaveHelper.save_images(cfg_image, "sd35_apg_cfg", io.FolderType.temp, cls, 1),
        "apg": ui.ImageSaveHelper.save_images(apg_image, "sd35_apg_apg", io.FolderType.temp, cls, 1),
    }
    shown = {UI_KEY: [{**halves, "cfg_label": cfg_label, "apg_label": apg_label}], "text": [figures]}
    grid = side_by_side(cfg_image, apg_image, cfg_label, apg_label)
    return io.NodeOutput(grid, figures, cfg_image, apg_image, ui=shown)


def sweep(cls, sample, model, apg_model, settings, sweep_scales: str, run: str) -> io.NodeOutput:
    """Both guidances at every scale of ``sweep_scales`` (the first image of each batch goes in the grid)."""
    import torch

    from ..apg.sweep import cells_for, parse_scales, sweep_grid, sweep_text

    rows: dict[str, tuple[list, list]] = {"CFG": ([], []), "APG": ([], [])}
    for scale in parse_scales(sweep_scales):
        for guidance, sampling_model in (("CFG", model), ("APG", apg_model)):
            images, updates = sample(sampling_model, scale)
            rows[guidance][0].append(images[:1])
            rows[guidance][1].extend(cells_for(guidance, scale, images[:1], updates[:1]))
    (cfg_images, cfg_cells), (apg_images, apg_cells) = ((torch.cat(images), cells) for images, cells in rows.values())
    figures = f"{run}\n" + sweep_text(cfg_cells, apg_cells, settings.label())
    grid = sweep_grid(cfg_images, apg_images, cfg_cells, apg_cells)
    save = ui.ImageSaveHelper.save_images
    result = {
        "mode": "sweep",
        "cfg": save(cfg_images, "sd35_apg_sweep_cfg", io.FolderType.temp, cls, 1),
        "apg": save(apg_images, "sd35_apg_sweep_apg", io.FolderType.temp, cls, 1),
        "cells": [vars(cell) for cell in (*cfg_cells, *apg_cells)],
        "cfg_label": "CFG",
        "apg_label": settings.label(),
    }
    return io.NodeOutput(grid, figures, cfg_images, apg_images, ui={UI_KEY: [result], "text": [figures]})
