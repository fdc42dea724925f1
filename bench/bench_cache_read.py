"""Cache reader: what the content check costs next to reading one epoch (target: < 2% of the epoch's read time).

A cache of N images (default 1,000 at 1024x1024: 16x128x128 latents, 77x4096 text embeddings, fp16,
~1.1 GB) is built with fake encoders, then timed on this machine:

- the check every ``CacheReader`` runs when it opens (``check``: per shard a stat, a header read, and a
  re-hash only if the file's identity changed since the build; nothing changed here, as in a normal run);
- the same check when every shard changed identity (a copied or synced folder: every shard re-hashed);
- one epoch of batches (``batches``, batch 4), the trainer's read of the whole cache.

    ~/.cache/sd35-tuner/venv/bin/python -m bench.bench_cache_read [--images 1000] [--size 1024]

Last line: the open check's time / one epoch's read time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from dataset.manifest import Dataset, DatasetItem
from training.cache import CacheReader, LatentEncoder, TextEncoder, TextEncoding, build_cache, store


def fake_cache(root: Path, images: int, size: int, text_len: int) -> Path:
    """``images`` items with distinct captions; latents and embeddings random but exact in fp16."""
    sources = root / "images"
    sources.mkdir()
    items = []
    for i in range(images):
        path = sources / f"{i:05d}.png"
        path.write_bytes(i.to_bytes(4, "little"))
        items.append(DatasetItem(str(path), f"photo {i}", None, (size, size)))
    g = torch.Generator().manual_seed(0)

    def encode_latents(pixels: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
        return torch.randn(pixels.shape[0], 16, bucket[1] // 8, bucket[0] // 8, generator=g).half().float()

    def encode_text(text: str) -> TextEncoding:
        return TextEncoding(
            torch.randn(1, text_len, 4096, generator=g).half().float(),
            torch.randn(1, 2048, generator=g).half().float(),
        )

    cache = root / "cache"
    build_cache(
        Dataset(tuple(items)),
        cache,
        LatentEncoder("bench-vae", encode_latents, 16),
        TextEncoder("bench-te", encode_text),
        render=lambda item: Image.new("RGB", (1, 1)),
        batch_size=8,
    )
    return cache


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=1024, help="bucket side in pixels (latents are 1/8)")
    parser.add_argument("--text-len", type=int, default=77, help="cond length (154 with T5)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = fake_cache(Path(tmp), args.images, args.size, args.text_len)
        reader = CacheReader(cache)
        gib = sum(int(r["bytes"]) for r in reader.shards.values()) / 2**30

        def epoch() -> None:
            for _ in reader.batches(4, seed=0, epoch=0, drop_last=False):
                pass

        def rehash_all() -> None:
            for path in reader.paths.values():
                store.inspect_shard(path, None)

        epoch()  # page cache warm, shards opened
        read = best_of(args.runs, epoch)
        check = best_of(args.runs, reader.check)
        full = best_of(1, rehash_all)
        for path in list(reader.paths.values())[:1]:
            os.utime(path)  # one shard touched: its next check re-hashes it
        one = best_of(1, reader.check)
    print(f"cache: {args.images} images at {args.size}px, {len(reader.shards)} shards, {gib:.2f} GiB, CPU 1 thread")
    print(f"one epoch read (batch 4):        {read:.3f} s")
    print(f"open check, nothing changed:     {check:.4f} s")
    print(f"open check, one shard touched:   {one:.4f} s")
    print(f"every shard re-hashed:           {full:.3f} s ({full / read:.3f} of an epoch read)")
    print(f"ratio open check / epoch read: {check / read:.5f} (target < 0.02)")


if __name__ == "__main__":
    main()
