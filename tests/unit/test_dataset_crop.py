from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dataset.buckets import SD35_BUCKETS_1024, closest_bucket, parse_buckets, scale_buckets
from dataset.crop import CropSettings, crop_dataset, max_window, plan_crop
from dataset.faces import haar_face_detector
from dataset.manifest import Dataset, DatasetItem
from tools.sample_data import photo

ASTRONAUT_FACE = (177, 66, 95, 95)  # found by OpenCV 4.14's frontal-face cascade (TESTING.md)
CANVASES = [  # canvas (w, h), photo position as a fraction of the free space, bucket
    ((2400, 1000), (0.05, 0.5), (512, 512)),
    ((2400, 1000), (0.95, 0.1), (512, 512)),
    ((1000, 2400), (0.5, 0.9), (512, 512)),
    ((1600, 1200), (0.9, 0.9), (448, 640)),
    ((1200, 1600), (0.1, 0.1), (768, 320)),
]


@pytest.fixture(scope="module")
def detector():
    det, why = haar_face_detector()
    assert det is not None, why
    return det


def paste(name: str, canvas: tuple[int, int], where: tuple[float, float], seed: int = 0):
    arr = photo(name)
    h, w = arr.shape[:2]
    cw, ch = canvas
    ox, oy = int(where[0] * (cw - w)), int(where[1] * (ch - h))
    rng = np.random.default_rng(seed)
    out = np.clip(rng.normal(128, 4, (ch, cw, 3)), 0, 255).astype(np.uint8)
    out[oy : oy + h, ox : ox + w] = arr
    return Image.fromarray(out), (ox, oy, w, h)


def assert_exact_aspect(box, bucket) -> None:
    assert box.w * bucket[1] == box.h * bucket[0], (box, bucket)


def test_default_buckets_and_scaling() -> None:
    assert (1024, 1024) in SD35_BUCKETS_1024 and (640, 1536) in SD35_BUCKETS_1024 and len(SD35_BUCKETS_1024) == 9
    half = scale_buckets(512)
    assert half[0] == (512, 512) and (640, 448) in half
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in half + scale_buckets(768))
    assert scale_buckets(1024) == SD35_BUCKETS_1024


def test_closest_bucket_is_symmetric_in_log_aspect() -> None:
    assert closest_bucket(1000, 1000, SD35_BUCKETS_1024) == (1024, 1024)
    assert closest_bucket(3000, 2000, SD35_BUCKETS_1024) == (1216, 832)
    assert closest_bucket(2000, 3000, SD35_BUCKETS_1024) == (832, 1216)
    assert closest_bucket(5000, 1000, SD35_BUCKETS_1024) == (1536, 640)


def test_parse_buckets_names_the_bad_entry() -> None:
    assert parse_buckets("1024x1024, 1216x832\n832X1216") == ((1024, 1024), (1216, 832), (832, 1216))
    with pytest.raises(ValueError, match="'1000x1000'.*multiples of 64"):
        parse_buckets("1024x1024, 1000x1000")
    with pytest.raises(ValueError, match="'big'"):
        parse_buckets("big")


@pytest.mark.parametrize(
    ("size", "bucket"), [((640, 427), (1216, 832)), ((451, 300), (448, 640)), ((5, 5), (1536, 640))]
)
def test_max_window_keeps_the_exact_aspect_and_fits(size, bucket) -> None:
    w, h = max_window(*size, bucket)
    assert w <= size[0] and h <= size[1]
    if size[0] >= 24:
        assert w * bucket[1] == h * bucket[0]
        assert size[0] - w < bucket[0] // 64 or size[1] - h < bucket[1] // 64  # as large as possible


def test_haar_finds_the_astronauts_face(detector) -> None:
    faces = detector(photo("astronaut"))
    assert len(faces) == 1
    assert np.allclose(faces[0], ASTRONAUT_FACE, atol=4)


@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea"])
def test_no_face_in_photos_without_people(detector, name: str) -> None:
    assert detector(photo(name)) == []


@pytest.mark.parametrize(("canvas", "where", "bucket"), CANVASES)
@pytest.mark.parametrize("headroom", [0.3, 0.8])
def test_face_lies_inside_the_crop_with_the_headroom_asked(detector, canvas, where, bucket, headroom) -> None:
    image, (ox, oy, _, _) = paste("astronaut", canvas, where)
    plan = plan_crop(image, image.size, (bucket,), CropSettings(headroom=headroom, max_upscale=0), detector)
    fx, fy, fw, fh = ASTRONAUT_FACE
    fx, fy = fx + ox, fy + oy
    box = plan.box
    assert plan.reason == "face"
    assert_exact_aspect(box, bucket)
    assert 0 <= box.x and box.x + box.w <= image.width and 0 <= box.y and box.y + box.h <= image.height
    tol = 6  # the detector's box moves a few pixels with the background
    assert box.x <= fx - headroom * fw + tol and fx + fw + headroom * fw - tol <= box.x + box.w
    assert box.y <= max(0, fy - headroom * fh) + tol and fy + fh + headroom * fh - tol <= box.y + box.h


@pytest.mark.parametrize("name", ["coffee", "rocket", "chelsea"])
@pytest.mark.parametrize(("canvas", "where", "bucket"), CANVASES)
def test_saliency_crop_covers_the_pasted_photo(detector, name, canvas, where, bucket) -> None:
    image, (ox, oy, w, h) = paste(name, canvas, where)
    plan = plan_crop(image, image.size, (bucket,), CropSettings(max_upscale=0), detector)
    box = plan.box
    assert plan.reason == "saliency"
    assert_exact_aspect(box, bucket)
    inter = max(0, min(box.x + box.w, ox + w) - max(box.x, ox)) * max(0, min(box.y + box.h, oy + h) - max(box.y, oy))
    assert inter >= 0.95 * min(w * h, box.w * box.h)


def test_saliency_crop_of_the_rocket_photo_contains_the_rocket(detector) -> None:
    image = Image.fromarray(photo("rocket"))  # 640 x 427; the rocket stands at x = 300..330
    plan = plan_crop(image, image.size, ((320, 768),), CropSettings(max_upscale=0), detector)
    assert plan.box.x <= 300 and 330 <= plan.box.x + plan.box.w


def test_centre_mode_is_centred_and_none_mode_keeps_the_whole_image() -> None:
    size = (2400, 1000)
    centre = plan_crop(None, size, ((512, 512),), CropSettings(mode="centre", max_upscale=0))
    assert (centre.box.x, centre.box.y, centre.box.w, centre.box.h) == (700, 0, 1000, 1000)
    none = plan_crop(None, size, ((512, 512),), CropSettings(mode="none", max_upscale=0))
    assert none.box is None and none.reason == "none" and none.bucket == (512, 512)


def test_saliency_mode_ignores_faces(detector) -> None:
    image, _ = paste("astronaut", (2400, 1000), (0.05, 0.5))
    plan = plan_crop(image, image.size, ((512, 512),), CropSettings(mode="saliency", max_upscale=0), detector)
    assert plan.reason == "saliency"


def _dataset(tmp_path, sizes):
    items = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
        items.append(DatasetItem(str(path), caption=f"c{i}"))
    return Dataset(tuple(items), root=str(tmp_path))


def test_upscale_limit_skips_keeps_or_refuses(tmp_path) -> None:
    ds = _dataset(tmp_path, [(600, 400), (200, 150)])
    buckets = scale_buckets(512)
    skipped = crop_dataset(ds, buckets, CropSettings(mode="centre", max_upscale=1.5))
    assert [i.caption for i in skipped.items] == ["c0"]
    assert any("1.png" in n and "skipped" in n for n in skipped.notes)
    assert all(i.flags["upscale"] <= 1.5 for i in skipped.items)
    kept = crop_dataset(ds, buckets, CropSettings(mode="centre", max_upscale=1.5, too_small="keep"))
    assert [i.flags.get("too_small", False) for i in kept.items] == [False, True]
    with pytest.raises(ValueError, match=r"1\.png.*upscaling"):
        crop_dataset(ds, buckets, CropSettings(mode="centre", max_upscale=1.5, too_small="error"))


def test_an_image_smaller_than_every_bucket_is_a_clear_error(tmp_path) -> None:
    ds = _dataset(tmp_path, [(64, 48)])
    with pytest.raises(ValueError, match="every image is too small.*0.png"):
        crop_dataset(ds, SD35_BUCKETS_1024, CropSettings())


def test_crop_dataset_records_boxes_buckets_and_reasons_without_touching_sources(tmp_path, detector) -> None:
    image, _ = paste("astronaut", (1200, 900), (0.5, 0.5))
    image.save(tmp_path / "astro.png")
    Image.fromarray(photo("rocket")).save(tmp_path / "rocket.png")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    ds = Dataset((DatasetItem(str(tmp_path / "astro.png")), DatasetItem(str(tmp_path / "rocket.png"))))
    out = crop_dataset(ds, scale_buckets(512), CropSettings(), detector=detector)
    assert [i.crop_reason for i in out.items] == ["face", "saliency"]
    for item in out.items:
        assert item.bucket in scale_buckets(512)
        assert_exact_aspect(item.crop, item.bucket)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    fallback = crop_dataset(ds, scale_buckets(512), CropSettings(), detector=None, detector_missing="OpenCV 5")
    assert [i.crop_reason for i in fallback.items] == ["saliency", "saliency"]
    assert any("OpenCV 5" in n for n in fallback.notes)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="crop mode 'faces'"):
        CropSettings(mode="faces")
    with pytest.raises(ValueError, match="max_upscale"):
        CropSettings(max_upscale=0.5)


def test_all_faces_are_kept_when_they_fit_else_the_largest() -> None:
    from dataset.crop import place_on_faces

    near = [(100, 100, 60, 60), (220, 110, 80, 80)]
    box, detail = place_on_faces(1000, 400, (400, 400), near, headroom=0.5)
    assert detail == "all 2 faces"
    for x, y, w, h in near:
        assert box.x <= x - 0.5 * w and x + 1.5 * w <= box.x + box.w
        assert box.y <= y - 0.5 * h and y + 1.5 * h <= box.y + box.h
    far = [(50, 100, 60, 60), (800, 100, 100, 100)]
    box, detail = place_on_faces(1000, 400, (400, 400), far, headroom=0.5)
    assert detail == "largest face" and box.x <= 800 - 50 and 800 + 150 <= box.x + box.w


def test_headroom_shrinks_before_a_big_face_is_cut() -> None:
    from dataset.crop import place_on_faces

    box, detail = place_on_faces(1000, 400, (400, 400), [(300, 20, 300, 300)], headroom=0.5)
    assert detail.startswith("face, headroom cut to") and box.x <= 300 and 600 <= box.x + box.w
    assert place_on_faces(1000, 400, (200, 200), [(300, 20, 300, 300)], headroom=0.5) is None


def test_an_injected_detector_drives_the_face_crop() -> None:
    image = Image.new("RGB", (1200, 400), (90, 90, 90))
    plan = plan_crop(image, image.size, ((512, 512),), CropSettings(max_upscale=0), lambda rgb: [(1000, 150, 80, 80)])
    assert plan.reason == "face" and plan.box.x + plan.box.w >= 1080 + 40


@given(
    width=st.integers(64, 6000),
    height=st.integers(64, 6000),
    bucket=st.sampled_from(SD35_BUCKETS_1024 + scale_buckets(512)),
    face=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.02, 0.5)),
    headroom=st.floats(0, 2),
)
@settings(max_examples=300, deadline=None)
def test_face_windows_fit_keep_the_aspect_and_hold_the_face(width, height, bucket, face, headroom) -> None:
    from dataset.crop import place_on_faces

    win = max_window(width, height, bucket)
    assert win[0] <= width and win[1] <= height
    if min(width // (bucket[0] // math.gcd(*bucket)), height // (bucket[1] // math.gcd(*bucket))) >= 1:
        assert win[0] * bucket[1] == win[1] * bucket[0]
    size = max(1, int(face[2] * min(width, height)))
    fx, fy = int(face[0] * (width - size)), int(face[1] * (height - size))
    placed = place_on_faces(width, height, win, [(fx, fy, size, size)], headroom)
    if placed is None:
        assert size > min(win)  # only a face bigger than the window cannot be placed
        return
    box, _ = placed
    assert 0 <= box.x and box.x + box.w <= width and 0 <= box.y and box.y + box.h <= height
    assert (box.w, box.h) == win
    assert box.x <= fx and fx + size <= box.x + box.w and box.y <= fy and fy + size <= box.y + box.h


@given(
    width=st.integers(32, 3000),
    height=st.integers(32, 3000),
    bucket=st.sampled_from(SD35_BUCKETS_1024),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_saliency_windows_stay_inside_the_image(width, height, bucket, seed) -> None:
    from dataset.crop import place_on_saliency

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (max(1, height // 16), max(1, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height))
    win = max_window(width, height, bucket)
    box, _ = place_on_saliency(image, win)
    assert (box.w, box.h) == win
    assert 0 <= box.x and box.x + box.w <= width and 0 <= box.y and box.y + box.h <= height
