"""Read a cache built by ``builder.build_cache``: aspect-bucketed, seeded, shuffled training batches.

What the trainer gets: ``Batch.latents`` already in the space the SD3 transformer trains on,
``(raw - shift_factor) * scale_factor`` with SD3's 0.0609 / 1.5305 (applied here, once; the shards
hold raw VAE output), plus ``cond`` [B, L, 4096] and ``pooled`` [B, 2048] exactly as ComfyUI's SD3
CLIP produced them. A batch never mixes buckets; items appear ``repeats`` times per epoch; the
order depends only on (seed, epoch). With mirrored latents cached, each sample picks the original
or the mirror with the same seeded generator; with shuffled-caption variants cached (token shuffle,
kohya's shuffle_caption + keep_tokens), each sample picks the caption or one of its variants.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import fs
from . import store

if TYPE_CHECKING:
    from dataset.manifest import Dataset


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, h, w] float32, SD3-scaled
    cond: torch.Tensor  # [B, L, 4096]
    pooled: torch.Tensor  # [B, 2048]
    keys: list[str]  # latent content keys
    captions: list[str]


class CacheReader:
    """Open a cache folder; validates the index and every shard's size and header (errors name the file)."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        index = store.read_index(self.dir)
        if index is None:
            raise ValueError(f"{self.dir / store.INDEX_NAME}: no cache here; run the SD3.5 Tuner cache node first")
        if not index.get("complete"):
            raise ValueError(
                f"{self.dir / store.INDEX_NAME}: the cache is incomplete (its last run was interrupted); "
                "run the cache node again to finish it"
            )
        self.index = index
        self._names: dict[str, dict[str, Any]] = {}
        for rel, rec in index["shards"].items():
            path = self.dir / rel
            if not path.is_file():
                raise ValueError(f"{path}: cache shard is missing; run the cache node again to re-encode it")
            if path.stat().st_size != rec["bytes"]:
                raise ValueError(
                    f"{path}: cache shard is {path.stat().st_size} bytes, the index says {rec['bytes']}; "
                    "run the cache node again to repair it"
                )
            self._names[rel] = store.shard_header(path)[0]
        self.items: list[dict[str, Any]] = index["items"]
        self.meta: dict[str, Any] = {
            k: index.get(k)
            for k in (
                "vae_id",
                "text_encoder_id",
                "latent_channels",
                "latent_space",
                "stored_latents",
                "shift_factor",
                "scale_factor",
                "text_len",
                "text_dim",
                "pooled_dim",
                "max_tokens",
                "flip",
                "shuffle_variants",
                "keep_first",
                "counts",
                "buckets",
            )
        }
        self._handles: dict[str, Any] = {}

    def __len__(self) -> int:
        return sum(int(e["repeats"]) for e in self.items)

    # -- tensors ------------------------------------------------------------------------------
    def _tensor(self, rel: str, name: str) -> torch.Tensor:
        from safetensors import safe_open

        handle = self._handles.get(rel)
        if handle is None:
            handle = self._handles[rel] = safe_open(str(self.dir / rel), framework="pt")
        return handle.get_tensor(name)

    def _latent(self, key: str) -> torch.Tensor:
        return self._tensor(self.index["latents"][key], key).to(torch.float32)

    def _text(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        rel = self.index["texts"][key]
        return self._tensor(rel, f"{key}.cond").to(torch.float32), self._tensor(rel, f"{key}.pooled").to(torch.float32)

    def raw_latent(self, item_index: int, flipped: bool = False) -> torch.Tensor:
        """The stored (raw VAE) latent [C, h, w] of item ``item_index``."""
        entry = self.items[item_index]
        key = entry["latent_flip"] if flipped else entry["latent"]
        if key is None:
            raise ValueError("this cache holds no mirrored latents (it was built with random flip off)")
        return self._latent(key)

    def text(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cond [1, L, 4096] and pooled [1, 2048] of a caption that is in the cache."""
        for entry in self.items:
            if entry["caption"] == caption:
                cond, pooled = self._text(entry["text"])
                return cond[None], pooled[None]
        for prompt, key in self.index["validation"]:
            if prompt == caption:
                cond, pooled = self._text(key)
                return cond[None], pooled[None]
        raise KeyError(f"caption not in the cache: {caption[:80]!r}")

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        cond, pooled = self._text(self.index["empty_text"])
        return cond[None], pooled[None]

    def validation_prompts(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        out = []
        for prompt, key in self.index["validation"]:
            cond, pooled = self._text(key)
            out.append((prompt, cond[None], pooled[None]))
        return out

    # -- checks ------------------------------------------------------------------------------
    def verify(self, dataset: Dataset | None = None, deep: bool = False) -> None:
        """Check that every entry exists (and, with ``deep``, every shard's SHA-256) and that the cache matches
        ``dataset``: same items in the same order, same captions, crops, buckets, repeats, unchanged image files.

        Raises ValueError naming the stale or missing entries and saying to re-run the cache node.
        """
        problems: list[str] = []
        for entry in self.items:
            keys = [("latent", entry["latent"]), ("latent", entry["latent_flip"]), ("text", entry["text"])]
            keys += [("text", key) for _, key in entry.get("variants", [])]
            for kind, key in keys:
                if key is None:
                    continue
                rel = self.index["latents" if kind == "latent" else "texts"].get(key)
                names = self._names.get(rel, {})
                if rel is None or (key if kind == "latent" else f"{key}.cond") not in names:
                    problems.append(f"{entry['source']}: {kind} entry missing")
        if deep:
            for rel, rec in self.index["shards"].items():
                if fs.file_sha256(self.dir / rel) != rec["sha256"]:
                    problems.append(f"{self.dir / rel}: content hash does not match the index")
        if dataset is not None:
            problems += self._compare(dataset)
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"cache {self.dir} does not match: {shown}. Run the cache node again.")

    def _compare(self, dataset: Dataset) -> list[str]:
        if len(dataset.items) != len(self.items):
            return [f"the dataset has {len(dataset.items)} items, the cache {len(self.items)}"]
        sources = self.index.get("sources", {})
        problems = []
        for item, entry in zip(dataset.items, self.items, strict=True):
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

    # -- batches -----------------------------------------------------------------------------
    def batches(self, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> Iterator[Batch]:
        """One epoch of batches. Each batch holds one bucket; order and flips depend only on (seed, epoch)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        rng = random.Random(f"sd35-tuner:{seed}:{epoch}")
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, entry in enumerate(self.items):
            groups[tuple(entry["bucket"])].extend([i] * int(entry["repeats"]))
        plan: list[list[int]] = []
        for bucket in sorted(groups):
            members = groups[bucket]
            rng.shuffle(members)
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                if len(chunk) == batch_size or not drop_last:
                    plan.append(chunk)
        rng.shuffle(plan)
        shift, scale = float(self.meta["shift_factor"]), float(self.meta["scale_factor"])
        for chunk in plan:
            flips = [bool(self.meta["flip"]) and rng.random() < 0.5 for _ in chunk]
            keys = [self.items[i]["latent_flip" if f else "latent"] for i, f in zip(chunk, flips, strict=True)]
            latents = torch.stack([self._latent(k) for k in keys])
            chosen = [self._pick_caption(self.items[i], rng) for i in chunk]
            texts = [self._text(key) for _, key in chosen]
            yield Batch(
                latents=(latents - shift) * scale,
                cond=torch.stack([c for c, _ in texts]),
                pooled=torch.stack([p for _, p in texts]),
                keys=keys,
                captions=[caption for caption, _ in chosen],
            )

    @staticmethod
    def _pick_caption(entry: dict[str, Any], rng: random.Random) -> tuple[str, str]:
        variants = entry.get("variants") or []
        if not variants:
            return entry["caption"], entry["text"]
        caption, key = ([entry["caption"], entry["text"]], *variants)[rng.randrange(len(variants) + 1)]
        return caption, key
