"""On-disk layout of the latent / text-embedding cache: a JSON index plus safetensors shards.

Layout (every path relative to the cache folder)::

    index.json                                   the index (written last, atomically)
    latents/<vae id>/<W>x<H>/<random>.safetensors  raw VAE latents of one bucket, tensor name = content key
    texts/<text-encoder id>/<random>.safetensors   "<key>.cond" [L, 4096] and "<key>.pooled" [2048]
    .sd35-tuner.lock                             held while a build runs (``folder_lock.folder_lock``)

Why this shape: shards are immutable once written (``fs`` atomic writes), so a run killed at any
moment leaves only whole shards, and a shard that a killed run wrote but never recorded is adopted
by the next run instead of being encoded again.

Trust: a cache folder may come from elsewhere (shared with a dataset, synced from another machine),
so nothing read from it is taken on faith. Every shard path the index lists must match the layout
and resolve inside the folder (``shard_path``) before it is read, rewritten or deleted. Every shard
carries the SHA-256 of its tensors in its own header (``content_sha256``), and the index records the
file's identity as last verified (inode, size, mtime, ctime); a shard whose identity differs is
re-hashed before use (``inspect_shard``). Any write through the file system changes ctime, which
user space cannot set back, so a shard edited in place with its size and mtime kept is re-hashed too;
an unchanged shard costs one ``stat``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import fs

INDEX_NAME = "index.json"
FORMAT_NAME = "sd35-tuner-cache"
FORMAT_VERSION = 2  # 2: shards carry content_sha256; the index records file identities
CONTENT_KEY = "content_sha256"
_LAYOUT = re.compile(r"(latents/[^/]+/\d+x\d+|texts/[^/]+)/[^/]+\.safetensors")
_IDENTITY_FIELDS = ("bytes", "ino", "mtime_ns", "ctime_ns")


class CacheWriteError(OSError):
    """The cache folder cannot be written (read-only, permission denied, disk full)."""


def write_error(path: Path, err: OSError) -> CacheWriteError:
    reason = {
        errno.EACCES: "permission denied (the folder is read-only for this user)",
        errno.EPERM: "operation not permitted (the folder is read-only or immutable)",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.ENOTDIR: "a file is in the way of the folder",
        errno.EEXIST: "a file is in the way of the folder",
    }.get(err.errno or 0, err.strerror or str(err))
    return CacheWriteError(
        err.errno,
        f"cannot write the cache at {path}: {reason}. Free space or make the folder writable, "
        "or choose another cache name. The previous index (if any) was left untouched.",
    )


def check_writable(cache_dir: Path) -> None:
    """Create the folder and prove it is writable before any work; CacheWriteError otherwise."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fs.probe_writable(cache_dir)
    except OSError as err:
        raise write_error(cache_dir, err) from err


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    fs.atomic_write_json(path, data, indent=1)


def read_index(cache_dir: Path) -> dict[str, Any] | None:
    """The index as a dict, None if there is none; ValueError naming the file if it is not one."""
    path = cache_dir / INDEX_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cache index is unreadable ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not an SD3.5 Tuner cache index (missing format '{FORMAT_NAME}')")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: cache format version {data.get('version')} is not supported (expected {FORMAT_VERSION}); "
            "run the cache node again to rebuild it"
        )
    return data


def shard_path(cache_dir: Path, rel: Any) -> Path:
    """The real path of shard entry ``rel`` of the index, if it is a shard path of the layout, inside the
    folder and not a symbolic link; ValueError naming the entry otherwise (nothing is touched)."""
    where = f"cache index {cache_dir / INDEX_NAME}: shard entry"
    if not isinstance(rel, str) or not _LAYOUT.fullmatch(rel):
        raise ValueError(
            f"{where} {rel!r} is not a cache shard path (latents/<vae>/<W>x<H>/<name>.safetensors or "
            "texts/<encoder>/<name>.safetensors)"
        )
    path = fs.resolve_inside(cache_dir, rel, where)
    if (cache_dir / rel).is_symlink():
        raise ValueError(f"{where} {rel!r} is a symbolic link; cache shards are plain files")
    return path


def new_shard_path(kind: str, identity: str, bucket: tuple[int, int] | None = None) -> str:
    """A fresh relative shard path (random name: concurrent or resumed runs never collide)."""
    parts = ["latents" if kind == "latent" else "texts", re.sub(r"[^A-Za-z0-9_-]", "_", identity[:16]) or "_"]
    if bucket is not None:
        parts.append(f"{bucket[0]}x{bucket[1]}")
    parts.append(f"{uuid.uuid4().hex[:16]}.safetensors")
    return "/".join(parts)


def content_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, dtype, shape, raw bytes) of each tensor, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda nt: nt[0]):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)};".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def file_identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"bytes": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def write_shard(cache_dir: Path, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """Write one immutable shard atomically with its content hash; return its index record."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path = cache_dir / rel
    fs.atomic_save_safetensors(path, tensors, {**metadata, CONTENT_KEY: content_digest(tensors.items())})
    return {**file_identity(path), **{k: metadata[k] for k in ("kind", "identity") if k in metadata}}


@dataclass(frozen=True)
class ShardInfo:
    shapes: dict[str, list[int]]  # tensor name -> shape
    kind: str  # "latent" | "text"
    identity: str  # the encoder identity that wrote it
    record: dict[str, Any]  # what the index records: file identity, kind, identity


def inspect_shard(path: Path, record: Mapping[str, Any] | None) -> ShardInfo:
    """Read a shard's header (``safe_open``: truncated or padded files are refused) and, unless the file's
    identity equals ``record``'s, check its tensors against its content hash.

    ValueError naming the file and what is wrong: size differs from the index, truncated, not a cache
    shard, no content hash (an older version wrote it), or content changed since it was written.
    """
    from safetensors import SafetensorError, safe_open

    identity = file_identity(path)
    if record is not None and identity["bytes"] != record.get("bytes"):
        raise ValueError(f"{path}: cache shard is {identity['bytes']} bytes, the index says {record.get('bytes')}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
            if meta.get("kind") not in ("latent", "text"):
                raise ValueError(f"{path}: not a cache shard (no kind in its header)")
            if not meta.get(CONTENT_KEY):
                raise ValueError(f"{path}: cache shard has no content hash (an older version wrote it)")
            if record is None or any(record.get(k) != identity[k] for k in _IDENTITY_FIELDS):
                if content_digest((name, f.get_tensor(name)) for name in shapes) != meta[CONTENT_KEY]:
                    raise ValueError(
                        f"{path}: content hash does not match the shard's tensors (the file was changed after "
                        "it was written: disk or sync damage, or an edit)"
                    )
    except SafetensorError as err:
        raise ValueError(f"{path}: cache shard is truncated or not a safetensors file ({err})") from err
    rec = {**identity, "kind": meta["kind"], "identity": meta.get("identity", "")}
    return ShardInfo(shapes, meta["kind"], rec["identity"], rec)


def mapping(index: Mapping[str, Any] | None, key: str) -> dict[str, Any]:
    """``index[key]`` if it is a JSON object with string keys, else {} (a crafted index cannot crash us)."""
    value = (index or {}).get(key)
    return value if isinstance(value, dict) else {}


def entry_keys(kind: str, tensor_names: Iterable[str]) -> list[str]:
    """Content keys stored in a shard of ``kind`` (text shards hold '<key>.cond' + '<key>.pooled')."""
    names = list(tensor_names)
    if kind == "latent":
        return names
    conds = {n[: -len(".cond")] for n in names if n.endswith(".cond")}
    pooled = {n[: -len(".pooled")] for n in names if n.endswith(".pooled")}
    return sorted(conds & pooled)


def cache_fingerprint(cache_dir: Path) -> str:
    """Changes whenever the cache on disk may no longer be what the last build left (stat only, no hashing).

    For ``fingerprint_inputs``: ComfyUI re-runs the cache node when a source image is edited, replaced
    or deleted, when a shard is touched (identity incl. ctime) or removed, or when the index changes.
    With no readable index (never built, or deleted after a build) it is new on every call, so the node
    always runs: "no cache" is never mistaken for "the same as last time".
    """
    try:
        raw = (cache_dir / INDEX_NAME).read_bytes()
        index = read_index(cache_dir)
    except (OSError, ValueError):
        index = None
    if index is None:
        return f"no-index:{uuid.uuid4().hex}"
    h = hashlib.sha256(raw)
    for source in sorted(mapping(index, "sources")):
        try:
            st = os.stat(source)
            h.update(f"{source}|{st.st_size}|{st.st_mtime_ns};".encode())
        except (OSError, ValueError, TypeError):
            h.update(f"{source}|missing;".encode())
    for rel in sorted(mapping(index, "shards")):
        try:
            h.update(f"{rel}|{file_identity(shard_path(cache_dir, rel))};".encode())
        except (OSError, ValueError):
            h.update(f"{rel}|missing or refused;".encode())
    return h.hexdigest()
