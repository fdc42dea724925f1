"""apg.compare: saturation / brightness figures and the labelled side-by-side image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from apg.compare import comparison_text, image_figures, labelled_grid, side_by_side


def astronaut(size: int = 96) -> torch.Tensor:
    img = torch.from_numpy(data.astronaut()).float().div(255.0)[None]
    return torch.nn.functional.interpolate(img.permute(0, 3, 1, 2), size=(size, size), mode="area").permute(0, 2, 3, 1)


def test_figures_of_known_colours():
    grey = torch.full((1, 4, 4, 3), 0.5)
    red = torch.zeros(1, 4, 4, 3)
    red[..., 0] = 1.0
    black = torch.zeros(1, 4, 4, 3)
    f = image_figures(torch.cat([grey, red, black]))
    assert f.saturation == pytest.approx([0.0, 1.0, 0.0])
    assert f.brightness == pytest.approx([0.5, 0.2126, 0.0])


def test_desaturating_a_photo_lowers_its_saturation_figure():
    photo = astronaut()
    grey = photo.mean(dim=-1, keepdim=True)
    washed = 0.5 * photo + 0.5 * grey
    f_photo, f_washed = image_figures(photo), image_figures(washed)
    assert 0.2 < f_photo.saturation[0] < 1.0
    assert f_washed.saturation[0] < 0.75 * f_photo.saturation[0]
    text = comparison_text(f_photo, f_washed, "CFG w=5", "APG w=5 eta=0")
    assert "left: CFG w=5" in text and "right: APG w=5 eta=0" in text
    ratio = f_washed.saturation[0] / f_photo.saturation[0]
    assert f"(APG/CFG {ratio:.3f})" in text


def test_side_by_side_puts_each_half_under_its_label():
    left, right = astronaut(64), torch.zeros(1, 64, 64, 3)
    out = side_by_side(left, right, "CFG w=5.0", "APG w=5.0 eta=0.0 r=15 beta=-0.5")
    assert out.ndim == 4 and out.shape[0] == 1 and out.shape[-1] == 3
    band = out.shape[1] - 64
    assert band > 0 and out.shape[2] == 2 * 64 + 4
    assert torch.allclose(out[:, band:, :64], left)
    assert torch.equal(out[:, band:, 68:], right)
    # the caption bands hold rendered text: bright pixels on the dark band, different for the two labels
    left_band, right_band = out[0, :band, :64].numpy(), out[0, :band, 68:].numpy()
    assert (left_band > 0.8).any() and (right_band > 0.8).any()
    assert not np.array_equal(left_band, right_band)


def test_side_by_side_refuses_mismatched_halves():
    with pytest.raises(ValueError, match="differ in shape"):
        side_by_side(torch.zeros(1, 8, 8, 3), torch.zeros(1, 8, 16, 3), "a", "b")
    with pytest.raises(ValueError, match="IMAGE batch"):
        image_figures(torch.zeros(8, 8, 3))


def test_long_labels_wrap_inside_the_band_instead_of_running_off():
    from apg.compare import label_band

    narrow = label_band("CFG w=7 (euler_ancestral/sgm_uniform, 4 steps, seed 42)", 64, 10).float()
    # no glyph touches the right edge: text that did not fit would be cut there
    assert narrow[:, -2:].max() <= 24 + 1
    wide = label_band("CFG w=7 (euler_ancestral/sgm_uniform, 4 steps, seed 42)", 640, 10)
    assert narrow.shape[0] > wide.shape[0]  # more lines when narrow


def test_labelled_grid_puts_each_guidance_in_a_row_and_each_prompt_in_a_column():
    cfg, apg = torch.zeros(2, 32, 48, 3), torch.ones(2, 32, 48, 3)
    cfg[1], apg[1] = 0.25, 0.75  # the second prompt
    grid = labelled_grid({"CFG w=4": cfg, "APG w=4": apg}, ["a cat", "a car"], gap=4)[0]
    assert grid.shape[1] == 2 * 48 + 4
    bottom = grid[-32:]  # the APG row is last, under its label band
    assert torch.all(bottom[:, :48] == 1.0) and torch.all(bottom[:, 52:] == 0.75)
    labels = grid[:-32]
    assert (labels[:, :, 0] > 0.5).any()  # text drawn in the bands above
    with pytest.raises(ValueError, match="every row needs 2 image"):
        labelled_grid({"CFG": cfg[:1]}, ["a cat", "a car"])
