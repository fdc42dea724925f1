"""Looks into a latent cache that only tests need (the trainer reads through ``CacheReader.batches``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training import fs
from training.cache import CacheReader, store


def neighbourhood(root: Path, skip: Path) -> dict[str, str]:
    """Every file and link under ``root`` except ``skip``: relative path -> content hash or link target."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) != skip]
        for name in [*files, *(d for d in dirs if Path(folder, d).is_symlink())]:
            p = Path(folder, name)
            out[str(p.relative_to(root))] = f"-> {os.readlink(p)}" if p.is_symlink() else fs.file_sha256(p)
    return out


def raw_latent(reader: CacheReader, item_index: int, flipped: bool = False) -> torch.Tensor:
    """The stored (raw VAE) latent [C, h, w] of item ``item_index``."""
    entry = reader.items[item_index]
    key = entry["latent_flip"] if flipped else entry["latent"]
    assert key is not None, "this cache holds no mirrored latents (it was built with random flip off)"
    return reader.latent(key)


def cached_text(reader: CacheReader, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    """cond [1, L, 4096] and pooled [1, 2048] of a caption or validation prompt; KeyError if not cached."""
    keys = {e["caption"]: e["text"] for e in reader.items} | dict(reader.index["validation"])
    if caption not in keys:
        raise KeyError(f"caption not in the cache: {caption[:80]!r}")
    cond, pooled = reader.embedding(keys[caption])
    return cond[None], pooled[None]


def verify(reader: CacheReader, dataset: Any = None, deep: bool = False) -> None:
    """Every entry present (``deep``: every shard's content re-hashed), and the cache matching ``dataset``:
    same items in the same order, captions, crops, buckets, repeats, unchanged image files."""
    problems: list[str] = []
    for entry in reader.items:
        keys = [("latent", entry["latent"]), ("latent", entry["latent_flip"]), ("text", entry["text"])]
        keys += [("text", key) for _, key in entry.get("variants", [])]
        for kind, key in keys:
            if key is None:
                continue
            rel = (reader.latents if kind == "latent" else reader.texts).get(key)
            if rel is None or (key if kind == "latent" else f"{key}.cond") not in reader.names.get(rel, {}):
                problems.append(f"{entry['source']}: {kind} entry missing")
    if deep:
        for rel in reader.shards:
            try:
                store.inspect_shard(reader.paths[rel], None)
            except ValueError as err:
                problems.append(str(err))
    if dataset is not None:
        problems += _compare(reader, dataset)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"cache {reader.dir} does not match: {shown}. Run the cache node again.")


def _compare(reader: CacheReader, dataset: Any) -> list[str]:
    if len(dataset.items) != len(reader.items):
        return [f"the dataset has {len(dataset.items)} items, the cache {len(reader.items)}"]
    sources = reader.index.get("sources", {})
    problems = []
    for item, entry in zip(dataset.items, reader.items, strict=True):
        crop = list(item.crop.as_ltrb()) if item.crop else None
        bucket = list(item.bucket) if item.bucket else None
        for field, now, cached in (
            ("source", item.source, entry["source"]),
            ("caption", item.caption, entry["caption"]),
            ("crop", crop, entry["crop"]),
            ("bucket", bucket, entry["bucket"]),
            ("repeats", item.repeats, entry["repeats"]),
        ):
            if now != cached:
                problems.append(f"{item.source}: {field} changed")
        rec = sources.get(item.source, {})
        try:
            st = os.stat(item.source)
        except OSError:
            problems.append(f"{item.source}: image vanished")
            continue
        if (st.st_size, st.st_mtime_ns) != (rec.get("size"), rec.get("mtime_ns")) and fs.file_sha256(
            item.source
        ) != rec.get("sha256"):
            problems.append(f"{item.source}: image changed on disk")
    return problems
