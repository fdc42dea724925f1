"""Resuming from damaged checkpoints, as an unlucky user meets them (issue: raw SafetensorError/JSONDecodeError).

A run of 8 steps is cancelled at step 6 with checkpoints at steps 2, 4 and 6. Each case damages the newest
one the way a disk, a sync tool or a hand edit would, then resumes: the message names the damaged file and
the reason, the run continues from checkpoint 4 and ends with the same LoRA as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tools import paths
from training.checkpoint import CheckpointError, list_checkpoints, read_checkpoint
from training.config import TrainConfig
from training.data import TensorSource
from training.loop import train
from training.model import adapter_state, add_lora, load_transformer, lora_target_modules

SD3 = paths.MODELS / "checkpoints" / paths.SD3_CHECKPOINT
CFG = TrainConfig(
    steps=8, batch_size=1, learning_rate=1e-3, rank=2, alpha=2, seed=5, checkpoint_every=2, keep_checkpoints=3
)


class Cancel(Exception):
    pass


def _source() -> TensorSource:
    g = torch.Generator().manual_seed(0)
    return TensorSource(
        [torch.randn(16, 8, 8, generator=g) for _ in range(3)],
        [torch.randn(8, 4096, generator=g) for _ in range(3)],
        [torch.randn(2048, generator=g) for _ in range(3)],
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The LoRA-carrying base, an uninterrupted run's LoRA, and a run folder cancelled at step 6."""
    base = load_transformer(SD3)
    add_lora(base, rank=2, alpha=2, targets=lora_target_modules(base, "attention"))
    straight = copy.deepcopy(base)
    train(straight, _source(), CFG)
    cancelled = tmp_path_factory.mktemp("cancelled")

    def cancel_at_6(info):
        if info.step == 6:
            raise Cancel

    with pytest.raises(Cancel):
        train(copy.deepcopy(base), _source(), CFG, work_dir=cancelled, on_step=cancel_at_6)
    assert [p.name for p in list_checkpoints(cancelled)] == [
        "checkpoint-000002",
        "checkpoint-000004",
        "checkpoint-000006",
    ]
    return base, adapter_state(straight), cancelled


@pytest.fixture
def run_dir(setup, tmp_path) -> Path:
    return Path(shutil.copytree(setup[2], tmp_path / "run"))


def _resume(setup, run_dir: Path, resume=True):
    model = copy.deepcopy(setup[0])
    return train(model, _source(), CFG, work_dir=run_dir, resume=resume), model


def _same_lora(model, want: dict[str, torch.Tensor]) -> None:
    got = adapter_state(model)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)


def _truncate(folder: Path) -> None:
    path = folder / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bytes(folder: Path) -> None:
    path = folder / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0x5A for b in data[-64:])  # tensor bytes: same size, still parses
    path.write_bytes(bytes(data))


def _edit_state(change):
    def damage(folder: Path) -> None:
        path = folder / "state.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return damage


def _other_rank(folder: Path) -> None:
    """An adapter from a run with another rank (a folder copied from elsewhere), checksums not recorded."""
    path = folder / "adapter.safetensors"
    save_file({k: torch.zeros(4, *v.shape[1:]) for k, v in load_file(str(path)).items()}, str(path))
    _edit_state(lambda s: {k: v for k, v in s.items() if k != "sha256"})(folder)


CASES = {
    "truncated adapter": (_truncate, "adapter.safetensors", "cannot be read as safetensors, it is truncated"),
    "bytes changed in place": (_flip_bytes, "adapter.safetensors", "does not match the checksum in state.json"),
    "adapter of another rank": (_other_rank, "adapter.safetensors", "does not fit this run's LoRA"),
    "missing optimizer file": (
        lambda f: (f / "optimizer.safetensors").unlink(),
        "optimizer.safetensors",
        "is missing",
    ),
    "missing state file": (lambda f: (f / "state.json").unlink(), "state.json", "is missing"),
    "corrupt JSON": (lambda f: (f / "state.json").write_text('{"step": 6, "epo'), "state.json", "is not valid JSON"),
    "step as text": (_edit_state(lambda s: {**s, "step": "6"}), "state.json", "field 'step' should be a whole number"),
    "losses as text": (_edit_state(lambda s: {**s, "losses": "low"}), "state.json", "field 'losses' should be a list"),
    "optimizer without groups": (
        _edit_state(lambda s: {**s, "optimizer": {"scalars": {}}}),
        "state.json",
        "field 'optimizer' has no valid 'param_groups'",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(setup, run_dir, case, caplog):
    damage, file, reason = CASES[case]
    damage(run_dir / "checkpoint-000006")
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        result, model = _resume(setup, run_dir)
    assert result.resumed_from == run_dir / "checkpoint-000004"
    assert len(result.damaged) == 1
    assert str(run_dir / "checkpoint-000006" / file) in result.damaged[0] and reason in result.damaged[0]
    assert f"resuming from {run_dir / 'checkpoint-000004'}, the newest intact checkpoint" in caplog.text
    assert result.step == 8 and len(result.losses) == 8
    _same_lora(model, setup[1])
    # the damaged folder was replaced by a good one when the run saved step 6 again
    shapes = {k: tuple(v.shape) for k, v in setup[1].items()}
    assert read_checkpoint(run_dir / "checkpoint-000006", shapes).info["step"] == 6


def test_when_every_checkpoint_is_damaged_resume_refuses_with_what_to_do_and_a_fresh_run_works(setup, run_dir):
    for folder in list_checkpoints(run_dir):
        _truncate(folder)
    with pytest.raises(CheckpointError) as err:
        _resume(setup, run_dir)
    message = str(err.value)
    for step in (2, 4, 6):
        assert str(run_dir / f"checkpoint-{step:06d}" / "adapter.safetensors") in message
    assert "Delete the damaged checkpoint folders, or turn resume off to train from step 0" in message
    result, model = _resume(setup, run_dir, resume=False)
    assert result.step == 8 and result.resumed_from is None
    _same_lora(model, setup[1])


def test_a_damaged_checkpoint_named_explicitly_is_refused_without_falling_back(setup, run_dir):
    target = run_dir / "checkpoint-000006"
    (target / "state.json").write_text("[]")
    with pytest.raises(CheckpointError, match="Pick another checkpoint folder") as err:
        _resume(setup, run_dir, resume=target)
    assert f"{target / 'state.json'}: holds a list, not the checkpoint's fields" in str(err.value)
    result, model = _resume(setup, run_dir, resume=run_dir / "checkpoint-000004")
    assert result.step == 8
    _same_lora(model, setup[1])


def test_leftovers_of_a_killed_save_are_cleaned_and_a_moved_aside_checkpoint_comes_back(setup, run_dir):
    ended = subprocess.Popen(["true"])  # the pid of a process that has ended, like a killed trainer's
    ended.wait()
    pid = ended.pid
    temp = run_dir / f".checkpoint-000008.{pid}.ab12cd34.tmp"
    temp.mkdir()
    (temp / "adapter.safetensors").write_bytes(b"half")
    legacy = run_dir / ".checkpoint-k3j9x_1q"  # the temp name earlier versions used
    legacy.mkdir()
    moved = run_dir / f".checkpoint-000006.{pid}.ef56ab78.old"  # killed between the two renames of a save
    (run_dir / "checkpoint-000006").rename(moved)
    result, model = _resume(setup, run_dir)
    assert result.resumed_from == run_dir / "checkpoint-000006" and not result.damaged
    assert not temp.exists() and not legacy.exists() and not moved.exists()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-000004", "checkpoint-000006", "checkpoint-000008"]
    _same_lora(model, setup[1])
