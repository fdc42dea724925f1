"""Choose, for every image, the crop that goes to its aspect bucket: faces first, then saliency.

Fixes what the seed tutorial's ``detect_utils.py`` got wrong: boxes here are always
(x, y, w, h) and faces come from a real face detector; the crop is the *largest* window of the
bucket's exact aspect that fits in the image (never a fixed 100-px box that is then upscaled
3x), placed to keep the faces (with headroom) or the most saliency inside; windows are placed,
never clipped, so the aspect cannot drift; and the upscale each crop needs is measured and
bounded. Nothing is written anywhere: the result is a new manifest with crop boxes, buckets and
the reason for each choice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .buckets import Bucket, closest_bucket
from .faces import FaceBox, FaceDetector
from .images import image_size, item_background, load_image
from .manifest import CropBox, Dataset, DatasetItem
from .options import MODES, TOO_SMALL
from .saliency import best_window, saliency_map

logger = logging.getLogger(__name__)

# Vertical position of the faces' centre in the crop (0 top, 1 bottom): a little above the
# middle, the usual portrait framing, so there is more body than sky below a head.
FACE_CENTRE_Y = 0.4


@dataclass(frozen=True)
class CropSettings:
    """How crops are chosen. ``headroom`` is the margin kept around each face, as a fraction of
    the face's own size on every side; ``max_upscale`` 0 disables the upscale limit."""

    mode: str = "face_then_saliency"
    headroom: float = 0.5
    max_upscale: float = 1.5
    too_small: str = "skip"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"crop mode '{self.mode}' is not one of {', '.join(MODES)}")
        if self.too_small not in TOO_SMALL:
            raise ValueError(f"too_small '{self.too_small}' is not one of {', '.join(TOO_SMALL)}")
        if self.headroom < 0:
            raise ValueError(f"headroom must be >= 0, got {self.headroom}")
        if self.max_upscale < 0 or 0 < self.max_upscale < 1:
            raise ValueError(f"max_upscale must be 0 (no limit) or >= 1, got {self.max_upscale}")


@dataclass(frozen=True)
class CropPlan:
    box: CropBox | None  # None: the whole image (mode "none")
    bucket: Bucket
    reason: str  # "face" | "saliency" | "centre" | "none"
    upscale: float  # bucket side / crop side (> 1 means the crop is enlarged)
    detail: str = ""


def max_window(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """The largest (w, h) <= the image with exactly the bucket's aspect in whole pixels.

    With the bucket reduced to p:q, the window is (k*p, k*q) for the largest integer k. Only an
    image smaller than p x q itself (e.g. 19 x 13) falls back to the nearest-rounded window.
    """
    bw, bh = bucket
    g = math.gcd(bw, bh)
    p, q = bw // g, bh // g
    k = min(width // p, height // q)
    if k >= 1:
        return k * p, k * q
    if width / height > bw / bh:
        return max(1, min(width, round(height * bw / bh))), height
    return width, max(1, min(height, round(width * bh / bw)))


def _place(lo: float, hi: float, size: int, limit: int, want: float) -> int | None:
    """Start of a window of ``size`` in [0, limit] that contains [lo, hi], as near ``want`` as
    possible; None when [lo, hi] is longer than the window."""
    first, last = max(0.0, hi - size), min(float(limit - size), lo)
    if first > last + 1e-9:
        return None
    return int(round(min(max(want, first), last)))


def _expand(face: FaceBox, headroom: float, width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = face
    return (
        max(0.0, x - headroom * w),
        max(0.0, y - headroom * h),
        min(float(width), x + w + headroom * w),
        min(float(height), y + h + headroom * h),
    )


def place_on_faces(
    width: int, height: int, win: tuple[int, int], faces: list[FaceBox], headroom: float
) -> tuple[CropBox, str] | None:
    """A window holding every face with its headroom if they fit, else the largest face (with as
    much headroom as fits); None if not even the bare largest face fits."""
    cw, ch = win
    largest = max(faces, key=lambda f: f[2] * f[3])
    attempts: list[tuple[list[FaceBox], float, str]] = []
    if len(faces) > 1:
        attempts.append((faces, headroom, f"all {len(faces)} faces"))
    attempts += [([largest], headroom, "largest face" if len(faces) > 1 else "face")]
    attempts += [([largest], headroom * s, f"face, headroom cut to {headroom * s:.2f}") for s in (0.5, 0.25, 0.0)]
    for group, room, detail in attempts:
        boxes = [_expand(f, room, width, height) for f in group]
        x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
        x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
        cx = (min(f[0] for f in group) + max(f[0] + f[2] for f in group)) / 2
        cy = (min(f[1] for f in group) + max(f[1] + f[3] for f in group)) / 2
        x = _place(x1, x2, cw, width, cx - cw / 2)
        y = _place(y1, y2, ch, height, cy - FACE_CENTRE_Y * ch)
        if x is not None and y is not None:
            return CropBox(x, y, cw, ch), detail
    return None


def place_on_saliency(image: Image.Image, win: tuple[int, int]) -> tuple[CropBox, str]:
    """The window of size ``win`` holding the most spectral-residual saliency."""
    width, height = image.size
    sal = saliency_map(image)
    sx, sy = sal.shape[1] / width, sal.shape[0] / height
    mx, my, share = best_window(sal, win[0] * sx, win[1] * sy)
    x = min(max(0, round(mx / sx)), width - win[0])
    y = min(max(0, round(my / sy)), height - win[1])
    return CropBox(x, y, win[0], win[1]), f"{share:.0%} of saliency"


def centre_window(width: int, height: int, win: tuple[int, int]) -> CropBox:
    return CropBox((width - win[0]) // 2, (height - win[1]) // 2, win[0], win[1])


def plan_crop(
    image: Image.Image | None,
    size: tuple[int, int],
    buckets: tuple[Bucket, ...],
    settings: CropSettings,
    detector: FaceDetector | None = None,
) -> CropPlan:
    """Decide one image's crop. ``image`` may be None for modes "centre" and "none"."""
    width, height = size
    bucket = closest_bucket(width, height, buckets)
    if settings.mode == "none":
        upscale = max(bucket[0] / width, bucket[1] / height)
        return CropPlan(None, bucket, "none", upscale, "whole image resized to the bucket")
    win = max_window(width, height, bucket)
    upscale = bucket[0] / win[0]
    if settings.mode == "centre":
        return CropPlan(centre_window(width, height, win), bucket, "centre", upscale)
    if image is None:
        raise ValueError(f"crop mode '{settings.mode}' needs the image pixels")
    if settings.mode == "face_then_saliency" and detector is not None:
        faces = detector(np.asarray(image))
        if faces:
            placed = place_on_faces(width, height, win, faces, settings.headroom)
            if placed is not None:
                return CropPlan(placed[0], bucket, "face", upscale, placed[1])
    box, detail = place_on_saliency(image, win)
    return CropPlan(box, bucket, "saliency", upscale, detail)


def crop_dataset(
    dataset: Dataset,
    buckets: tuple[Bucket, ...],
    settings: CropSettings,
    detector: FaceDetector | None = None,
    detector_missing: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Plan a crop and bucket for every item; return the new manifest (sources untouched).

    Images needing more than ``settings.max_upscale`` are dropped with a note ("skip"), kept and
    flagged ("keep"), or raise ("error"). Raises ValueError naming the files when no item is left.
    ``detector_missing`` is the reason faces cannot be detected; it is logged and noted once.
    """
    if not buckets:
        raise ValueError("no buckets given")
    notes: list[str] = []
    if settings.mode == "face_then_saliency" and detector is None:
        why = detector_missing or "no face detector given"
        notes.append(f"face detection unavailable, saliency used instead: {why}")
        logger.warning("SD3.5 Tuner crop: face detection unavailable, using saliency only: %s", why)
    needs_pixels = settings.mode in ("face_then_saliency", "saliency")
    items: list[DatasetItem] = []
    too_small: list[str] = []
    for i, item in enumerate(dataset.items):
        image = load_image(item.source, item_background(item)) if needs_pixels else None
        size = image.size if image is not None else image_size(item.source)
        plan = plan_crop(image, size, buckets, settings, detector)
        flags = {**item.flags, "size": list(size), "upscale": round(plan.upscale, 4)}
        if plan.detail:
            flags["crop_detail"] = plan.detail
        if settings.max_upscale and plan.upscale > settings.max_upscale + 1e-9:
            crop_desc = f"{plan.box.w}x{plan.box.h} crop" if plan.box else "image"
            message = (
                f"{item.source}: {size[0]}x{size[1]} image ({crop_desc}) needs {plan.upscale:.2f}x upscaling "
                f"for bucket {plan.bucket[0]}x{plan.bucket[1]}, over the {settings.max_upscale:g}x limit"
            )
            if settings.too_small == "error":
                raise ValueError(message + "; lower the resolution, raise max_upscale or remove the image")
            too_small.append(item.source)
            notes.append(message + ("; skipped" if settings.too_small == "skip" else "; kept"))
            if settings.too_small == "skip":
                if progress is not None:
                    progress(i + 1, len(dataset.items))
                continue
            flags["too_small"] = True
        items.append(item.with_(crop=plan.box, bucket=plan.bucket, crop_reason=plan.reason, flags=flags))
        if progress is not None:
            progress(i + 1, len(dataset.items))
    if not items:
        raise ValueError(
            f"every image is too small for the buckets (max upscale {settings.max_upscale:g}x), e.g. "
            f"{too_small[0] if too_small else '?'}; lower the resolution, raise max_upscale or set too_small to keep"
        )
    if too_small:
        notes.insert(0, f"{len(too_small)} image(s) too small for their bucket ({settings.too_small})")
    return dataset.with_items(items, *notes)
