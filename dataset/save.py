"""Write a cropped, bucketed dataset to disk in the layout kohya and SimpleTuner read:
``name.png`` + ``name.txt`` pairs, plus a ``dataset.jsonl`` manifest of what was written.

Everything is first written to a hidden staging folder next to the target and only moved in
(one atomic rename per file, ``fs.publish``) once every image rendered, so a bad source file leaves
no partial output. Existing files are never replaced unless ``overwrite`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ._fs import fs
from .images import Background, render_item
from .manifest import MANIFEST_NAME, Dataset, DatasetItem
from .options import FORMATS


def output_names(dataset: Dataset, ext: str) -> list[str]:
    """A unique file stem per item, from its source name (``_2``, ``_3``... on collisions)."""
    names: list[str] = []
    seen: set[str] = set()
    for item in dataset.items:
        stem = Path(item.source).stem or "image"
        name, n = stem, 1
        while name.lower() in seen:
            n += 1
            name = f"{stem}_{n}"
        seen.add(name.lower())
        names.append(name)
    return names


def save_dataset(
    dataset: Dataset,
    target: str | os.PathLike[str],
    *,
    image_format: str = "png",
    overwrite: bool = False,
    background: Background | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Dataset:
    """Render every item (crop + resize to its bucket) into ``target``; return the saved manifest.

    Raises ValueError naming the files if any would be overwritten and ``overwrite`` is False,
    or naming the source file that failed to render (nothing is left in ``target`` then).
    """
    if image_format not in FORMATS:
        raise ValueError(f"image format '{image_format}' is not one of {', '.join(FORMATS)}")
    if not dataset.items:
        raise ValueError("the dataset is empty: nothing to save")
    target = Path(target)
    fmt, options = FORMATS[image_format]
    stems = output_names(dataset, image_format)
    planned = [f"{s}.{image_format}" for s in stems] + [f"{s}.txt" for s in stems] + [MANIFEST_NAME]
    if target.exists() and not target.is_dir():
        raise ValueError(f"save target {target} exists and is not a folder")
    clashes = [name for name in planned if (target / name).exists()]
    if clashes and not overwrite:
        raise ValueError(
            f"save target {target} already holds {len(clashes)} of the files to write (e.g. {', '.join(clashes[:3])}); "
            "choose another folder name or enable overwrite"
        )
    with fs.temp_folder(target.parent, target.name) as staging:
        saved: list[DatasetItem] = []
        for i, (item, stem) in enumerate(zip(dataset.items, stems, strict=True)):
            image = render_item(item, background)
            image_path = staging / f"{stem}.{image_format}"
            image.save(image_path, fmt, **options)
            (staging / f"{stem}.txt").write_text(item.caption + "\n", encoding="utf-8")
            flags = {**item.flags, "original": item.source}
            if item.crop is not None:
                flags["original_crop"] = [item.crop.x, item.crop.y, item.crop.w, item.crop.h]
            saved.append(
                item.with_(source=str(target.resolve() / image_path.name), crop=None, bucket=image.size, flags=flags)
            )
            if progress is not None:
                progress(i + 1, len(dataset.items))
        result = Dataset(tuple(saved), root=str(target.resolve()), notes=dataset.notes)
        result.write_jsonl(staging / MANIFEST_NAME)
        target.mkdir(exist_ok=True)
        for name in planned:
            fs.publish(staging / name, target / name)
        return result
