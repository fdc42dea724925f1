"""The dataset manifest: what travels through the graph as ``SD35_DATASET``.

An ordered list of items, each naming its source image, the crop box in that image (pixel
coordinates after EXIF orientation is applied), the target aspect bucket, the caption and a
few flags. Pixels are never held here: a 2,000-image dataset costs kilobytes in the graph.
It round-trips to ``dataset.jsonl`` (one JSON object per item, after a header line).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ._fs import fs

MANIFEST_VERSION = 1
MANIFEST_NAME = "dataset.jsonl"  # the file name the Save node writes and the loader recognises


@dataclass(frozen=True)
class CropBox:
    """A crop in source-image pixels: left, top, width, height (never corner pairs)."""

    x: int
    y: int
    w: int
    h: int

    def as_ltrb(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.w, self.y + self.h


@dataclass(frozen=True)
class DatasetItem:
    source: str  # absolute path of the source image
    caption: str = ""
    crop: CropBox | None = None  # None: the whole image
    bucket: tuple[int, int] | None = None  # (width, height) the crop is resized to; None: not bucketed yet
    crop_reason: str = ""  # "face" | "saliency" | "centre" | "none" | "" (not cropped)
    repeats: int = 1
    flags: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> DatasetItem:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["crop"] = asdict(self.crop) if self.crop else None
        data["bucket"] = list(self.bucket) if self.bucket else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasetItem:
        crop = data.get("crop")
        bucket = data.get("bucket")
        return cls(
            source=str(data["source"]),
            caption=str(data.get("caption", "")),
            crop=CropBox(**crop) if crop else None,
            bucket=(int(bucket[0]), int(bucket[1])) if bucket else None,
            crop_reason=str(data.get("crop_reason", "")),
            repeats=int(data.get("repeats", 1)),
            flags=dict(data.get("flags", {})),
        )


@dataclass(frozen=True)
class Dataset:
    """An ordered, immutable manifest. Nodes return new Datasets; they never mutate one."""

    items: tuple[DatasetItem, ...]
    root: str = ""  # the folder it was loaded from (informational)
    notes: tuple[str, ...] = ()  # human-readable reports: skipped files, warnings

    def __len__(self) -> int:
        return len(self.items)

    def with_items(self, items: list[DatasetItem] | tuple[DatasetItem, ...], *notes: str) -> Dataset:
        return Dataset(tuple(items), self.root, self.notes + tuple(notes))

    def write_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (``fs.atomic_write_text``)."""
        header = {"sd35_tuner_manifest": MANIFEST_VERSION, "root": self.root, "count": len(self.items)}
        lines = [json.dumps(header)] + [json.dumps(item.to_json(), ensure_ascii=False) for item in self.items]
        fs.atomic_write_text(path, "\n".join(lines) + "\n")

    @classmethod
    def read_jsonl(cls, path: str | os.PathLike[str]) -> Dataset:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        if not lines:
            raise ValueError(f"{path}: empty manifest")
        header = json.loads(lines[0])
        if "sd35_tuner_manifest" not in header:
            raise ValueError(f"{path}: not an SD3.5 Tuner dataset.jsonl (missing header line)")
        items = tuple(DatasetItem.from_json(json.loads(line)) for line in lines[1:] if line.strip())
        return cls(items, root=str(header.get("root", "")))
