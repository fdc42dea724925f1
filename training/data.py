"""What the trainer reads: a source of pre-encoded batches (latents + text embeddings).

The trainer never sees images or text encoders. Any object with the :class:`TrainingSource` shape
works: the latent cache's ``CacheReader`` (training/cache) on disk, or :class:`TensorSource`, an
in-memory source for tests, benchmarks and callers that already hold tensors.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 16, h, w], already in the transformer's space (SD3 shift/scale applied)
    cond: torch.Tensor  # [B, L, 4096]
    pooled: torch.Tensor  # [B, 2048]
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


def bucketed_batches(
    buckets: Sequence[Hashable], repeats: Sequence[int], batch_size: int, rng: random.Random, drop_last: bool = True
) -> list[list[int]]:
    """One epoch as batches of sample indices: sample ``i`` appears ``repeats[i]`` times, a batch never mixes
    buckets (latent sizes), and the order within each bucket and of the batches comes from ``rng``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for i, (bucket, n) in enumerate(zip(buckets, repeats, strict=True)):
        groups[bucket].extend([i] * int(n))
    plan: list[list[int]] = []
    for bucket in sorted(groups):
        members = groups[bucket]
        rng.shuffle(members)
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            if len(chunk) == batch_size or not drop_last:
                plan.append(chunk)
    rng.shuffle(plan)
    return plan


def epoch_rng(seed: int, epoch: int) -> random.Random:
    """The generator of one epoch's order (and flips, caption picks): depends only on (seed, epoch)."""
    return random.Random(f"sd35-tuner:{seed}:{epoch}")


class TrainingSource(Protocol):
    meta: dict[str, Any]

    def batches(self, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> Iterator[Batch]: ...

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def validation_prompts(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


class TensorSource:
    """Samples held in memory; each epoch is seeded and bucketed by latent size (``bucketed_batches``)."""

    def __init__(
        self,
        latents: Sequence[torch.Tensor],
        cond: Sequence[torch.Tensor],
        pooled: Sequence[torch.Tensor],
        captions: Sequence[str] | None = None,
        empty: tuple[torch.Tensor, torch.Tensor] | None = None,
        prompts: list[tuple[str, torch.Tensor, torch.Tensor]] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not len(latents) == len(cond) == len(pooled):
            raise ValueError(f"latents, cond and pooled differ in length: {len(latents)}, {len(cond)}, {len(pooled)}")
        self.latents, self.cond, self.pooled = list(latents), list(cond), list(pooled)
        self.captions = list(captions) if captions is not None else [f"sample {i}" for i in range(len(latents))]
        self._empty = empty
        self._prompts = prompts or []
        self.meta = meta or {}

    def __len__(self) -> int:
        return len(self.latents)

    def batches(self, batch_size: int, seed: int, epoch: int, drop_last: bool = True) -> Iterator[Batch]:
        shapes = [tuple(t.shape) for t in self.latents]
        for group in bucketed_batches(shapes, [1] * len(self), batch_size, epoch_rng(seed, epoch), drop_last):
            yield Batch(
                latents=torch.stack([self.latents[i] for i in group]),
                cond=torch.stack([self.cond[i] for i in group]),
                pooled=torch.stack([self.pooled[i] for i in group]),
                keys=[str(i) for i in group],
                captions=[self.captions[i] for i in group],
            )

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._empty is None:
            return torch.zeros_like(self.cond[0])[None], torch.zeros_like(self.pooled[0])[None]
        return self._empty

    def validation_prompts(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        return self._prompts


def load_tensor_source(path: str | os.PathLike) -> TensorSource:
    """Read pre-encoded samples from one safetensors file, for the CLI: tensors ``latents`` [N,C,h,w],
    ``cond`` [N,L,D], ``pooled`` [N,P], optional ``empty_cond`` / ``empty_pooled`` and ``prompt.<i>.cond/pooled``;
    header metadata ``captions`` / ``prompts`` (JSON lists) and ``meta`` (JSON object)."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        keys, header = set(f.keys()), f.metadata() or {}
        missing = {"latents", "cond", "pooled"} - keys
        if missing:
            raise ValueError(f"{path.name}: missing tensor(s) {sorted(missing)}; expected latents, cond and pooled")
        t = {k: f.get_tensor(k) for k in keys}
    prompts = json.loads(header.get("prompts", "[]"))
    return TensorSource(
        list(t["latents"]),
        list(t["cond"]),
        list(t["pooled"]),
        captions=json.loads(header["captions"]) if "captions" in header else None,
        empty=(t["empty_cond"], t["empty_pooled"]) if "empty_cond" in t else None,
        prompts=[(p, t[f"prompt.{i}.cond"], t[f"prompt.{i}.pooled"]) for i, p in enumerate(prompts)],
        meta=json.loads(header.get("meta", "{}")),
    )
