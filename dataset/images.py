"""Read dataset images safely and render manifest items to pixels.

Every loader in the pack goes through ``load_image`` so that all of them agree on what an image
looks like: RGB, EXIF orientation applied (crop boxes in the manifest are in these coordinates),
transparency composited on a chosen background, 16-bit and CMYK data mapped to 8-bit RGB, and a
pixel-count guard so a hostile or accidental 20,000 x 20,000 file cannot exhaust memory. Every
failure is a ``ValueError`` that names the file and says what is wrong with it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .manifest import CropBox, DatasetItem

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# 100 megapixels (e.g. 10,000 x 10,000) is far beyond any training bucket and still fits in memory.
MAX_PIXELS = 100_000_000

Background = tuple[int, int, int]
WHITE: Background = (255, 255, 255)

_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 or 270 degrees


def _open(path: Path, max_pixels: int) -> Image.Image:
    if not path.is_file():
        raise ValueError(f"{path}: not found (or not a file)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes); delete it or replace it with the real image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"{path}: image is too large to load safely ({err}); downscale it first") from err
    except UnidentifiedImageError as err:
        raise ValueError(f"{path}: not a readable image (wrong extension or not an image file)") from err
    except OSError as err:
        raise ValueError(f"{path}: cannot open image: {err}") from err
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ValueError(
            f"{path}: {w}x{h} = {w * h / 1e6:.0f} megapixels exceeds the {max_pixels / 1e6:.0f} megapixel limit "
            "(decompression-bomb guard); downscale the image first"
        )
    return im


def image_size(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only (no pixel decoding)."""
    path = Path(path)
    with _open(path, max_pixels) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - a corrupt EXIF block means "no rotation", as exif_transpose treats it
            orientation = 1
    return (h, w) if orientation in _SWAPS_AXES else (w, h)


def verify_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Decode the whole file cheaply (JPEGs at 1/8 scale) to catch truncation; return image_size.

    Raises the same ValueErrors as ``load_image``. Scaled JPEG decoding still reads every
    entropy-coded byte, so a cut-off file is caught at a fraction of a full decode's cost.
    """
    path = Path(path)
    size = image_size(path, max_pixels)
    try:
        with _open(path, max_pixels) as im:
            if im.format == "JPEG":
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except ValueError:
        raise
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path}: image data is corrupt or truncated ({err}); re-export or remove the file") from err
    return size


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """Map a 16/32-bit integer or float single-channel image to 8-bit L by its full-scale range."""
    arr = np.asarray(im)
    if im.mode == "F":
        scaled = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max(initial=0.0) <= 1.0 else arr / max(arr.max(), 1e-12) * 255
    else:
        full_scale = 65535.0 if arr.max(initial=0) <= 65535 else float(arr.max())
        scaled = arr.astype(np.float64) / full_scale * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image, background: Background = WHITE) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels are composited onto ``background``."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _high_bit_depth_to_l(im)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if im.mode == "RGB":
        return im
    return im.convert("RGB")


def load_image(
    path: str | os.PathLike[str], background: Background = WHITE, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Load ``path`` fully as an RGB image with EXIF orientation applied.

    Raises ``ValueError`` naming the file for: missing or empty files, files that are not images,
    truncated or corrupt data, and images over ``max_pixels`` (checked from the header, before
    any pixel is decoded). Multi-frame files (TIFF, animated WebP) yield their first frame.
    """
    path = Path(path)
    im = _open(path, max_pixels)
    try:
        with im:
            im.load()
            im = ImageOps.exif_transpose(im) or im
            return to_rgb(im, background)
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: image data is corrupt or truncated ({err}); re-export or remove the file") from err


def check_crop(item: DatasetItem, size: tuple[int, int]) -> None:
    """Raise ValueError naming the source if the item's crop box does not lie inside an image of ``size``."""
    crop = item.crop
    if crop is None:
        return
    w, h = size
    if crop.w <= 0 or crop.h <= 0 or crop.x < 0 or crop.y < 0 or crop.x + crop.w > w or crop.y + crop.h > h:
        raise ValueError(
            f"{item.source}: crop box {crop} does not fit inside the {w}x{h} image; "
            "re-run the crop node (the file may have changed since)"
        )


def item_background(item: DatasetItem) -> Background:
    """The colour transparent pixels of this item are composited on (``flags["background"]``, else white)."""
    value = item.flags.get("background")
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (int(value[0]), int(value[1]), int(value[2]))
    return WHITE


def render_item(item: DatasetItem, background: Background | None = None) -> Image.Image:
    """The item's pixels: its crop (whole image if None) resized to its bucket exactly (Lanczos).

    Transparency is composited on ``background``, by default the item's own (``item_background``).

    With ``bucket`` None the crop is returned at its own size. The crop is cut out before resizing
    so the filter never pulls in pixels from outside the box.
    """
    im = load_image(item.source, background or item_background(item))
    check_crop(item, im.size)
    crop = item.crop or CropBox(0, 0, im.width, im.height)
    box = crop.as_ltrb()
    if item.bucket is None:
        return im if crop == CropBox(0, 0, im.width, im.height) else im.crop(box)
    bw, bh = item.bucket
    if bw <= 0 or bh <= 0:
        raise ValueError(f"{item.source}: bucket {item.bucket} must have positive width and height")
    if (bw, bh) == (crop.w, crop.h):
        return im.crop(box)
    reducing_gap = 3.0 if crop.w >= 2 * bw and crop.h >= 2 * bh else None
    return im.crop(box).resize((bw, bh), Image.Resampling.LANCZOS, reducing_gap=reducing_gap)
