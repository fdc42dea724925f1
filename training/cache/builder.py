"""Build or update a latent + text-embedding cache from a dataset manifest.

What: every dataset item's rendered pixels (crop resized to its bucket, optionally also mirrored)
go through the caller's VAE encode; every distinct caption, the empty caption (for caption dropout)
and the validation prompts go through the caller's text encode. Results land in safetensors shards
keyed by content (see ``keys``), and an index maps items to entries.

Why this way: encoding is the expensive part of preparing a run (SD3.5's T5 alone is gigabytes),
so only entries whose key is missing are encoded: an unchanged dataset costs a stat per image and a
header read per shard. The encoders are plain callables, so this module never imports ComfyUI and
unit tests can pass small fakes; the node hands in closures over ComfyUI's VAE and CLIP.

Latents are stored RAW (exactly what the VAE returns). The SD3 shift/scale is applied once, by the
loader (``loader.CacheReader.batches``), so the cached values can be compared with ``vae.encode``.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import fs
from . import store
from .keys import SourceDigests, latent_key, text_key

if TYPE_CHECKING:  # the manifest types, duck-typed at run time (this package never imports another)
    from dataset.manifest import Dataset, DatasetItem

logger = logging.getLogger(__name__)

SD3_LATENT_CHANNELS = 16
SD3_SHIFT_FACTOR = 0.0609
SD3_SCALE_FACTOR = 1.5305
TEXT_DIM = 4096  # SD3 cond width (CLIP-L/G zero-padded to T5's width)
POOLED_DIM = 2048  # CLIP-L 768 + CLIP-G 1280 pooled
MAX_TOKENS = 77  # per text encoder; longer captions are truncated (and reported)
DEFAULT_SHARD_BYTES = 64 << 20
BUCKET_MULTIPLE = 16  # VAE downscale 8 x SD3 patch size 2


@dataclass(frozen=True)
class LatentEncoder:
    """A VAE as callables: ``encode(pixels [B,H,W,3] in 0..1, bucket) -> raw latents [B,C,H/8,W/8]``."""

    identity: str
    encode: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]
    channels: int
    variant: Callable[[tuple[int, int]], str] = lambda bucket: "full"  # part of the key (e.g. tiled encode)
    name: str = "VAE"


@dataclass(frozen=True)
class TextEncoding:
    cond: torch.Tensor  # [1, L, 4096]
    pooled: torch.Tensor  # [1, 2048]
    truncated: bool = False


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder as a callable: ``encode(text) -> TextEncoding`` (tokenize, cap length, encode)."""

    identity: str
    encode: Callable[[str], TextEncoding]
    max_tokens: int = MAX_TOKENS
    name: str = "CLIP"


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
        if self.repaired:
            lines.append(f"repaired {len(self.repaired)} damaged shard(s): {', '.join(self.repaired[:3])}")
        if self.stale_removed:
            lines.append(f"removed {self.stale_removed} stale entr{'y' if self.stale_removed == 1 else 'ies'}")
        return "\n".join(lines)


def _pixels(item: DatasetItem, flip: bool, render: Callable[[DatasetItem], Any]) -> torch.Tensor:
    arr = np.asarray(render(item).convert("RGB"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy())
    return t.flip(1) if flip else t


def _check_dataset(dataset: Dataset, latent: LatentEncoder) -> None:
    if len(dataset) == 0:
        raise ValueError("The dataset is empty: there is nothing to cache. Check the dataset folder and its filters.")
    if latent.channels != SD3_LATENT_CHANNELS:
        raise ValueError(
            f"{latent.name} produces {latent.channels}-channel latents, but SD3/SD3.5 needs a 16-channel VAE "
            "(an SDXL or SD1.5 VAE has 4). Load the SD3 VAE, or the VAE of an SD3/SD3.5 checkpoint."
        )
    for item in dataset.items:
        if item.bucket is None:
            raise ValueError(
                f"{item.source}: item has no bucket; pass the dataset through 'Smart Crop to Buckets' first "
                "(its mode 'none' keeps the whole image)"
            )
        w, h = item.bucket
        if w <= 0 or h <= 0 or w % BUCKET_MULTIPLE or h % BUCKET_MULTIPLE:
            raise ValueError(
                f"{item.source}: bucket {w}x{h} must be positive multiples of {BUCKET_MULTIPLE} px for SD3 "
                "(VAE factor 8 x patch size 2); choose another bucket"
            )
        if item.repeats < 1:
            raise ValueError(f"{item.source}: repeats must be at least 1 (got {item.repeats})")
    missing = [item.source for item in dataset.items if not Path(item.source).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) of the dataset no longer exist (first: {', '.join(missing[:3])}). "
            "Restore them or reload the dataset."
        )


class _Builder:
    def __init__(self, cache_dir: Path, old: dict[str, Any] | None, shard_bytes: int):
        self.dir = cache_dir
        self.shard_bytes = shard_bytes
        self.shards: dict[str, dict[str, Any]] = {}
        self.latents: dict[str, str] = {}  # key -> shard
        self.texts: dict[str, str] = {}
        self.repaired: list[str] = []
        self._load(old or {})

    def _drop(self, rel: str, why: str) -> None:
        logger.warning("SD3.5 Tuner cache: shard %s %s; its entries will be re-encoded", self.dir / rel, why)
        self.repaired.append(f"{rel} ({why})")
        _unlink(self.dir / rel)

    def _load(self, old: dict[str, Any]) -> None:
        """Keep the old index's shards that are intact; adopt whole shards that a killed run never indexed."""
        known = dict(old.get("shards", {}))
        on_disk = {p.relative_to(self.dir).as_posix() for p in self.dir.glob("*/*/**/*.safetensors")}
        for rel in sorted(set(known) | on_disk):
            path = self.dir / rel
            rec = known.get(rel)
            if not path.is_file():
                self._drop(rel, "is missing")
                continue
            try:
                names, meta = store.shard_header(path)
                st = path.stat()
                if rec is not None and st.st_size != rec.get("bytes"):
                    raise ValueError(f"size {st.st_size} != recorded {rec.get('bytes')} bytes")
                if rec is None or st.st_mtime_ns != rec.get("mtime_ns"):
                    sha = fs.file_sha256(path)
                    if rec is not None and sha != rec.get("sha256"):
                        raise ValueError("content hash does not match the index")
                    rec = {"bytes": st.st_size, "sha256": sha, "mtime_ns": st.st_mtime_ns}
                kind = meta.get("kind")
                if kind not in ("latent", "text"):
                    raise ValueError("not a cache shard")
            except (ValueError, OSError) as err:
                self._drop(rel, f"is damaged: {err}")
                continue
            self.shards[rel] = {**rec, "kind": kind, "identity": meta.get("identity", "")}
            target = self.latents if kind == "latent" else self.texts
            for key in store.entry_keys(kind, list(names)):
                target.setdefault(key, rel)

    def write(self, kind: str, identity: str, bucket: tuple[int, int] | None, tensors: dict[str, torch.Tensor]) -> str:
        rel = store.new_shard_path(self.dir, kind, identity, bucket)
        try:
            rec = store.write_shard(self.dir, rel, tensors, {"kind": kind, "identity": identity})
        except OSError as err:
            raise store.write_error(self.dir, err) from err
        self.shards[rel] = rec
        target = self.latents if kind == "latent" else self.texts
        for key in store.entry_keys(kind, list(tensors)):
            target[key] = rel
        return rel

    def write_index(self, body: dict[str, Any]) -> None:
        data = {
            "format": store.FORMAT_NAME,
            "version": store.FORMAT_VERSION,
            **body,
            "shards": self.shards,
            "latents": self.latents,
            "texts": self.texts,
        }
        try:
            store.write_json(self.dir / store.INDEX_NAME, data)
        except OSError as err:
            raise store.write_error(self.dir, err) from err

    def collect_garbage(self, live_latents: set[str], live_texts: set[str]) -> int:
        """Delete entries no item refers to: whole shards are removed, mixed shards rewritten with live entries."""
        from safetensors.torch import load_file

        removed = 0
        for rel in list(self.shards):
            kind = self.shards[rel]["kind"]
            entries, live = (self.latents, live_latents) if kind == "latent" else (self.texts, live_texts)
            keys = [k for k, r in entries.items() if r == rel]
            stale = [k for k in keys if k not in live]
            if keys and not stale:
                continue  # else: stale entries, or only duplicates of entries held by other shards
            removed += len(stale)
            for k in stale:
                del entries[k]
            keep = [k for k in keys if k in live]
            if keep:
                tensors = load_file(str(self.dir / rel))
                names = keep if kind == "latent" else [f"{k}.{p}" for k in keep for p in ("cond", "pooled")]
                parts = rel.split("/")
                bucket = tuple(int(x) for x in parts[2].split("x")) if kind == "latent" else None
                self.write(kind, self.shards[rel]["identity"], bucket, {n: tensors[n] for n in names})
            del self.shards[rel]
            if not _unlink(self.dir / rel):
                continue
            for parent in (self.dir / rel).parents:
                if parent == self.dir or any(parent.iterdir()):
                    break
                parent.rmdir()
        return removed

    def total_bytes(self) -> int:
        return sum(int(s["bytes"]) for s in self.shards.values())


def _unlink(path: Path) -> bool:
    """Delete a shard; a file still open elsewhere (Windows) is left for the next run to collect."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        logger.warning("SD3.5 Tuner cache: could not delete %s (%s); it will be collected next run", path, err)
        return False
    return True


def shuffled_captions(caption: str, variants: int, keep_first: int) -> list[str]:
    """Up to ``variants`` distinct re-orderings of a caption's comma-separated parts, the first ``keep_first``
    parts staying in place (kohya's shuffle_caption / keep_tokens). Deterministic per caption; the caption
    itself is never among them. Encoding them at cache time lets the trainer shuffle without a text encoder.
    """
    parts = [p.strip() for p in caption.split(",") if p.strip()]
    head, tail = parts[:keep_first], parts[keep_first:]
    rng = random.Random(f"sd35-tuner-shuffle:{caption}")
    out: dict[str, None] = {}
    for _ in range(variants * 4):  # a few extra draws, since short tails repeat orders
        if len(out) >= variants:
            break
        order = tail[:]
        rng.shuffle(order)
        text = ", ".join(head + order)
        if text != caption and text != ", ".join(parts):
            out[text] = None
    return list(out)


def _narrow(t: torch.Tensor) -> torch.Tensor:
    """Store float32 values in 16 bits when that is exact (fp16/bf16 encoders), else keep float32."""
    t = t.detach().to("cpu", torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        small = t.to(dtype)
        if torch.equal(small.to(torch.float32), t):
            return small
    return t


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
    progress: Callable[[int, int], None] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> BuildReport:
    """Encode what is missing from the cache at ``cache_dir`` and write its index; return what was done.

    ``render(item) -> PIL.Image`` gives an item's pixels (``dataset.images.render_item``: the crop
    resized to the bucket); only one batch of pixels is in memory at a time.

    ``progress(done, total)`` is called before the first and after every encode; it may raise to
    cancel (work already flushed to shards is kept and indexed, so the next run resumes from it).
    Raises ValueError for bad input (naming the file or field) and ``store.CacheWriteError`` when the
    folder cannot be written; the previous index is never left half-written.
    """
    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    _check_dataset(dataset, latent_encoder)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    validation = [p for p in (s.strip() for s in validation_prompts) if p]
    store.check_writable(cache_dir)
    try:
        old = store.read_index(cache_dir)
    except ValueError as err:
        logger.warning("SD3.5 Tuner cache: %s; rebuilding the index from the shards on disk", err)
        old = None
    store.remove_temp_files(cache_dir)
    b = _Builder(cache_dir, old, shard_bytes)
    sources = SourceDigests((old or {}).get("sources"))
    report = BuildReport(repaired=b.repaired)

    vae_id, te_id, max_tok = latent_encoder.identity, text_encoder.identity, text_encoder.max_tokens
    flips = (False, True) if flip else (False,)
    if shuffle_variants < 0 or keep_first < 0:
        raise ValueError(f"shuffle_variants and keep_first must be >= 0 (got {shuffle_variants}, {keep_first})")
    shuffled: dict[str, list[str]] = {}

    def variants_of(caption: str) -> list[str]:
        if caption not in shuffled:
            shuffled[caption] = shuffled_captions(caption, shuffle_variants, keep_first) if shuffle_variants else []
        return shuffled[caption]

    items_index: list[dict[str, Any]] = []
    wanted_latents: dict[str, tuple[DatasetItem, bool]] = {}
    for item in dataset.items:
        crop = item.crop.as_ltrb() if item.crop else None
        sha = sources.get(item.source)
        keys = []
        for f in flips:
            key = latent_key(sha, crop, item.bucket, f, latent_encoder.variant(item.bucket), vae_id)
            keys.append(key)
            wanted_latents.setdefault(key, (item, f))
        items_index.append(
            {
                "source": item.source,
                "caption": item.caption,
                "crop": list(crop) if crop else None,
                "bucket": list(item.bucket),
                "repeats": item.repeats,
                "latent": keys[0],
                "latent_flip": keys[1] if flip else None,
                "text": text_key(item.caption, te_id, max_tok),
                "variants": [[v, text_key(v, te_id, max_tok)] for v in variants_of(item.caption)],
            }
        )
    variant_texts = [v for e in items_index for v, _ in e["variants"]]
    captions = dict.fromkeys([*(i.caption for i in dataset.items), "", *validation, *variant_texts])
    wanted_texts = {text_key(c, te_id, max_tok): c for c in captions}
    report.images_hashed = sources.hashed

    todo_texts = [(k, c) for k, c in wanted_texts.items() if k not in b.texts]
    todo_latents = [(k, v) for k, v in wanted_latents.items() if k not in b.latents]
    report.texts_reused = len(wanted_texts) - len(todo_texts)
    report.latents_reused = len(wanted_latents) - len(todo_latents)
    total = len(todo_texts) + len(todo_latents)
    done = 0
    if progress:
        progress(0, total)

    body: dict[str, Any] = {
        "complete": False,
        "vae_id": vae_id,
        "text_encoder_id": te_id,
        "sources": sources.records,
    }
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    truncated: dict[str, bool] = {}

    def flush(kind: str, identity: str, bucket: tuple[int, int] | None) -> None:
        nonlocal pending, pending_bytes
        if pending:
            b.write(kind, identity, bucket, pending)
            b.write_index(body)
        pending, pending_bytes = {}, 0

    text_len = None
    phase: tuple[str, str, tuple[int, int] | None] = ("text", te_id, None)
    try:
        for key, caption in todo_texts:
            enc = text_encoder.encode(caption)
            cond, pooled = enc.cond, enc.pooled
            if cond.ndim != 3 or cond.shape[0] != 1 or cond.shape[-1] != TEXT_DIM or pooled.shape[-1] != POOLED_DIM:
                raise ValueError(
                    f"{text_encoder.name} gave cond {tuple(cond.shape)} and pooled {tuple(pooled.shape)}; an SD3 "
                    f"text encoder gives cond [1, L, {TEXT_DIM}] and pooled [1, {POOLED_DIM}]. Load SD3 text encoders "
                    "(TripleCLIPLoader, or CLIPLoader / DualCLIPLoader with type sd3)."
                )
            if not (torch.isfinite(cond).all() and torch.isfinite(pooled).all()):
                raise ValueError(
                    f"{text_encoder.name} produced NaN or infinite values for the caption {caption[:60]!r}: its "
                    "weights are broken or incomplete (e.g. a TripleCLIPLoader slot holding the wrong model). "
                    "Check the text encoder files."
                )
            if text_len is not None and cond.shape[1] != text_len:
                raise ValueError(
                    f"text encoder gave cond length {cond.shape[1]} after {text_len} for {caption[:60]!r}"
                )
            text_len = cond.shape[1]
            truncated[key] = enc.truncated
            pending[f"{key}.cond"] = _narrow(cond[0])
            pending[f"{key}.pooled"] = _narrow(pooled.reshape(-1))
            pending_bytes += cond.numel() * 4
            done += 1
            report.texts_encoded += 1
            if pending_bytes >= shard_bytes:
                flush(*phase)
            if progress:
                progress(done, total)
        flush(*phase)

        by_bucket: dict[tuple[int, int], list[tuple[str, DatasetItem, bool]]] = defaultdict(list)
        for key, (item, f) in todo_latents:
            by_bucket[item.bucket].append((key, item, f))
        for bucket in sorted(by_bucket):
            phase = ("latent", vae_id, bucket)
            todo = by_bucket[bucket]
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                pixels = torch.stack([_pixels(item, f, render) for _, item, f in chunk])
                latents = latent_encoder.encode(pixels, bucket)
                del pixels
                expect = (len(chunk), SD3_LATENT_CHANNELS, bucket[1] // 8, bucket[0] // 8)
                if tuple(latents.shape) != expect:
                    raise ValueError(
                        f"{latent_encoder.name} returned latents {tuple(latents.shape)} for a {bucket[0]}x{bucket[1]} "
                        f"batch; expected {expect}. Use an SD3/SD3.5 VAE."
                    )
                for (key, item, _), lat in zip(chunk, latents, strict=True):
                    if not torch.isfinite(lat).all():
                        raise ValueError(
                            f"{item.source}: {latent_encoder.name} produced NaN or infinite latents. An fp16 VAE "
                            "can overflow: load the VAE in fp32/bf16, or check the VAE file."
                        )
                    pending[key] = _narrow(lat)
                    pending_bytes += lat.numel() * 4
                done += len(chunk)
                report.latents_encoded += len(chunk)
                if pending_bytes >= shard_bytes:
                    flush(*phase)
                if progress:
                    progress(done, total)
            flush(*phase)
    except Exception as err:
        # Cancel or a bad item: keep what was encoded as whole shards so the next run resumes from it.
        if pending and not isinstance(err, OSError):
            try:
                flush(*phase)
            except Exception:  # the original error is the one to report
                logger.warning("SD3.5 Tuner cache: could not save partial work", exc_info=True)
        raise

    b.write_index(body)  # marked incomplete while shards are deleted or rewritten, in case of a kill
    report.stale_removed = b.collect_garbage(set(wanted_latents), set(wanted_texts))
    text_len = text_len or _stored_text_len(cache_dir, b, next(iter(wanted_texts)))
    for entry in items_index:
        entry["truncated"] = bool(truncated.get(entry["text"], _was_truncated(old, entry["text"])))
    buckets: dict[str, int] = defaultdict(int)
    for item in dataset.items:
        buckets[f"{item.bucket[0]}x{item.bucket[1]}"] += item.repeats
    report.items = len(dataset)
    report.with_repeats = sum(i.repeats for i in dataset.items)
    report.buckets = dict(sorted(buckets.items()))
    report.text_len = text_len
    report.truncated = [e["caption"] for e in items_index if e["truncated"]]
    if report.truncated:
        logger.warning("SD3.5 Tuner cache: %d caption(s) truncated to %d tokens", len(report.truncated), max_tok)
    body.update(
        complete=True,
        latent_channels=SD3_LATENT_CHANNELS,
        latent_space="sd3_scaled",
        stored_latents="raw",
        shift_factor=SD3_SHIFT_FACTOR,
        scale_factor=SD3_SCALE_FACTOR,
        text_len=text_len,
        text_dim=TEXT_DIM,
        pooled_dim=POOLED_DIM,
        max_tokens=max_tok,
        flip=flip,
        shuffle_variants=shuffle_variants,
        keep_first=keep_first,
        counts={"items": report.items, "with_repeats": report.with_repeats},
        buckets=report.buckets,
        items=items_index,
        empty_text=text_key("", te_id, max_tok),
        validation=[[p, text_key(p, te_id, max_tok)] for p in validation],
    )
    body["counts"].update(latents=len(wanted_latents), texts=len(wanted_texts))
    b.write_index(body)
    report.bytes = b.total_bytes()
    report.seconds = time.perf_counter() - started
    return report


def _stored_text_len(cache_dir: Path, b: _Builder, key: str) -> int:
    names, _ = store.shard_header(cache_dir / b.texts[key])
    return int(names[f"{key}.cond"]["shape"][0])


def _was_truncated(old: dict[str, Any] | None, key: str) -> bool:
    return any(e.get("text") == key and e.get("truncated") for e in (old or {}).get("items", []))
