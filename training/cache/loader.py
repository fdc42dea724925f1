"""Read a cache built by ``builder.build_cache``: aspect-bucketed, seeded, shuffled training batches.

What the trainer gets: ``Batch.latents`` already in the space the SD3 transformer trains on,
``(raw - shift_factor) * scale_factor`` (``sd3``; applied here, once; the shards hold raw VAE
output), plus ``cond`` [B, L, 4096] and ``pooled`` [B, 2048] exactly as ComfyUI's SD3 CLIP produced
them. A batch never mixes buckets; items appear ``repeats`` times per epoch; the order depends only on
(seed, epoch) (``data.bucketed_batches``). With mirrored latents cached, each sample picks the original
or the mirror with the same seeded generator; with shuffled-caption variants cached (token shuffle,
kohya's shuffle_caption + keep_tokens), each sample picks the caption or one of its variants.

Opening checks the whole cache before any training step (``check``): every shard path the index lists
is confined to the folder, every shard's size and header are read, and a shard whose file identity
changed since the builder verified it is re-hashed; a problem is refused naming the shard and the
images whose entries it holds.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..data import Batch, bucketed_batches, epoch_rng
from . import store

_META = (
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


class CacheReader:
    """Open a cache folder for training; ValueError naming the file (and what to do) if it cannot be used."""

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir).resolve()
        index_path = self.dir / store.INDEX_NAME
        index = store.read_index(self.dir)
        if index is None:
            raise ValueError(f"{index_path}: no cache here; run the SD3.5 Tuner cache node first")
        if not index.get("complete"):
            raise ValueError(
                f"{index_path}: the cache is incomplete (its last run was interrupted); "
                "run the cache node again to finish it"
            )
        self.index = index
        self.shards = store.mapping(index, "shards")
        self.latents = store.mapping(index, "latents")
        self.texts = store.mapping(index, "texts")
        try:
            self.paths = {rel: store.shard_path(self.dir, rel) for rel in self.shards}
        except ValueError as err:
            raise ValueError(f"{err}. Nothing was read; run the cache node again to rebuild the index") from err
        self.items: list[dict[str, Any]] = self._checked_items(index.get("items"))
        self.meta: dict[str, Any] = {k: index.get(k) for k in _META}
        self.names: dict[str, dict[str, list[int]]] = {}
        self._handles: dict[str, Any] = {}
        self.check()

    def _checked_items(self, items: Any) -> list[dict[str, Any]]:
        """The index's items, if each is well formed and refers only to entries of shards the index lists."""
        where = self.dir / store.INDEX_NAME
        if not isinstance(items, list) or not items:
            raise ValueError(f"{where}: the index lists no items; run the cache node again")
        texts = [self.index.get("empty_text")] + [p[1] for p in self.index.get("validation") or [] if _pair(p)]
        if not all(self._held(self.texts, key) for key in texts):
            raise ValueError(
                f"{where}: the empty caption or a validation prompt is not cached; run the cache node again"
            )
        for i, entry in enumerate(items):
            if not self._item_ok(entry):
                source = entry.get("source") if isinstance(entry, dict) else entry
                raise ValueError(
                    f"{where}: item {i} ({source!r}) is malformed or refers to entries the index does not hold; "
                    "run the cache node again to rebuild the index"
                )
        return items

    def _held(self, table: dict[str, Any], key: Any) -> bool:
        return isinstance(key, str) and table.get(key) in self.shards

    def _item_ok(self, entry: Any) -> bool:
        if not isinstance(entry, dict) or not isinstance(entry.get("repeats"), int) or entry["repeats"] < 1:
            return False
        variants = entry.get("variants") or []
        bucket = entry.get("bucket")
        if not isinstance(variants, list) or not all(_pair(v) for v in variants) or not _pair(bucket, int):
            return False
        latents = [entry.get("latent")] + ([entry.get("latent_flip")] if self.index.get("flip") else [])
        texts = [entry.get("text")] + [v[1] for v in variants]
        return all(self._held(self.latents, k) for k in latents) and all(self._held(self.texts, k) for k in texts)

    def check(self) -> None:
        """Stat every shard; read its header, and its tensors when its file identity changed since the build
        (``store.inspect_shard``). Cheap when nothing changed: one ``stat`` and one header read per shard."""
        for rel, rec in self.shards.items():
            path = self.paths[rel]
            try:
                if not path.is_file():
                    raise ValueError(f"{path}: cache shard is missing")
                info = store.inspect_shard(path, rec if isinstance(rec, dict) else None)
            except (ValueError, OSError) as err:
                raise ValueError(f"{err}{self._holders(rel)}; run the cache node again to re-encode them") from err
            self.names[rel] = info.shapes

    def _holders(self, rel: str) -> str:
        keys = {k for k, r in self.latents.items() if r == rel} | {k for k, r in self.texts.items() if r == rel}
        sources = [
            e["source"]
            for e in self.items
            if keys & {e.get("latent"), e.get("latent_flip"), e.get("text"), *(v[1] for v in e.get("variants", []))}
        ]
        if not sources:
            return ""
        return f" (it holds entries of {len(sources)} image(s), first: {', '.join(map(str, sources[:3]))})"

    def __len__(self) -> int:
        return sum(int(e["repeats"]) for e in self.items)

    # -- tensors ------------------------------------------------------------------------------
    def _tensor(self, rel: str, name: str) -> torch.Tensor:
        from safetensors import safe_open

        handle = self._handles.get(rel)
        if handle is None:
            handle = self._handles[rel] = safe_open(str(self.paths[rel]), framework="pt")
        return handle.get_tensor(name)

    def latent(self, key: str) -> torch.Tensor:
        """The stored (raw VAE) latent [C, h, w] with content key ``key``."""
        return self._tensor(self.latents[key], key).to(torch.float32)

    def embedding(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cond [L, 4096] and pooled [2048] of the text entry ``key``."""
        rel = self.texts[key]
        return self._tensor(rel, f"{key}.cond").to(torch.float32), self._tensor(rel, f"{key}.pooled").to(torch.float32)

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        cond, pooled = self.embedding(self.index["empty_text"])
        return cond[None], pooled[None]

    def validation_prompts(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        out = []
        for prompt, key in self.index["validation"]:
            cond, pooled = self.embedding(key)
            out.append((prompt, cond[None], pooled[None]))
        return out

    # -- batches -----------------------------------------------------------------------------
    def batches(self, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> Iterator[Batch]:
        """One epoch of batches. Each batch holds one bucket; order and flips depend only on (seed, epoch)."""
        rng = epoch_rng(seed, epoch)
        buckets = [tuple(e["bucket"]) for e in self.items]
        plan = bucketed_batches(buckets, [e["repeats"] for e in self.items], batch_size, rng, drop_last)
        shift, scale = float(self.meta["shift_factor"]), float(self.meta["scale_factor"])
        for chunk in plan:
            flips = [bool(self.meta["flip"]) and rng.random() < 0.5 for _ in chunk]
            keys = [self.items[i]["latent_flip" if f else "latent"] for i, f in zip(chunk, flips, strict=True)]
            latents = torch.stack([self.latent(k) for k in keys])
            chosen = [self._pick_caption(self.items[i], rng) for i in chunk]
            texts = [self.embedding(key) for _, key in chosen]
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


def _pair(value: Any, kind: type = str) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, kind) for v in value)
