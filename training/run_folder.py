"""The run folder (``work_dir``): one training run's checkpoints and validation images, kept from other runs.

It holds the current run's ``checkpoint-<step>/`` folders and ``validation/`` images, the
``previous-<UTC time>/`` folders of earlier runs, and the lock file.

One trainer at a time: ``run.run_training`` holds the folder's lock (:func:`training.folder_lock.folder_lock`)
from before its model loads until it ends, so a second trainer on the same folder (another ComfyUI,
the CLI) is refused at once with who holds it; the lock of a killed trainer is recovered by the next run.

Nothing of an earlier run is lost: checkpoint rotation keeps the highest steps, and a checkpoint
replaces one of the same step, so a fresh run in a folder holding an earlier run's checkpoints would
delete them. A fresh run (not resuming) therefore first moves the earlier run's checkpoints and
validation images into ``previous-<UTC time>/`` and says so. Each entry moves by one rename (no copy,
never half-moved), validation images first, then checkpoints oldest first: a run killed while moving
leaves the earlier run's newest checkpoints in place, where ``resume`` finds them as it did before.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .checkpoint import list_checkpoints
from .fs import StrPath, fsync_dir, resolve_inside

logger = logging.getLogger(__name__)

VALIDATION = "validation"  # the run's validation images
ARCHIVE_PREFIX = "previous-"


def _new_archive(root: Path) -> Path:
    """A new, empty ``previous-<UTC time>`` folder in ``root`` (``_2``, ``_3``... when that second is taken)."""
    stamp = ARCHIVE_PREFIX + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for version in range(1, 1000):
        name = stamp if version == 1 else f"{stamp}_{version}"
        path = resolve_inside(root, name, "archive folder")
        try:
            os.mkdir(path)  # fails on anything already there, a planted link included
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{root} holds 999 archive folders named {stamp}*; remove some")


def earlier_run(root: StrPath) -> list[Path]:
    """What an earlier run left in ``root``: its validation folder and checkpoint folders (oldest first)."""
    root = Path(root)
    validation = root / VALIDATION
    found = [validation] if validation.is_dir() and not validation.is_symlink() and any(validation.iterdir()) else []
    return found + list_checkpoints(root)


def archive_earlier_run(root: StrPath) -> Path | None:
    """Move an earlier run's checkpoints and validation images into a new ``root/previous-<UTC time>/``.

    Returns that folder, or None when there was nothing to move. Call it holding the folder's lock.
    """
    root = Path(root)
    entries = earlier_run(root)
    if not entries:
        return None
    archive = _new_archive(root)
    for entry in entries:
        source = resolve_inside(root, entry.name, "run folder entry")
        try:
            os.rename(source, archive / entry.name)
        except OSError as err:
            raise OSError(
                f"could not move {source} into {archive} ({err}); nothing was deleted. Move the earlier run's "
                f"checkpoint-* and {VALIDATION} folders out of {root} yourself, or tick resume to continue that run"
            ) from err
    fsync_dir(archive)
    fsync_dir(root)
    steps = [int(p.name.rsplit("-", 1)[1]) for p in entries if p.name != VALIDATION]
    logger.warning(
        "%s held an earlier run (checkpoints of steps %s%s); this run starts fresh (resume is off), so they were "
        "moved to %s. To continue that run instead: stop this one, move its checkpoint folders back into %s and "
        "resume; otherwise delete %s when you no longer need it",
        root,
        ", ".join(map(str, steps)) or "none",
        f", {VALIDATION} images" if entries[0].name == VALIDATION else "",
        archive,
        root,
        archive,
    )
    return archive
