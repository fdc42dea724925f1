"""Build or update a latent + text-embedding cache from a dataset manifest.

What: every dataset item's rendered pixels (crop resized to its bucket, optionally also mirrored)
go through the caller's VAE encode; every distinct caption, the empty caption (for caption dropout)
and the validation prompts go through the caller's text encode. Results land in safetensors shards
keyed by content (see ``keys``), and an index maps items to entries.

Why this way: encoding is the expensive part of preparing a run (SD3.5's T5 alone is gigabytes),
so only entries whose key is missing are encoded: an unchanged dataset costs a stat per image and per
shard. The encoders are plain callables (``sd3``), so this module never imports ComfyUI.

``build_cache`` reads top to bottom: check the input, take the folder's lock, load what the folder
holds (``ShardSet``), plan the keys the dataset needs (``plan``), encode the missing texts, then the
missing latents bucket by bucket, collect what is no longer needed, write the complete index.

Latents are stored RAW (exactly what the VAE returns). The SD3 shift/scale is applied once, by the
loader (``loader.CacheReader.batches``), so the cached values can be compared with ``vae.encode``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import fs
from ..folder_lock import folder_lock
from . import store
from .keys import SourceDigests
from .plan import Plan, check_dataset, make_plan
from .sd3 import (
    MAX_TOKENS,
    POOLED_DIM,
    SD3_LATENT_CHANNELS,
    SD3_SCALE_FACTOR,
    SD3_SHIFT_FACTOR,
    TEXT_DIM,
    LatentEncoder,
    TextEncoder,
    check_latents,
    check_text,
    narrow,
)
from .shards import ShardSet

if TYPE_CHECKING:  # the manifest types, duck-typed at run time (this package never imports another)
    from dataset.manifest import Dataset, DatasetItem

logger = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 64 << 20
Progress = Callable[[int, int], None]


@dataclass
class BuildReport:
    items: int = 0
    with_repeats: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    latents_encoded: int = 0
    latents_reused: int = 0
    texts_encoded: int = 0
    texts_reused: int = 0
    text_len: int = 0
    truncated: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    stale_removed: int = 0
    images_hashed: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        buckets = ", ".join(f"{b}: {n}" for b, n in self.buckets.items())
        lines = [
            f"{self.items} items ({self.with_repeats} with repeats) in {len(self.buckets)} bucket(s): {buckets}",
            f"latents: {self.latents_encoded} encoded, {self.latents_reused} reused",
            f"texts: {self.texts_encoded} encoded, {self.texts_reused} reused (cond length {self.text_len})",
            f"cache size: {self.bytes / 2**20:.2f} MiB ({self.bytes} bytes); took {self.seconds:.3f} s",
        ]
        if self.truncated:
            lines.append(
                f"{len(self.truncated)} caption(s) longer than {MAX_TOKENS} tokens were truncated to {MAX_TOKENS} "
                f"tokens per text encoder (first: {self.truncated[0][:80]!r})"
            )
        refused = f"refused {len(self.refused)} index {_entries(len(self.refused))} (left untouched)"
        for present, line in (
            (self.repaired, f"repaired {len(self.repaired)} damaged shard(s): {', '.join(self.repaired[:3])}"),
            (self.refused, f"{refused}: {'; '.join(self.refused[:3])}"),
            (self.stale_removed, f"removed {self.stale_removed} stale {_entries(self.stale_removed)}"),
        ):
            if present:
                lines.append(line)
        return "\n".join(lines)


def _entries(n: int) -> str:
    return "entry" if n == 1 else "entries"


class _ShardWriter:
    """Collects encoded entries of one kind/encoder/bucket; writes them as a shard (and the index, so a
    killed or cancelled run keeps them) whenever ``shard_bytes`` are pending, and at ``flush``."""

    def __init__(self, shards: ShardSet, body: dict[str, Any], shard_bytes: int):
        self.shards, self.body, self.limit = shards, body, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.phase: tuple[str, str, tuple[int, int] | None] = ("text", "", None)

    def start(self, kind: str, identity: str, bucket: tuple[int, int] | None = None) -> None:
        self.flush()
        self.phase = (kind, identity, bucket)

    def add(self, entry: dict[str, torch.Tensor]) -> None:
        """One entry's tensors (a latent, or a text's cond + pooled), always kept in one shard."""
        for name, tensor in entry.items():
            self.pending[name] = narrow(tensor)
            self.size += tensor.numel() * 4
        if self.size >= self.limit:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.shards.write(*self.phase, self.pending)
            self.shards.write_index(self.body)
        self.pending, self.size = {}, 0


def _pixels(item: DatasetItem, flip: bool, render: Callable[[DatasetItem], Any]) -> torch.Tensor:
    arr = np.asarray(render(item).convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy())
    return t.flip(1) if flip else t


def _encode_texts(
    todo: list[tuple[str, str]], encoder: TextEncoder, out: _ShardWriter, report: BuildReport, tick: Callable
) -> tuple[int | None, dict[str, bool]]:
    """Encode captions into text shards; return the cond length and which captions were truncated."""
    text_len, truncated = None, {}
    out.start("text", encoder.identity)
    for key, caption in todo:
        enc = encoder.encode(caption)
        check_text(encoder, enc, caption, text_len)
        text_len, truncated[key] = enc.cond.shape[1], enc.truncated
        out.add({f"{key}.cond": enc.cond[0], f"{key}.pooled": enc.pooled.reshape(-1)})
        report.texts_encoded += 1
        tick(1)
    out.flush()
    return text_len, truncated


def _encode_latents(
    todo: list[tuple[str, tuple[DatasetItem, bool]]],
    encoder: LatentEncoder,
    render: Callable[[DatasetItem], Any],
    batch_size: int,
    out: _ShardWriter,
    report: BuildReport,
    tick: Callable,
) -> None:
    """Encode images bucket by bucket, ``batch_size`` at a time (one batch of pixels in memory)."""
    by_bucket: dict[tuple[int, int], list[tuple[str, DatasetItem, bool]]] = defaultdict(list)
    for key, (item, flip) in todo:
        by_bucket[item.bucket].append((key, item, flip))
    for bucket in sorted(by_bucket):
        out.start("latent", encoder.identity, bucket)
        group = by_bucket[bucket]
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            pixels = torch.stack([_pixels(item, flip, render) for _, item, flip in chunk])
            latents = encoder.encode(pixels, bucket)
            del pixels
            check_latents(encoder, latents, bucket, [item.source for _, item, _ in chunk])
            for (key, _, _), lat in zip(chunk, latents, strict=True):
                out.add({key: lat})
            report.latents_encoded += len(chunk)
            tick(len(chunk))
    out.flush()


def _encode_missing(
    plan: Plan,
    shards: ShardSet,
    out: _ShardWriter,
    encoders: tuple[LatentEncoder, TextEncoder],
    render: Callable[[DatasetItem], Any],
    batch_size: int,
    progress: Progress | None,
    report: BuildReport,
) -> tuple[int | None, dict[str, bool]]:
    """Encode the planned entries the folder lacks. On Cancel or a bad item, what was encoded is written
    as whole shards first, so the next run resumes from it."""
    todo_texts = [(k, c) for k, c in plan.texts.items() if k not in shards.texts]
    todo_latents = [(k, v) for k, v in plan.latents.items() if k not in shards.latents]
    report.texts_reused = len(plan.texts) - len(todo_texts)
    report.latents_reused = len(plan.latents) - len(todo_latents)
    total, done = len(todo_texts) + len(todo_latents), 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    tick(0)
    try:
        encoded = _encode_texts(todo_texts, encoders[1], out, report, tick)
        _encode_latents(todo_latents, encoders[0], render, batch_size, out, report, tick)
    except Exception as err:
        if not isinstance(err, OSError):
            try:
                out.flush()
            except Exception:  # the original error is the one to report
                logger.warning("SD3.5 Tuner cache: could not save partial work", exc_info=True)
        raise
    return encoded


def _complete_index(
    plan: Plan, shards: ShardSet, old: dict[str, Any] | None, encoded: tuple[int | None, dict[str, bool]]
) -> tuple[dict[str, Any], BuildReport]:
    """The index fields that describe a finished cache, and the report's dataset figures."""
    text_len, truncated = encoded
    text_len = text_len or shards.text_len(next(iter(plan.texts)))
    old_truncated = {e.get("text") for e in (old or {}).get("items", []) if isinstance(e, dict) and e.get("truncated")}
    buckets: dict[str, int] = defaultdict(int)
    for entry in plan.items:
        entry["truncated"] = bool(truncated.get(entry["text"], entry["text"] in old_truncated))
        buckets["{}x{}".format(*entry["bucket"])] += entry["repeats"]
    report = BuildReport(
        items=len(plan.items),
        with_repeats=sum(e["repeats"] for e in plan.items),
        buckets=dict(sorted(buckets.items())),
        text_len=text_len,
        truncated=[e["caption"] for e in plan.items if e["truncated"]],
    )
    fields = {
        "complete": True,
        "latent_channels": SD3_LATENT_CHANNELS,
        "latent_space": "sd3_scaled",
        "stored_latents": "raw",
        "shift_factor": SD3_SHIFT_FACTOR,
        "scale_factor": SD3_SCALE_FACTOR,
        "text_len": text_len,
        "text_dim": TEXT_DIM,
        "pooled_dim": POOLED_DIM,
        **plan.options,
        "counts": {
            "items": report.items,
            "with_repeats": report.with_repeats,
            "latents": len(plan.latents),
            "texts": len(plan.texts),
        },
        "buckets": report.buckets,
        "items": plan.items,
        "empty_text": plan.empty_text,
        "validation": plan.validation,
    }
    return fields, report


def build_cache(
    dataset: Dataset,
    cache_dir: str | Path,
    latent_encoder: LatentEncoder,
    text_encoder: TextEncoder,
    *,
    flip: bool = False,
    batch_size: int = 4,
    validation_prompts: Iterable[str] = (),
    shuffle_variants: int = 0,
    keep_first: int = 1,
    render: Callable[[DatasetItem], Any],
    progress: Progress | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> BuildReport:
    """Encode what is missing from the cache at ``cache_dir`` and write its index; return what was done.

    ``render(item) -> PIL.Image`` gives an item's pixels (``dataset.images.render_item``: the crop
    resized to the bucket); only one batch of pixels is in memory at a time.

    ``progress(done, total)`` is called before the first and after every encode; it may raise to
    cancel (work already flushed to shards is kept and indexed, so the next run resumes from it).
    Raises ValueError for bad input (naming the file or field), ``store.CacheWriteError`` when the
    folder cannot be written and ``folder_lock.FolderInUseError`` while another process builds into it; the
    previous index is never left half-written.
    """
    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    check_dataset(dataset, latent_encoder)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    if shuffle_variants < 0 or keep_first < 0:
        raise ValueError(f"shuffle_variants and keep_first must be >= 0 (got {shuffle_variants}, {keep_first})")
    validation = [p for p in (s.strip() for s in validation_prompts) if p]
    store.check_writable(cache_dir)
    with folder_lock(cache_dir, "SD3.5 Tuner cache build"):
        try:
            old = store.read_index(cache_dir)
        except ValueError as err:
            logger.warning("SD3.5 Tuner cache: %s; rebuilding the index from the shards on disk", err)
            old = None
        for folder in (cache_dir, cache_dir / "latents", cache_dir / "texts"):  # only where the cache writes
            fs.remove_stale_temps(folder, recursive=folder != cache_dir, locked=True)
        shards = ShardSet(cache_dir, old)
        sources = SourceDigests(store.mapping(old, "sources"))
        plan = make_plan(
            dataset,
            sources,
            latent_encoder,
            text_encoder,
            flip=flip,
            shuffle_variants=shuffle_variants,
            keep_first=keep_first,
            validation=validation,
        )
        body = {
            "complete": False,
            "vae_id": latent_encoder.identity,
            "text_encoder_id": text_encoder.identity,
            "sources": sources.records,
        }
        work = BuildReport(images_hashed=sources.hashed)
        out = _ShardWriter(shards, body, shard_bytes)
        encoders = (latent_encoder, text_encoder)
        encoded = _encode_missing(plan, shards, out, encoders, render, batch_size, progress, work)
        live = set(plan.latents), set(plan.texts)
        if shards.garbage(*live):
            shards.write_index(body)  # marked incomplete while shards are deleted or rewritten, in case of a kill
        stale = shards.collect_garbage(*live)
        fields, report = _complete_index(plan, shards, old, encoded)
        body.update(fields)
        shards.write_index(body, unless_equal=old)  # nothing changed: no write, no fsync
    if report.truncated:
        logger.warning("SD3.5 Tuner cache: %d caption(s) truncated to %d tokens", len(report.truncated), MAX_TOKENS)
    for name in ("latents_encoded", "latents_reused", "texts_encoded", "texts_reused", "images_hashed"):
        setattr(report, name, getattr(work, name))
    report.repaired, report.refused, report.stale_removed = shards.repaired, shards.refused, stale
    report.bytes = shards.total_bytes()
    report.seconds = time.perf_counter() - started
    return report
