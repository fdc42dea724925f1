"""On-disk layout of the latent / text-embedding cache: a JSON index plus safetensors shards.

Layout (every path relative to the cache folder)::

    index.json                                   the index (written last, atomically)
    latents/<vae id>/<W>x<H>/<random>.safetensors  raw VAE latents of one bucket, tensor name = content key
    texts/<text-encoder id>/<random>.safetensors   "<key>.cond" [L, 4096] and "<key>.pooled" [2048]

Why this shape: shards are immutable once written (temp file + ``os.replace``), so a run killed at
any moment leaves only whole shards; the index lists each shard's byte size and SHA-256, so a
truncated or corrupted shard is detected before it is read; and a shard that a killed run wrote but
never recorded is adopted by the next run instead of being encoded again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import fs

INDEX_NAME = "index.json"
FORMAT_NAME = "sd35-tuner-cache"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


class CacheWriteError(OSError):
    """The cache folder cannot be written (read-only, permission denied, disk full)."""


def write_error(path: Path, err: OSError) -> CacheWriteError:
    reason = {
        errno.EACCES: "permission denied (the folder is read-only for this user)",
        errno.EPERM: "operation not permitted (the folder is read-only or immutable)",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
    }.get(err.errno or 0, err.strerror or str(err))
    return CacheWriteError(
        err.errno,
        f"cannot write the cache at {path}: {reason}. Free space or make the folder writable, "
        "or choose another cache name. The previous index (if any) was left untouched.",
    )


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
            "delete the cache folder or pick a new cache name"
        )
    return data


def new_shard_path(cache_dir: Path, kind: str, identity: str, bucket: tuple[int, int] | None = None) -> str:
    """A fresh relative shard path (random name: concurrent or resumed runs never collide)."""
    parts = ["latents" if kind == "latent" else "texts", identity[:16]]
    if bucket is not None:
        parts.append(f"{bucket[0]}x{bucket[1]}")
    parts.append(f"{uuid.uuid4().hex[:16]}.safetensors")
    return "/".join(parts)


def write_shard(
    cache_dir: Path, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> dict[str, Any]:
    """Write one immutable shard atomically; return its index record (bytes, sha256, mtime_ns)."""
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    path = cache_dir / rel
    fs.atomic_write_bytes(path, data)
    return {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "mtime_ns": path.stat().st_mtime_ns,
        **{k: metadata[k] for k in ("kind", "identity") if k in metadata},
    }


def shard_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a safetensors header without reading tensor data; check the file is exactly as long as it says.

    Returns (tensor entries, metadata). Raises ValueError naming the file on a truncated or foreign file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: shard is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * _CHUNK:
            raise ValueError(f"{path}: shard header is corrupt or truncated")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: shard header is corrupt ({err})") from err
    metadata = header.pop("__metadata__", {}) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end != size:
        raise ValueError(f"{path}: shard is truncated or has trailing bytes ({size} bytes, header says {8 + n + end})")
    return header, metadata


def entry_keys(kind: str, tensor_names: list[str]) -> list[str]:
    """Content keys stored in a shard of ``kind`` (text shards hold '<key>.cond' + '<key>.pooled')."""
    if kind == "latent":
        return list(tensor_names)
    conds = {n[: -len(".cond")] for n in tensor_names if n.endswith(".cond")}
    pooled = {n[: -len(".pooled")] for n in tensor_names if n.endswith(".pooled")}
    return sorted(conds & pooled)


def check_writable(cache_dir: Path) -> None:
    """Create the folder and prove it is writable before any work; CacheWriteError otherwise."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=cache_dir, prefix=".probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise write_error(cache_dir, err) from err


def remove_temp_files(cache_dir: Path) -> None:
    """Delete temp files a killed run left behind (whole shards are only ever created by rename)."""
    for tmp in cache_dir.glob("**/.*.tmp"):
        tmp.unlink(missing_ok=True)


def cache_fingerprint(cache_dir: Path) -> str:
    """Changes when the cache or any source image its index lists changes on disk (stat only, no hashing).

    For ``fingerprint_inputs``: ComfyUI then re-runs the cache node when an image is edited,
    replaced or deleted, or when a shard is damaged or removed, even if the graph is unchanged.
    """
    h = hashlib.sha256()
    try:
        index = read_index(cache_dir)
    except ValueError:
        index = None
    if index is None:
        return "no-index"
    h.update((cache_dir / INDEX_NAME).read_bytes())
    paths = sorted(index.get("sources", {})) + sorted(str(cache_dir / rel) for rel in index.get("shards", {}))
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns};".encode())
        except OSError:
            h.update(f"{p}|missing;".encode())
    return h.hexdigest()


def confined_dir(base: str | os.PathLike[str], name: str, field: str = "cache_name") -> Path:
    """``base/name`` if it is a sub-folder of ``base`` (``fs.resolve_inside``); ValueError otherwise."""
    if not name.strip():
        raise ValueError(f"{field} is empty: give a folder name such as 'sd35_cache/my_dataset'")
    return fs.resolve_inside(base, name, field)
