"""The builder's view of a cache folder's shards: which are intact, and which shard holds each entry.

Loading trusts nothing (see ``store``): index entries that are not shard paths inside the folder are
refused and left untouched; shards that are missing, truncated or whose content no longer matches
their hash are deleted (they are inside the folder) and their entries re-encoded; whole shards that a
killed run wrote but never indexed are adopted. Garbage collection deletes entries no item needs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from . import store

logger = logging.getLogger(__name__)


def _unlink(path: Path) -> bool:
    """Delete a shard; a file still open elsewhere (Windows) is left for the next run to collect."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        logger.warning("SD3.5 Tuner cache: could not delete %s (%s); it will be collected next run", path, err)
        return False
    return True


class ShardSet:
    def __init__(self, cache_dir: Path, old: dict[str, Any] | None):
        self.dir = cache_dir.resolve()
        self.shards: dict[str, dict[str, Any]] = {}  # rel -> index record
        self.shapes: dict[str, dict[str, list[int]]] = {}  # rel -> tensor name -> shape
        self.latents: dict[str, str] = {}  # key -> rel
        self.texts: dict[str, str] = {}
        self.repaired: list[str] = []
        self.refused: list[str] = []
        self._load(store.mapping(old, "shards"))

    def _load(self, known: dict[str, Any]) -> None:
        on_disk = {p.relative_to(self.dir).as_posix() for p in self.dir.glob("*/*/**/*.safetensors")}
        for rel in sorted(set(known) | on_disk):
            try:
                path = store.shard_path(self.dir, rel)
            except ValueError as err:
                logger.warning("SD3.5 Tuner cache: %s; left untouched and dropped from the index", err)
                self.refused.append(str(err))
                continue
            rec = known.get(rel)
            try:
                if not path.is_file():
                    self._drop(rel, path, "is missing")
                    continue
                info = store.inspect_shard(path, rec if isinstance(rec, dict) else None)
            except (ValueError, OSError) as err:
                self._drop(rel, path, f"is damaged: {str(err).replace(f'{path}: ', '')}")
                continue
            self.shards[rel] = info.record
            self.shapes[rel] = info.shapes
            target = self.latents if info.kind == "latent" else self.texts
            for key in store.entry_keys(info.kind, info.shapes):
                target.setdefault(key, rel)

    def _drop(self, rel: str, path: Path, why: str) -> None:
        logger.warning("SD3.5 Tuner cache: shard %s %s; its entries will be re-encoded", path, why)
        self.repaired.append(f"{rel} ({why})")
        _unlink(path)

    def write(self, kind: str, identity: str, bucket: tuple[int, int] | None, tensors: dict[str, torch.Tensor]) -> str:
        rel = store.new_shard_path(kind, identity, bucket)
        try:
            rec = store.write_shard(self.dir, rel, tensors, {"kind": kind, "identity": identity})
        except OSError as err:
            raise store.write_error(self.dir, err) from err
        self.shards[rel] = rec
        self.shapes[rel] = {name: list(t.shape) for name, t in tensors.items()}
        target = self.latents if kind == "latent" else self.texts
        for key in store.entry_keys(kind, tensors):
            target[key] = rel
        return rel

    def write_index(self, body: dict[str, Any], unless_equal: dict[str, Any] | None = None) -> None:
        """Write the index atomically; not at all if it would equal ``unless_equal`` (an unchanged cache)."""
        data = {
            "format": store.FORMAT_NAME,
            "version": store.FORMAT_VERSION,
            **body,
            "shards": self.shards,
            "latents": self.latents,
            "texts": self.texts,
        }
        if data == unless_equal:
            return
        try:
            store.write_json(self.dir / store.INDEX_NAME, data)
        except OSError as err:
            raise store.write_error(self.dir, err) from err

    def text_len(self, key: str) -> int:
        return int(self.shapes[self.texts[key]][f"{key}.cond"][0])

    def garbage(self, live_latents: set[str], live_texts: set[str]) -> list[tuple[str, list[str], list[str]]]:
        """(shard, its keys, the stale ones) of every shard holding stale entries, or only duplicates of
        entries held by other shards."""
        found = []
        for rel, rec in self.shards.items():
            entries, live = (self.latents, live_latents) if rec["kind"] == "latent" else (self.texts, live_texts)
            keys = [k for k, r in entries.items() if r == rel]
            stale = [k for k in keys if k not in live]
            if stale or not keys:
                found.append((rel, keys, stale))
        return found

    def collect_garbage(self, live_latents: set[str], live_texts: set[str]) -> int:
        """Delete entries no item refers to: whole shards are removed, mixed shards rewritten with live entries."""
        from safetensors.torch import load_file

        removed = 0
        for rel, keys, stale in self.garbage(live_latents, live_texts):
            kind = self.shards[rel]["kind"]
            entries, live = (self.latents, live_latents) if kind == "latent" else (self.texts, live_texts)
            removed += len(stale)
            for k in stale:
                del entries[k]
            parts = rel.split("/")  # a layout path (store.shard_path checked it when it was loaded)
            keep = [k for k in keys if k in live]
            if keep:
                tensors = load_file(str(self.dir / rel))
                names = keep if kind == "latent" else [f"{k}.{p}" for k in keep for p in ("cond", "pooled")]
                bucket = tuple(int(x) for x in parts[2].split("x")) if kind == "latent" else None
                self.write(kind, self.shards[rel]["identity"], bucket, {n: tensors[n] for n in names})
            del self.shards[rel]
            del self.shapes[rel]
            if _unlink(self.dir / rel):
                self._remove_empty_folders(parts)
        return removed

    def _remove_empty_folders(self, parts: list[str]) -> None:
        """rmdir the shard's now empty parent folders, deepest first, never above the cache folder."""
        for depth in range(len(parts) - 1, 0, -1):
            folder = self.dir.joinpath(*parts[:depth])
            if folder.is_symlink() or not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()

    def total_bytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.shards.values())
