"""What a cache must hold for a dataset: the checked dataset, and the content key of every latent and text.

Each item needs one latent per flip (key: image bytes, crop, bucket, flip, encode variant, VAE) and
one text per caption, per shuffled-caption variant, plus the empty caption (caption dropout) and the
validation prompts (key: text, text encoder, token limit). The plan is what the index's items list;
the builder encodes only the keys the folder does not hold yet.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .keys import SourceDigests, latent_key, text_key
from .sd3 import BUCKET_MULTIPLE, SD3_LATENT_CHANNELS, LatentEncoder, TextEncoder

if TYPE_CHECKING:  # the manifest types, duck-typed at run time (this package never imports another)
    from dataset.manifest import Dataset, DatasetItem


def check_dataset(dataset: Dataset, latent: LatentEncoder) -> None:
    """ValueError naming the item (or the VAE) if the dataset cannot be cached for SD3."""
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


@dataclass
class Plan:
    items: list[dict[str, Any]]  # the index's item entries, in dataset order
    latents: dict[str, tuple[DatasetItem, bool]]  # wanted latent key -> (item, flipped)
    texts: dict[str, str]  # wanted text key -> caption
    validation: list[list[str]]  # [prompt, text key] pairs
    empty_text: str
    options: dict[str, Any] = field(default_factory=dict)  # flip, shuffle_variants, keep_first, max_tokens


def make_plan(
    dataset: Dataset,
    sources: SourceDigests,
    latent: LatentEncoder,
    text: TextEncoder,
    *,
    flip: bool,
    shuffle_variants: int,
    keep_first: int,
    validation: list[str],
) -> Plan:
    """Key every entry the dataset needs (hashing only source images whose size or mtime changed)."""
    te_id, max_tok = text.identity, text.max_tokens
    flips = (False, True) if flip else (False,)
    items: list[dict[str, Any]] = []
    latents: dict[str, tuple[DatasetItem, bool]] = {}
    variants: dict[str, list[str]] = {}
    for item in dataset.items:
        crop = item.crop.as_ltrb() if item.crop else None
        sha = sources.get(item.source)
        keys = [latent_key(sha, crop, item.bucket, f, latent.variant(item.bucket), latent.identity) for f in flips]
        for key, f in zip(keys, flips, strict=True):
            latents.setdefault(key, (item, f))
        if item.caption not in variants:
            variants[item.caption] = shuffled_captions(item.caption, shuffle_variants, keep_first)
        items.append(
            {
                "source": item.source,
                "caption": item.caption,
                "crop": list(crop) if crop else None,
                "bucket": list(item.bucket),
                "repeats": item.repeats,
                "latent": keys[0],
                "latent_flip": keys[1] if flip else None,
                "text": text_key(item.caption, te_id, max_tok),
                "variants": [[v, text_key(v, te_id, max_tok)] for v in variants[item.caption]],
            }
        )
    shuffles = [v for entry in items for v, _ in entry["variants"]]
    captions = dict.fromkeys([*(i.caption for i in dataset.items), "", *validation, *shuffles])
    return Plan(
        items=items,
        latents=latents,
        texts={text_key(c, te_id, max_tok): c for c in captions},
        validation=[[p, text_key(p, te_id, max_tok)] for p in validation],
        empty_text=text_key("", te_id, max_tok),
        options={"flip": flip, "shuffle_variants": shuffle_variants, "keep_first": keep_first, "max_tokens": max_tok},
    )
