"""Aspect-ratio buckets: the set of training sizes and the choice of one per image.

SD3.5 was trained at about one megapixel in several aspect ratios; a dataset keeps most of each
picture when every image goes to the bucket whose aspect is closest to its own. Sides are kept
at multiples of 64 (the VAE downsamples 8x and the MMDiT patchifies 2x, so 16 is the hard
minimum; 64 matches what kohya and SimpleTuner users expect).
"""

from __future__ import annotations

import math
import re

Bucket = tuple[int, int]

# (width, height) at 1024 x 1024 area, landscape and portrait pairs.
SD35_BUCKETS_1024: tuple[Bucket, ...] = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)


def scale_buckets(
    resolution: int, buckets: tuple[Bucket, ...] = SD35_BUCKETS_1024, base: int = 1024, multiple: int = 64
) -> tuple[Bucket, ...]:
    """Scale ``buckets`` (defined at ``base``) to ``resolution``, sides rounded to ``multiple``, duplicates dropped."""
    if resolution < multiple:
        raise ValueError(f"resolution {resolution} is below the bucket multiple {multiple}")
    scale = resolution / base
    out: list[Bucket] = []
    for w, h in buckets:
        sw = max(multiple, math.floor(w * scale / multiple + 0.5) * multiple)
        sh = max(multiple, math.floor(h * scale / multiple + 0.5) * multiple)
        if (sw, sh) not in out:
            out.append((sw, sh))
    return tuple(out)


def parse_buckets(text: str, multiple: int = 64) -> tuple[Bucket, ...]:
    """Parse ``"1024x1024, 1216x832"`` (commas, spaces or new lines between entries).

    Raises ValueError naming the entry that is malformed or not a multiple of ``multiple``.
    """
    entries = [e for e in re.split(r"[\s,;]+", text.strip()) if e]
    if not entries:
        raise ValueError("buckets: empty list; give entries like 1024x1024, 1216x832")
    out: list[Bucket] = []
    for entry in entries:
        m = re.fullmatch(r"(\d+)[x×*](\d+)", entry, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"buckets: '{entry}' is not WIDTHxHEIGHT (e.g. 1216x832)")
        w, h = int(m.group(1)), int(m.group(2))
        if w <= 0 or h <= 0 or w % multiple or h % multiple:
            raise ValueError(f"buckets: '{entry}' sides must be positive multiples of {multiple}")
        if (w, h) not in out:
            out.append((w, h))
    return tuple(out)


def closest_bucket(width: int, height: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket whose aspect ratio is closest to width/height, compared in log space.

    Log space makes 2:1 and 1:2 equally far from 1:1. Ties go to the larger bucket area, then to
    the first listed.
    """
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1]))


def format_buckets(buckets: tuple[Bucket, ...]) -> str:
    return ", ".join(f"{w}x{h}" for w, h in buckets)
