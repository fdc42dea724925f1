"""Content keys of cache entries and cheap identities of the models that produced them.

A latent entry is keyed by SHA-256 of (image file bytes, crop box, bucket, flip, encode variant,
VAE identity); a text entry by (caption text, text-encoder identity, token limit). Re-running with
nothing changed therefore finds every key; changing one caption changes one text key; swapping the
VAE changes every latent key and no text key.

Model identities are computed from the state dict without hashing gigabytes: every tensor's name,
shape and dtype, plus an evenly strided sample of up to ``SAMPLES_PER_TENSOR`` of its values. A
fine-tune, a different seed, a dtype change or a different set of sub-models (CLIP-L only vs
CLIP-L/G + T5) all change it; for the 2,000-tensor SD3.5 text encoders it costs milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from .. import fs

KEY_VERSION = 1  # bump when the rendering or encoding of entries changes meaning
SAMPLES_PER_TENSOR = 64


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([KEY_VERSION, *parts], ensure_ascii=False).encode("utf-8")).hexdigest()


def state_dict_identity(state: Mapping[str, torch.Tensor], *extra: Any) -> str:
    """Identity of a model from its state dict (names, shapes, dtypes, a strided value sample) plus ``extra``."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
            h.update(flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.float64).numpy().tobytes())
    h.update(json.dumps([repr(e) for e in extra]).encode())
    return h.hexdigest()[:32]


def tensor_identity(value: Any) -> str:
    """Identity of arbitrary nested tensors/tuples (e.g. the LoRA patches applied to a model)."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            h.update(state_dict_identity({"t": v}).encode())
        elif isinstance(v, Mapping):
            for k in sorted(v, key=str):
                h.update(str(k).encode())
                walk(v[k])
        elif isinstance(v, list | tuple):
            h.update(b"[")
            for x in v:
                walk(x)
            h.update(b"]")
        elif hasattr(v, "weights"):  # ComfyUI weight adapters carry their tensors in .weights
            h.update(type(v).__name__.encode())
            walk(v.weights)
        else:
            h.update(repr(v).encode())

    walk(value)
    return h.hexdigest()[:32]


class SourceDigests:
    """SHA-256 of source images, re-hashed only when (size, mtime) differ from the last run's record."""

    def __init__(self, known: Mapping[str, Mapping[str, Any]] | None = None):
        self.known = dict(known or {})
        self.records: dict[str, dict[str, Any]] = {}
        self.hashed = 0

    def get(self, path: str) -> str:
        if path in self.records:
            return self.records[path]["sha256"]
        st = os.stat(path)
        old = self.known.get(path)
        if isinstance(old, dict) and (old.get("size"), old.get("mtime_ns")) == (st.st_size, st.st_mtime_ns):
            sha = str(old.get("sha256"))
        else:
            sha = fs.file_sha256(path)
            self.hashed += 1
        self.records[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        return sha


def latent_key(
    image_sha: str,
    crop: tuple[int, int, int, int] | None,
    bucket: tuple[int, int],
    flip: bool,
    variant: str,
    vae_id: str,
) -> str:
    return _digest("latent", image_sha, list(crop) if crop else None, list(bucket), flip, variant, vae_id)


def text_key(caption: str, text_encoder_id: str, max_tokens: int) -> str:
    return _digest("text", caption, text_encoder_id, max_tokens)


def truncate_tokens(
    tokens: dict[str, list[list[tuple]]], max_tokens: int
) -> tuple[dict[str, list[list[tuple]]], bool]:
    """Cap ComfyUI-style tokens (per encoder: a list of chunks of (token, weight[, word id])) to one chunk.

    CLIP tokenizers split long prompts into 77-token chunks, each closed by its end token; T5's
    tokenizer makes one chunk as long as the text. Cached embeddings need one fixed length per
    encoder, so only the first chunk is kept and a longer chunk is cut to ``max_tokens``, keeping
    its final (end) token. Returns (tokens, whether anything was cut).
    """
    out: dict[str, list[list[tuple]]] = {}
    cut = False
    for name, chunks in tokens.items():
        if not chunks:
            out[name] = chunks
            continue
        first = list(chunks[0])
        if len(chunks) > 1:
            cut = True
        if len(first) > max_tokens:
            first = first[: max_tokens - 1] + [first[-1]]
            cut = True
        out[name] = [first]
    return out, cut
