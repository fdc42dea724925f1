"""Small folders of real photographs (from scikit-image's bundled ``skimage.data``) for tests and demos.

``write_sample_folder`` writes a kohya-style dataset folder: photos with sidecar ``.txt``
captions, one ``N_name`` repeats subfolder, no downloads. ``write_bad_inputs`` writes one file
per kind of broken or awkward input the dataset loader must handle.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# (file name, skimage.data function, caption). astronaut() and camera() show a human face.
SAMPLES = (
    ("astronaut.png", "astronaut", "an astronaut in a white suit in front of the American flag"),
    ("coffee.jpg", "coffee", "a cup of coffee on a saucer"),
    ("rocket.jpg", "rocket", "a rocket on its launch pad"),
    ("2_cats/chelsea.png", "chelsea", "a tabby cat looking to the side"),
    ("camera.png", "camera", "a man with a camera on a tripod"),
)


def photo(name: str) -> np.ndarray:
    """An RGB uint8 array of one of scikit-image's bundled photos."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def write_sample_folder(dest: Path) -> Path:
    """Write the sample photos with their captions under ``dest`` (created); return ``dest``."""
    dest = Path(dest)
    for rel, fn, caption in SAMPLES:
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        arr = photo(fn)
        im = Image.fromarray(arr) if fn != "camera" else Image.fromarray(arr[..., 0], "L")
        im.save(path, quality=95) if path.suffix == ".jpg" else im.save(path)
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return dest


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (pixel data is a 1x1 stub, never decoded)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _jpeg_with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def write_bad_inputs(dest: Path) -> dict[str, Path]:
    """Write one file per awkward input kind under ``dest``; return {kind: path}."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    coffee = photo("coffee")[::4, ::4]  # 100 x 150, small and fast
    out: dict[str, Path] = {}

    def put(kind: str, name: str, data: bytes) -> None:
        out[kind] = dest / name
        out[kind].write_bytes(data)

    def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        return buf.getvalue()

    jpeg = encode(Image.fromarray(coffee), "JPEG", quality=90)
    put("zero_byte", "zero.png", b"")
    put("truncated_jpeg", "truncated.jpg", jpeg[: len(jpeg) // 2])
    put("text_as_png", "notes.png", b"this is a text file, not a picture\n")
    put("cmyk_jpeg", "cmyk.jpg", encode(Image.fromarray(coffee).convert("CMYK"), "JPEG", quality=90))
    gray16 = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    put("png16", "gray16.png", encode(Image.fromarray(gray16), "PNG"))
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 255  # red, left half opaque, right half fully transparent
    rgba[:, :30, 3] = 255
    put("rgba", "rgba.png", encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    put("palette", "palette.png", encode(Image.fromarray(coffee).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"))
    put("bomb", "bomb.png", _png_with_size(20_000, 20_000))
    put("exif_rotated", "rotated.jpg", _jpeg_with_orientation(coffee, 6))
    put("good", "good.jpg", jpeg)
    put("caption_utf16", "good.txt", "café, naïve — ünïcode".encode("utf-16"))
    put("latin1_image", "latin.jpg", jpeg)
    put("caption_latin1", "latin.txt", "café crème".encode("latin-1"))
    put("orphan_caption", "orphan.txt", b"a caption with no image")
    return out
