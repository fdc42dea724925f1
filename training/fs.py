"""The pack's one place for touching the file system safely: atomic writes, confinement, hashing.

Atomic writes: data goes to a temp entry beside the target, named ``.<name>.<pid>.<random>.tmp`` (unique
per call, so concurrent writers never share one, and hidden from ComfyUI's file lists), is fsynced, gets
mode 0644 (``mkstemp`` creates 0600, which hides the file from a ComfyUI running as another user) and
is renamed over the target with ``os.replace``; then the folder is fsynced so the rename survives a
power cut. Any error (Cancel included) removes the temp. A folder is published the same way: written
into a temp folder, fsynced, renamed into place, and only then is the previous one removed. Temps left
by killed processes are removed by :func:`remove_stale_temps`; the writer's pid in the name keeps a
live writer's temp safe.

Confinement: :func:`resolve_inside` is the only way a path we did not just create (a user-typed name,
an entry read from an index or manifest) becomes a real path: symlinks resolved, absolute paths, ``..``
and anything resolving outside the base refused with a message that names the entry.

Library code: no ComfyUI import; ``dataset`` reaches this module through ``dataset/_fs.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

FILE_MODE = 0o644  # files the pack writes are shared like any ComfyUI output
DIR_MODE = 0o755
_CHUNK = 1 << 20
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(?P<kind>tmp|old)$")

StrPath = str | os.PathLike[str]


# -- atomic writes ---------------------------------------------------------------------------------


def _temp_prefix(name: str) -> str:
    return f".{name[:96]}.{os.getpid()}."


def fsync_dir(folder: StrPath) -> None:
    """Make a rename or creation inside ``folder`` durable (no-op where folders cannot be opened: Windows)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: StrPath) -> None:
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(src: StrPath, dst: StrPath) -> Path:
    """Move a finished file into place: fsync it, set mode 0644, ``os.replace`` onto ``dst``, fsync the folder."""
    dst = Path(dst)
    _fsync_file(src)
    os.chmod(src, FILE_MODE)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    return dst


@contextmanager
def atomic_file(path: StrPath) -> Iterator[Path]:
    """Yield a fresh temp path beside ``path``; write it by name, and on a clean exit it replaces ``path``.

    Formats that need a suffix to pick a writer (PIL) must be given the format explicitly.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: StrPath, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: StrPath, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: StrPath, data: Any, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=indent))


def atomic_save_safetensors(
    path: StrPath, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Save tensors (detached, on the CPU, contiguous) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file(
            {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata=dict(metadata) if metadata else None,
        )
    return Path(path)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(os.path.join(folder, name))
        fsync_dir(folder)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def publish_folder(src: StrPath, dst: StrPath) -> Path:
    """Rename a finished folder into place; an existing ``dst`` is moved aside first and removed last.

    A process killed between the two renames leaves the old folder as ``.<name>.<pid>.<random>.old``;
    :func:`remove_stale_temps` puts it back.
    """
    src, dst = Path(src), Path(dst)
    _fsync_tree(src)
    os.chmod(src, DIR_MODE)
    old = None
    if dst.is_symlink() or dst.exists():
        old = dst.parent / f"{_temp_prefix(dst.name)}{secrets.token_hex(4)}.old"
        os.rename(dst, old)  # a symlink is moved, never followed
    try:
        os.rename(src, dst)
    except BaseException:
        if old is not None:
            os.rename(old, dst)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        _remove(old)
    return dst


def remove_folder(path: StrPath) -> None:
    """Delete a folder without it ever being seen half-deleted: it is first renamed to a temp name (which
    :func:`remove_stale_temps` finishes off should this process be killed), then removed."""
    path = Path(path)
    trash = path.parent / f"{_temp_prefix(path.name)}{secrets.token_hex(4)}.tmp"
    os.rename(path, trash)
    _remove(trash)


@contextmanager
def atomic_folder(path: StrPath) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``path``; fill it, and on a clean exit it replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp"))
    try:
        yield tmp
        publish_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def temp_folder(parent: StrPath, name: str) -> Iterator[Path]:
    """A staging folder beside ``parent/name`` that is always removed on exit (move finished files out)."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=_temp_prefix(name), suffix=".tmp"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def probe_writable(folder: StrPath) -> None:
    """Create and delete a temp file in ``folder``: OSError (EACCES, EROFS...) if files cannot be made there."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=_temp_prefix("probe"), suffix=".tmp")
    os.close(fd)
    os.unlink(name)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (unknown counts as running: nothing is removed then)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send Ctrl-C there
        try:
            import psutil
        except ImportError:
            return True
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temps(folder: StrPath, recursive: bool = False, locked: bool = False) -> list[Path]:
    """Remove the temp files and folders of writers that died (killed mid-write); return what was removed.

    Temps of processes still running are kept, unless ``locked`` says the caller holds :func:`folder_lock`
    on ``folder``: then no one else can be writing there, and every hidden ``*.tmp`` entry goes (older
    writers named their temps without a pid). An ``.old`` folder whose target is missing (a publish
    killed between its two renames) is renamed back instead. Symlinked folders are not entered.
    """

    def is_temp(name: str) -> bool:
        return bool(_TEMP.match(name)) or (locked and name.startswith(".") and name.endswith(".tmp"))

    found: list[Path] = []
    for parent, dirs, files in os.walk(folder):
        found += [Path(parent) / n for n in (*dirs, *files) if is_temp(n)]
        if not recursive:
            break
        dirs[:] = [d for d in dirs if not is_temp(d)]
    removed = []
    for path in found:
        m = _TEMP.match(path.name)
        if m and not locked and (int(m["pid"]) == os.getpid() or pid_alive(int(m["pid"]))):
            continue
        target = path.parent / m["name"] if m else path
        if m and m["kind"] == "old" and not (target.is_symlink() or target.exists()):
            os.rename(path, target)
            logger.warning("SD3.5 Tuner: restored %s (a replace of it was interrupted)", target)
            continue
        _remove(path)
        removed.append(path)
    return removed


# -- confinement -----------------------------------------------------------------------------------


def resolve_inside(base: StrPath, rel: Any, what: str = "path") -> Path:
    """``base / rel`` with symlinks resolved, if it stays inside ``base``; ValueError naming ``what`` otherwise.

    ``rel`` must be a relative path (``/`` or ``\\`` separators) without ``..``; an empty one means ``base``.
    """
    base = Path(base).resolve()
    if not isinstance(rel, str | os.PathLike):
        raise ValueError(f"{what} {rel!r} is not a path (expected a relative path string inside {base})")
    text = os.fspath(rel).strip()
    if "\0" in text:
        raise ValueError(f"{what} {text!r} contains a NUL character")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise ValueError(f"{what} '{rel}' must be relative to {base}, not absolute")
    parts = PureWindowsPath(text).parts  # splits on both / and \
    if ".." in parts:
        raise ValueError(f"{what} '{rel}' may not contain '..': it must stay inside {base}")
    resolved = (base / Path(*parts)).resolve() if parts else base
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{what} '{rel}' resolves to {resolved}, outside {base}")
    return resolved


def next_free(path: StrPath, suffix: str = "") -> Path:
    """``path`` if nothing is there, else the first free ``<name>_2<suffix>``, ``_3``... beside it: how a new
    output (a LoRA file, a saved dataset folder) gets a version instead of replacing an older one."""
    path = Path(path)
    name, version = path.name.removesuffix(suffix), 2
    while path.exists() or path.is_symlink():
        path = path.with_name(f"{name}_{version}{suffix}")
        version += 1
    return path


def is_inside(path: StrPath, bases: list[StrPath]) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside, or is, one of ``bases`` (resolved)."""
    p = Path(path).resolve()
    return any(p == b or b in p.parents for b in (Path(base).resolve() for base in bases))


# -- hashing ---------------------------------------------------------------------------------------


def file_sha256(path: StrPath) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
