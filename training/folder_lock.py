"""One writer per folder across processes: an OS file lock that names its holder and recovers a dead one's.

Used for a cache build (``training/cache/builder.py``) and a training run's folder (``training/run.py``).
Library code: no ComfyUI import.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .fs import FILE_MODE, StrPath

logger = logging.getLogger(__name__)

LOCK_NAME = ".sd35-tuner.lock"


class FolderInUseError(RuntimeError):
    """Another process holds the folder's lock."""


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, 1 << 30, os.SEEK_SET)  # lock a byte far past the holder record, which stays readable
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def _holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        info = {"pid": "?", "host": "?", "since": "?"}
    return info if isinstance(info, dict) else {}


def _describe(info: Mapping[str, Any]) -> str:
    return (
        f"process {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('since', '?')}"
        f" ({info.get('what', 'unknown task')})"
    )


@contextmanager
def folder_lock(folder: StrPath, what: str) -> Iterator[Path]:
    """Hold ``folder``'s lock file for the duration (one writer per folder across processes).

    The lock is an OS file lock (``flock``; ``msvcrt.locking`` on Windows) on ``.sd35-tuner.lock``,
    which the OS releases when its process dies: a killed holder's lock is recovered at once (and
    logged). The file records pid, host, start time and ``what``, so a refusal says who holds it.
    Raises :class:`FolderInUseError` naming the holder when another process has it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), FILE_MODE)
    try:
        if not _try_lock(fd):
            raise FolderInUseError(
                f"{folder} is in use by {_describe(_holder(fd))}. Wait for it to finish or stop it; if no such "
                f"process is running any more, delete {path}."
            )
        stale = _holder(fd)
        if stale:
            logger.warning("SD3.5 Tuner: recovered the lock on %s left by %s, which ended", folder, _describe(stale))
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "what": what,
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(mine).encode("utf-8"))
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # an empty record marks a clean release
    finally:
        os.close(fd)  # closing releases the OS lock
