"""The run folder from the unlucky user's side: an older run of the same name, a second trainer, a killed one.

A fresh run (resume off) in a folder holding an older run's checkpoints must leave every one of them
byte-identical (moved into ``previous-<UTC time>/``, saying so), while its own rotation and resume work
as before. A second trainer on a folder in use is refused at once with who holds it, before any model
loads; after the holder is killed (SIGKILL: its lock file stays behind) the next run recovers the lock
and resumes.

Run as a script (``python test_train_run_folder.py WORK LORA``) it is a trainer that stops at step 2
holding the folder, prints ``holding``, and waits to be killed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def _cfg(**change):
    from training.config import TrainConfig

    settings = dict(steps=4, batch_size=1, learning_rate=1e-3, rank=2, alpha=4, checkpoint_every=1, keep_checkpoints=2)
    return TrainConfig(**{**settings, **change})


def _decode(latents: torch.Tensor) -> torch.Tensor:  # a stand-in VAE: the first 3 channels as colours
    return torch.sigmoid(latents[:, :3]).permute(0, 2, 3, 1)


def _train(work: Path, lora: Path, **kwargs):
    from tests.unit.test_train_run import SD35, _source
    from training.run import run_training

    cfg = kwargs.pop("cfg", None) or _cfg()
    return run_training(kwargs.pop("base", SD35), _source(), cfg, lora, work, decode=_decode, **kwargs)


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with the SHA-256 of its bytes (the lock file aside)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def _top(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if not p.name.startswith("."))


class Cancel(Exception):
    pass


def test_a_fresh_run_keeps_an_older_runs_checkpoints_byte_identical_and_its_own_rotation_and_resume_work(
    tmp_path, caplog
):
    work, loras = tmp_path / "output" / "sd35_tuner_runs" / "style", tmp_path / "loras"
    older = _train(work, loras / "style.safetensors", cfg=_cfg(steps=6, checkpoint_every=2, keep_checkpoints=3))
    assert older.archived is None  # nothing to move in a new folder
    assert _top(work) == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006", "validation"]
    before = _tree(work)

    def cancel_at_3(info):
        if info.step == 3:
            raise Cancel

    # the user starts anew under the same name, resume off, and cancels at step 3
    with caplog.at_level(logging.WARNING, logger="training.run_folder"), pytest.raises(Cancel):
        _train(work, loras / "style.safetensors", cfg=_cfg(seed=7), on_step=cancel_at_3)
    (archive,) = work.glob("previous-*")
    assert _tree(archive) == before  # every file of the older run, byte for byte
    assert f"were moved to {archive}" in caplog.text and "resume is off" in caplog.text
    assert "checkpoints of steps 2, 4, 6, validation images" in caplog.text
    # the new run's own checkpoints rotated among themselves (keep 2), none lost to the older run's steps 4 and 6
    assert _top(work) == ["checkpoint-000002", "checkpoint-000003", archive.name]
    assert _tree(work / "checkpoint-000002") != _tree(archive / "checkpoint-000002")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.run_folder"):
        resumed = _train(work, loras / "style.safetensors", cfg=_cfg(seed=7), resume=True)
    assert resumed.resumed_from == work / "checkpoint-000003" and resumed.archived is None
    assert "were moved" not in caplog.text  # resume moves nothing
    straight = _train(tmp_path / "straight", tmp_path / "straight.safetensors", cfg=_cfg(seed=7))
    assert resumed.losses == pytest.approx(straight.losses, rel=0, abs=1e-6)  # the same run as an uninterrupted one
    assert _top(work) == ["checkpoint-000003", "checkpoint-000004", archive.name, "validation"]
    assert _tree(archive) == before

    # a third fresh run: the second run goes to its own archive, the first stays as it was
    third = _train(work, loras / "style.safetensors")
    assert third.archived is not None and third.archived != archive and third.archived.parent == work
    assert sorted(p.name for p in third.archived.iterdir()) == ["checkpoint-000003", "checkpoint-000004", "validation"]
    assert _tree(archive) == before
    assert _top(work) == sorted(
        ["checkpoint-000003", "checkpoint-000004", archive.name, third.archived.name, "validation"]
    )


def test_archive_names_never_collide_and_planted_links_are_not_followed(tmp_path, monkeypatch):
    from training import run_folder

    monkeypatch.setattr(run_folder.time, "gmtime", lambda: time.struct_time((2025, 3, 4, 5, 6, 7, 1, 63, 0)))
    work, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    names = []
    for i in range(3):
        (work / f"checkpoint-00000{i + 1}").mkdir(parents=True)
        (work / f"checkpoint-00000{i + 1}" / "state.json").write_text(str(i))
        names.append(run_folder.archive_earlier_run(work).name)
    assert names == ["previous-20250304T050607Z", "previous-20250304T050607Z_2", "previous-20250304T050607Z_3"]
    assert [(work / n / f"checkpoint-00000{i + 1}" / "state.json").read_text() for i, n in enumerate(names)] == [
        "0",
        "1",
        "2",
    ]
    # a link where the validation folder or a checkpoint would be is neither moved nor followed
    (work / "validation").symlink_to(outside, target_is_directory=True)
    (work / "checkpoint-000009").symlink_to(outside, target_is_directory=True)
    assert run_folder.archive_earlier_run(work) is None
    assert _tree(outside) == {"keep.txt": hashlib.sha256(b"not ours").hexdigest()}


def test_a_validation_link_leading_out_of_the_run_folder_is_refused_before_the_model_loads(tmp_path):
    work, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    work.mkdir()
    (work / "validation").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="validation folder 'validation' resolves to .*outside"):
        _train(work, tmp_path / "x.safetensors", base=tmp_path / "no_such_model.safetensors")
    assert list(outside.iterdir()) == []


def _read_line(proc: subprocess.Popen, deadline_s: float = 600) -> str:
    """The trainer's next stdout line (a hang guard, not a timing check)."""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(deadline_s):
            proc.kill()
            pytest.fail("the first trainer never reached step 2")
    return proc.stdout.readline().strip()


def test_a_second_trainer_is_refused_while_one_runs_and_a_killed_trainers_lock_is_recovered(tmp_path, caplog):
    from training.folder_lock import LOCK_NAME, FolderInUseError

    work, lora = tmp_path / "output" / "sd35_tuner_runs" / "portrait", tmp_path / "loras" / "portrait.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [sys.executable, __file__, str(work), str(lora)],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_line(first)
        assert line == "holding", first.stderr.read() if first.poll() is not None else line
        held = _tree(work)
        # the second trainer (another ComfyUI, the CLI): refused before its (here missing) base model is read
        with pytest.raises(FolderInUseError) as err:
            _train(work, tmp_path / "other.safetensors", base=tmp_path / "no_such_model.safetensors", resume=True)
        message = str(err.value)
        assert str(work) in message and f"in use by process {first.pid} on host" in message
        assert "(training portrait.safetensors)" in message and "Wait for it to finish or stop it" in message
        assert _tree(work) == held  # the refused run touched nothing
    finally:
        first.send_signal(signal.SIGKILL)  # the user kills the stuck first trainer
        first.communicate(timeout=60)
    assert (work / LOCK_NAME).read_text()  # a killed holder leaves its record behind

    with caplog.at_level(logging.WARNING, logger="training.fs"):
        out = _train(work, lora, resume=True)
    assert f"recovered the lock on {work} left by process {first.pid}" in caplog.text
    assert out.resumed_from == work / "checkpoint-000002" and len(out.losses) == 4 and lora.is_file()
    assert (work / LOCK_NAME).read_text() == ""  # released cleanly: the next run takes it without a word
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.fs"):
        _train(work, tmp_path / "again.safetensors")
    assert "recovered the lock" not in caplog.text


def _hold(work: Path, lora: Path) -> None:
    """The first trainer: finish step 2 (checkpointed), say so, then wait inside the run until killed."""
    torch.set_num_threads(1)

    def on_step(info) -> None:
        if info.step == 2:
            print("holding", flush=True)
            sys.stdin.read()

    _train(work, lora, on_step=on_step)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _hold(Path(sys.argv[1]), Path(sys.argv[2]))
