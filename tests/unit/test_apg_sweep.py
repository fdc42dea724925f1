"""apg.sweep: scale parsing, the guidance-update meter, equal-strength pairs and the labelled grid."""

from __future__ import annotations

import copy

import pytest
import torch

from apg.guidance import apply_apg, cfg
from apg.sweep import GuidanceMeter, SweepCell, cells_for, matched_pairs, parse_scales, sweep_grid, sweep_text


def test_scales_parse_with_commas_or_spaces():
    assert parse_scales("1.5, 3,6  9") == [1.5, 3.0, 6.0, 9.0]
    assert parse_scales("7") == [7.0]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty"),
        ("3, x", "'x' is not a number"),
        ("0.5, 3", "below 1"),
        ("nan", "finite"),
        ("inf, 3", "finite"),
        ("1 2 3 4 5 6 7 8 9", "at most 8"),
        ("3, 3", "repeats"),
    ],
)
def test_bad_scales_are_refused_naming_the_input(text, says):
    with pytest.raises(ValueError, match="sweep_scales") as err:
        parse_scales(text)
    assert says in str(err.value)


def _args(seed: int, scale: float, guided) -> dict:
    g = torch.Generator().manual_seed(seed)
    cond, uncond = torch.randn(2, 16, 6, 6, generator=g), torch.randn(2, 16, 6, 6, generator=g)
    return {"denoised": guided(cond, uncond, scale), "cond_denoised": cond, "uncond_denoised": uncond}


def test_meter_passes_the_prediction_through_and_measures_cfg_as_w_minus_1_times_the_difference():
    meter = GuidanceMeter()
    expected = []
    for step in range(3):
        args = _args(step, 4.0, cfg)
        assert meter(args) is args["denoised"]
        diff = (args["cond_denoised"] - args["uncond_denoised"]).reshape(2, -1)
        expected.append(3.0 * diff.pow(2).mean(dim=1).sqrt())
    assert torch.allclose(torch.tensor(meter.mean()), torch.stack(expected).mean(dim=0), rtol=1e-5)
    assert copy.deepcopy(meter) is meter and copy.copy(meter) is meter  # ComfyUI clones keep one record


def test_apg_with_its_clamp_applies_a_smaller_update_than_cfg_at_the_same_scale():
    cfg_meter, apg_meter = GuidanceMeter(), GuidanceMeter()
    for step in range(4):
        cfg_meter(_args(step, 9.0, cfg))
        apg_meter(_args(step, 9.0, lambda c, u, w: apply_apg(c, u, w, eta=0.0, norm_threshold=2.0)))
    assert all(a < c for a, c in zip(apg_meter.mean(), cfg_meter.mean(), strict=True))
    assert GuidanceMeter().mean() == []


def _cell(guidance: str, scale: float, update: float, saturation: float = 0.5) -> SweepCell:
    return SweepCell(guidance, scale, saturation, 0.5, update)


def test_matched_pairs_pick_the_apg_scale_with_the_closest_update():
    cfg_cells = [_cell("CFG", 1.5, 0.05), _cell("CFG", 3, 0.2)]
    apg_cells = [_cell("APG", 3, 0.04), _cell("APG", 6, 0.09), _cell("APG", 9, 0.19)]
    pairs = matched_pairs(cfg_cells, apg_cells)
    assert [(c.scale, a.scale) for c, a in pairs] == [(1.5, 3), (3, 9)]
    text = sweep_text(cfg_cells, apg_cells, "APG eta=0")
    assert "CFG w=3 ~ APG w=9" in text and "rows CFG and APG eta=0" in text
    assert len([line for line in text.splitlines() if line.startswith(("CFG ", "APG "))]) == 5


def test_grid_has_a_row_per_guidance_and_a_column_per_scale_with_each_image_in_place():
    scales = [1.5, 3.0, 6.0]
    cfg_images = torch.stack([torch.full((32, 48, 3), v) for v in (0.1, 0.2, 0.3)])
    apg_images = torch.stack([torch.full((32, 48, 3), v) for v in (0.6, 0.7, 0.8)])
    cfg_cells = [c for w, img in zip(scales, cfg_images, strict=True) for c in cells_for("CFG", w, img[None], [w])]
    apg_cells = [c for w, img in zip(scales, apg_images, strict=True) for c in cells_for("APG", w, img[None], [w])]
    assert cfg_cells[1].saturation == 0.0 and abs(cfg_cells[1].brightness - 0.2) < 1e-6
    grid = sweep_grid(cfg_images, apg_images, cfg_cells, apg_cells)
    assert grid.shape[0] == 1 and grid.shape[2] == 3 * 48 + 2 * 4
    half = (grid.shape[1] - 4) // 2
    for row, images in enumerate((cfg_images, apg_images)):
        bottom = row * (half + 4) + half
        for col in range(3):
            cell = grid[0, bottom - 32 : bottom, col * 52 : col * 52 + 48]
            assert torch.allclose(cell, images[col])
        band = grid[0, row * (half + 4) : bottom - 32, :48]
        assert band.std() > 0.05  # the figures are written above each picture
    with pytest.raises(ValueError, match="rows differ"):
        sweep_grid(cfg_images, apg_images[:2], cfg_cells, apg_cells[:2])
