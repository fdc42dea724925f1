"""Contact-sheet tiles of a dataset for checking crops before spending GPU time, and the
reverse: a batch of images (from any node pack) with captions turned into a dataset."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._fs import fs
from .images import item_background, load_image
from .manifest import Dataset, DatasetItem

REASON_COLOURS = {"face": (60, 220, 90), "saliency": (255, 170, 30), "centre": (80, 160, 255), "none": (200, 200, 200)}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def preview_tile(item: DatasetItem, tile: int = 512) -> Image.Image:
    """The source image fitted in a ``tile`` square, outside-of-crop dimmed, the crop box drawn in
    its reason's colour, and reason, bucket and caption written in a strip below."""
    text_h = tile // 4
    canvas = Image.new("RGB", (tile, tile + text_h), (24, 24, 24))
    image = load_image(item.source, item_background(item))
    scale = min(tile / image.width, tile / image.height)
    shown = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    ox, oy = (tile - shown.width) // 2, (tile - shown.height) // 2
    colour = REASON_COLOURS.get(item.crop_reason, (255, 255, 255))
    if item.crop is not None:
        x1, y1 = ox + item.crop.x * scale, oy + item.crop.y * scale
        x2, y2 = x1 + item.crop.w * scale, y1 + item.crop.h * scale
        dim = Image.new("RGB", shown.size, (0, 0, 0))
        mask = Image.new("L", shown.size, 150)
        ImageDraw.Draw(mask).rectangle((x1 - ox, y1 - oy, x2 - ox - 1, y2 - oy - 1), fill=0)
        shown = Image.composite(dim, shown, mask)
    canvas.paste(shown, (ox, oy))
    draw = ImageDraw.Draw(canvas)
    if item.crop is not None:
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colour, width=max(2, tile // 128))
    font_size = max(10, tile // 28)
    bucket = f"{item.bucket[0]}x{item.bucket[1]}" if item.bucket else "no bucket"
    head = f"{Path(item.source).name} | {item.crop_reason or 'uncropped'} | {bucket} | x{item.repeats}"
    draw.text((6, tile + 4), head, fill=colour, font=_font(font_size))
    width_chars = max(10, int(tile / (font_size * 0.55)))
    lines = textwrap.wrap(item.caption or "(no caption)", width_chars)
    max_lines = max(1, (text_h - font_size - 12) // (font_size + 2))
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1][: width_chars - 1] + "…"]
    for i, line in enumerate(lines):
        draw.text((6, tile + 8 + (i + 1) * (font_size + 2)), line, fill=(230, 230, 230), font=_font(font_size))
    return canvas


def preview_page(dataset: Dataset, start: int = 0, count: int = 16, tile: int = 512) -> list[Image.Image]:
    """Tiles for items ``start`` .. ``start + count - 1`` (all the same size)."""
    if not dataset.items:
        raise ValueError("the dataset is empty: nothing to preview")
    if not 0 <= start < len(dataset.items):
        raise ValueError(f"preview start {start} is outside the dataset's {len(dataset.items)} item(s)")
    return [preview_tile(item, tile) for item in dataset.items[start : start + count]]


def split_captions(text: str, count: int) -> list[str]:
    """One caption per non-empty line; a single line applies to every image."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return [""] * count
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"captions: {len(lines)} lines for {count} images; give one line per image, or a single line")
    return lines


def images_to_dataset(images: list[np.ndarray], captions: list[str], folder: str | os.PathLike[str]) -> Dataset:
    """Write each HxWx3 uint8 array as a PNG named by its content hash in ``folder`` (so re-runs
    reuse the same files) and return a dataset of them with ``captions``."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for arr, caption in zip(images, captions, strict=True):
        digest = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()[:16]
        path = folder / f"{digest}.png"
        if not path.exists():
            with fs.atomic_file(path) as tmp:
                Image.fromarray(arr).save(tmp, "PNG")
        h, w = arr.shape[:2]
        items.append(DatasetItem(str(path.resolve()), caption=caption, flags={"size": [w, h]}))
    return Dataset(tuple(items), root=str(folder.resolve()))
