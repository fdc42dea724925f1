from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset.images import image_size, load_image, render_item
from dataset.manifest import CropBox, DatasetItem
from tools.sample_data import write_bad_inputs


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("zero_byte", "empty file"),
        ("truncated_jpeg", "truncated"),
        ("text_as_png", "not a readable image"),
        ("bomb", "too large"),
    ],
)
def test_unreadable_files_raise_value_error_naming_the_file(bad: dict[str, Path], kind: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_image(bad[kind])
    assert str(bad[kind]) in str(info.value)


def test_bomb_is_refused_from_the_header_even_below_pillows_own_limit(bad: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="megapixel limit"):
        image_size(bad["good"], max_pixels=100 * 150 - 1)


def test_cmyk_jpeg_becomes_rgb_with_the_same_colours(bad: dict[str, Path]) -> None:
    cmyk = np.asarray(load_image(bad["cmyk_jpeg"]), dtype=np.float64)
    rgb = np.asarray(load_image(bad["good"]), dtype=np.float64)
    assert cmyk.shape == rgb.shape == (100, 150, 3)
    assert np.abs(cmyk - rgb).mean() < 12


def test_16_bit_png_is_scaled_not_clipped(bad: dict[str, Path]) -> None:
    im = np.asarray(load_image(bad["png16"]))
    assert im.dtype == np.uint8 and im.shape == (48, 64, 3)
    assert im[0, 0, 0] == 0 and im[-1, -1, 0] == 255
    # a linear ramp over the full 16-bit range stays a ramp: the middle row is mid-grey
    assert 100 < im[24, 32, 0] < 155


def test_rgba_transparency_is_composited_on_the_chosen_background(bad: dict[str, Path]) -> None:
    im = load_image(bad["rgba"], background=(0, 0, 255))
    assert im.getpixel((5, 5)) == (255, 0, 0)
    assert im.getpixel((55, 5)) == (0, 0, 255)


def test_palette_png_is_rgb(bad: dict[str, Path]) -> None:
    im = load_image(bad["palette"])
    assert im.mode == "RGB" and im.size == (150, 100)


def test_exif_orientation_is_applied_and_size_agrees(bad: dict[str, Path]) -> None:
    assert image_size(bad["exif_rotated"]) == (100, 150)
    assert load_image(bad["exif_rotated"]).size == (100, 150)


def test_render_item_crops_then_resizes_to_the_bucket_exactly(tmp_path: Path) -> None:
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, 100:] = 255  # right half white
    Image.fromarray(arr).save(tmp_path / "a.png")
    item = DatasetItem(str(tmp_path / "a.png"), crop=CropBox(100, 0, 100, 100), bucket=(64, 64))
    out = render_item(item)
    assert out.size == (64, 64) and out.mode == "RGB"
    assert np.asarray(out).min() == 255  # only the white half was used
    assert render_item(item.with_(bucket=None)).size == (100, 100)
    assert render_item(item.with_(crop=None, bucket=None)).size == (200, 100)


def test_render_item_rejects_a_crop_outside_the_image(tmp_path: Path) -> None:
    Image.new("RGB", (50, 50)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="does not fit"):
        render_item(DatasetItem(str(tmp_path / "a.png"), crop=CropBox(10, 10, 50, 50), bucket=(32, 32)))
