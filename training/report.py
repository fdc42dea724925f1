"""A loss chart as an RGB image (no plotting library): raw losses faint, their moving average bold."""

from __future__ import annotations

import numpy as np


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def loss_chart(losses: list[float], width: int = 512, height: int = 256) -> np.ndarray:
    """uint8 [height, width, 3]; step on x, loss on y (range from the data), with min/max/last labels."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 48, width - 8, 8, height - 20
    draw.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    finite = [v for v in losses if np.isfinite(v)]
    if not finite:
        draw.text((left + 8, top + 8), "no loss yet", fill=(0, 0, 0))
        return np.asarray(image)
    lo, hi = min(finite), max(finite)
    span = hi - lo or 1.0

    def point(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(len(losses) - 1, 1))
        return x, bottom - (bottom - top) * ((v - lo) / span)

    raw = [point(i, v) for i, v in enumerate(losses) if np.isfinite(v)]
    smooth = [point(i, v) for i, v in enumerate(moving_average(finite, max(1, len(finite) // 20)))]
    if len(raw) > 1:
        draw.line(raw, fill=(170, 200, 240), width=1)
        draw.line(smooth, fill=(20, 60, 160), width=2)
    draw.text((2, top), f"{hi:.3g}", fill=(0, 0, 0))
    draw.text((2, bottom - 10), f"{lo:.3g}", fill=(0, 0, 0))
    draw.text((left, bottom + 4), f"step 1-{len(losses)}   last {losses[-1]:.4g}", fill=(0, 0, 0))
    return np.asarray(image)
