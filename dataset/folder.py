"""Scan a folder of images and sidecar captions into a Dataset manifest.

Layout understood: ``name.png`` + ``name.txt`` (or ``name.caption``) pairs, optionally in
kohya-style ``N_concept`` subfolders whose numeric prefix is the repeat count. A bad file in a
large folder is reported in the manifest's notes and skipped, so one broken download does not
stop a 2,000-image run; ``strict=True`` turns the first problem into an error instead.

Links: a symlinked image, caption or manifest is followed only when its real path stays inside the
allowed folders (the dataset folder itself by default; the node passes ComfyUI's input and output
folders); any other is skipped with a note naming it (refused in strict mode) and never read.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from ._fs import fs
from .images import IMAGE_EXTENSIONS, MAX_PIXELS, WHITE, Background, image_size, verify_image
from .manifest import MANIFEST_NAME, Dataset, DatasetItem
from .options import CAPTION_EXTENSIONS

logger = logging.getLogger(__name__)

_KOHYA_REPEATS = re.compile(r"^(\d+)_(.+)$")

Progress = Callable[[int, int], None]


def read_caption(path: str | os.PathLike[str]) -> str:
    """Read a caption file, whatever its encoding: UTF-8 (with or without BOM), UTF-16 (BOM or
    NUL-byte pattern), else Windows-1252/Latin-1, which decode any byte. Whitespace is trimmed."""
    data = Path(path).read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16")
    elif data.startswith(b"\xef\xbb\xbf"):
        text = data[3:].decode("utf-8", errors="replace")
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if len(data) >= 2 and len(data) % 2 == 0 and data.count(0) >= len(data) // 4:
                # BOM-less UTF-16: ASCII text has a NUL in every other byte
                text = data.decode("utf-16-le" if data[1] == 0 else "utf-16-be", errors="replace")
            else:
                try:
                    text = data.decode("cp1252")
                except UnicodeDecodeError:
                    text = data.decode("latin-1")
    return text.replace("\x00", "").strip()


def kohya_repeats(path: Path, root: Path) -> int | None:
    """The repeat count from the nearest ``N_name`` folder between ``root`` (inclusive) and ``path``."""
    for parent in [*path.relative_to(root).parents][:-1] + [Path(".")]:
        folder = (root / parent).name if parent != Path(".") else root.name
        m = _KOHYA_REPEATS.match(folder)
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
    return None


def _caption_for(image: Path, caption_exts: tuple[str, ...]) -> Path | None:
    for ext in caption_exts:
        candidate = image.with_suffix(ext)
        if candidate.is_file():
            return candidate
    return None


def _outside(path: Path, allowed: Sequence[fs.StrPath]) -> str | None:
    """A note naming ``path`` if it is a link whose target lies outside ``allowed``, else None."""
    if fs.is_inside(path, list(allowed)):
        return None
    return f"{path}: a link to {path.resolve()}, outside the allowed folders; skipped, never read"


def _saved_repeats(root: Path, allowed: Sequence[fs.StrPath]) -> dict[str, int]:
    """Repeats by file name from a ``dataset.jsonl`` our Save node wrote in ``root`` (the flat
    saved layout has no kohya folders to carry them); empty if there is none or it is unreadable."""
    path = root / MANIFEST_NAME
    if not path.is_file():
        return {}
    if note := _outside(path, allowed):
        logger.warning("%s", note)
        return {}
    try:
        saved = Dataset.read_jsonl(path)
    except (ValueError, KeyError, TypeError, OSError) as err:
        logger.warning("%s: ignored (%s)", path, err)
        return {}
    return {Path(item.source).name: item.repeats for item in saved.items if Path(item.source).parent == root.resolve()}


def _visible_files(root: Path, recursive: bool) -> list[Path]:
    """Files under ``root`` (no hidden file or folder), sorted by relative path."""
    found = (
        p
        for p in root.glob("**/*" if recursive else "*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def scan_folder(
    root: str | os.PathLike[str],
    *,
    recursive: bool = True,
    repeats: int = 0,
    caption_exts: tuple[str, ...] = CAPTION_EXTENSIONS,
    strict: bool = False,
    max_pixels: int = MAX_PIXELS,
    verify: bool = True,
    background: Background = WHITE,
    progress: Progress | None = None,
    allowed: Sequence[fs.StrPath] | None = None,
) -> Dataset:
    """Build a manifest from the images under ``root``, sorted by relative path.

    Each image is checked here (size, EXIF orientation, bomb guard and, with ``verify``, a cheap
    full decode that catches truncation) so bad files are found now rather than mid-training.
    ``repeats`` > 0 sets every item's repeat count; 0 takes it from a kohya ``N_name`` folder, else
    from a ``dataset.jsonl`` our Save node left in ``root``, else 1. ``allowed``: the folders links
    may lead into (default ``root``). ``background`` is recorded per item for compositing
    transparent images later (``render_item``). Raises ValueError
    if the folder is missing or holds no usable image, or (``strict``) on the first bad file or
    caption without an image.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist or is not a folder")
    allowed = [root] if allowed is None else list(allowed)
    files = _visible_files(root, recursive)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    saved_repeats = _saved_repeats(root, allowed)
    image_stems = {p.with_suffix("") for p in images}
    notes: list[str] = []

    def problem(message: str) -> None:
        if strict:
            raise ValueError(message + " (strict mode: fix or remove the file, or turn strict off to skip it)")
        logger.warning("%s", message)
        notes.append(message)

    for orphan in (p for p in files if p.suffix.lower() in caption_exts and p.with_suffix("") not in image_stems):
        problem(f"{orphan}: caption file has no image next to it")

    items: list[DatasetItem] = []
    for i, path in enumerate(images):
        try:
            caption_path = _caption_for(path, caption_exts)
            if note := _outside(path, allowed) or (caption_path and _outside(caption_path, allowed)):
                raise ValueError(note)
            size = verify_image(path, max_pixels) if verify else image_size(path, max_pixels)
            caption = read_caption(caption_path) if caption_path else ""
        except (ValueError, OSError) as err:
            problem(f"skipped: {err}" if isinstance(err, ValueError) else f"skipped: {path}: {err}")
        else:
            n = repeats if repeats > 0 else (kohya_repeats(path, root) or saved_repeats.get(path.name, 1))
            flags = {"size": list(size)}
            if caption_path is None:
                flags["no_caption"] = True
            if background != WHITE:
                flags["background"] = list(background)
            items.append(DatasetItem(source=str(path.resolve()), caption=caption, repeats=n, flags=flags))
        if progress is not None:
            progress(i + 1, len(images))

    skipped = len(images) - len(items)
    if not items:
        detail = f"; {skipped} bad file(s), first: {notes[0]}" if skipped else ""
        raise ValueError(
            f"dataset folder {root} has no usable image (looked for {', '.join(IMAGE_EXTENSIONS)}"
            f"{', recursively' if recursive else ''}){detail}"
        )
    if skipped:
        notes.insert(0, f"{skipped} of {len(images)} image file(s) skipped as unreadable")
    return Dataset(tuple(items), root=str(root.resolve()), notes=tuple(notes))
