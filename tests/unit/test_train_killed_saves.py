"""Fault injection: the trainer process is killed (SIGKILL) inside checkpoint saves, at seeded points.

One worker process loads the tiny model once and forks a trainer per try. A try's trainer counts the
file-system operations it makes while saving checkpoints (os.open/fsync/replace/rename/chmod/mkdir/
unlink/rmdir, file opens, safetensors writes) and kills itself with SIGKILL just before the N-th one.
The next run (another fork, ``resume=True``) must then find an intact checkpoint no older than the
last save that completed (none damaged, the killed save's temps cleaned) and finish with exactly the
LoRA of an uninterrupted run. Two scenarios: a fresh run (saves of new folders, rotation of old ones)
and a run resumed from an older checkpoint that saves over an existing folder.

Run as a script (``python test_train_killed_saves.py OUT``) it is the worker; it writes OUT/report.json.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS, FRESH_KILLS, REPLACE_KILLS, SEED = 4, 8, 16, 1234
_COUNTED_OS = ("open", "fsync", "replace", "rename", "chmod", "mkdir", "unlink", "rmdir")


def _setup():
    import torch

    from tools import paths
    from training.config import TrainConfig
    from training.data import TensorSource
    from training.model import add_lora, load_transformer, lora_target_modules

    g = torch.Generator().manual_seed(0)
    source = TensorSource(
        [torch.randn(16, 8, 8, generator=g) for _ in range(3)],
        [torch.randn(8, 4096, generator=g) for _ in range(3)],
        [torch.randn(2048, generator=g) for _ in range(3)],
    )
    cfg = TrainConfig(
        steps=STEPS, batch_size=1, learning_rate=1e-3, rank=2, alpha=2, seed=3, checkpoint_every=1, keep_checkpoints=2
    )
    model = load_transformer(paths.MODELS / "checkpoints" / paths.SD3_CHECKPOINT)
    add_lora(model, rank=2, alpha=2, targets=lora_target_modules(model, "attention"))
    return model, source, cfg


def _count_save_operations(kill_at: int | None, log: list[tuple[int, str]]) -> None:
    """Count file-system operations made inside checkpoint saves; SIGKILL this process before number ``kill_at``."""
    import safetensors.torch

    import training.loop

    state = {"saving": False, "ops": 0, "save": 0}

    def counted(name, fn):
        def operation(*args, **kwargs):
            if state["saving"]:
                state["ops"] += 1
                log.append((state["save"], name))
                if state["ops"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return operation

    for name in _COUNTED_OS:
        setattr(os, name, counted(name, getattr(os, name)))
    io.open = counted("io.open", io.open)  # pathlib's write_bytes/write_text
    safetensors.torch.save_file = counted("save_file", safetensors.torch.save_file)
    save = training.loop.save_checkpoint

    def saving(*args, **kwargs):
        state["saving"], state["save"] = True, state["save"] + 1
        try:
            return save(*args, **kwargs)
        finally:
            state["saving"] = False

    training.loop.save_checkpoint = saving


def _in_child(work, *, kill_at=None, resume=False, out=None) -> int:
    """Run ``work`` in a forked copy of this process; returns its wait status (exit code or -signal)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work(kill_at, resume, out)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _worker(out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from training.loop import train
    from training.model import adapter_state

    torch.set_num_threads(1)
    model, source, cfg = _setup()

    def run(work_dir: Path):
        def work(kill_at, resume, result_file):
            log: list[tuple[int, str]] = []
            _count_save_operations(kill_at, log)
            result = train(model, source, cfg, work_dir=work_dir, resume=resume)
            if result_file is not None:
                save_file({k: v.contiguous() for k, v in adapter_state(model).items()}, str(result_file))
                info = {"log": log, "resumed_from": str(result.resumed_from), "damaged": result.damaged}
                result_file.with_suffix(".json").write_text(json.dumps(info))

        return work

    # the uninterrupted run: its LoRA, and the operations of its saves (what the kill points index)
    fresh = out / "straight"
    assert _in_child(run(fresh), out=out / "straight.safetensors") == 0
    straight = json.loads((out / "straight.json").read_text())["log"]
    # an older checkpoint to resume from, with a newer one of the same name already there to be replaced
    base = out / "replace_base"
    shutil.copytree(fresh, base)
    replace = out / "replace_probe"
    shutil.copytree(base, replace)
    older = sorted(base.glob("checkpoint-*"))[0]
    assert _in_child(run(replace), resume=replace / older.name, out=out / "replace.safetensors") == 0
    replacing = json.loads((out / "replace.json").read_text())["log"]

    rng = random.Random(SEED)
    plan = [("fresh", n) for n in sorted(rng.sample(range(1, len(straight) + 1), FRESH_KILLS))]
    plan += [("replace", n) for n in sorted(rng.sample(range(1, len(replacing) + 1), REPLACE_KILLS))]
    tries = []
    for i, (scenario, kill_at) in enumerate(plan):
        work_dir = out / f"try{i:02d}"
        if scenario == "replace":
            shutil.copytree(base, work_dir)
        log = straight if scenario == "fresh" else replacing
        completed = {s for s, _ in log[: kill_at - 1]} - {log[kill_at - 1][0]}  # saves that finished
        status = _in_child(
            run(work_dir), kill_at=kill_at, resume=work_dir / older.name if scenario == "replace" else False
        )
        found = sorted(p.name for p in work_dir.glob("checkpoint-*"))
        result = out / f"try{i:02d}.safetensors"
        resumed = _in_child(run(work_dir), resume=bool(found), out=result)
        info = json.loads(result.with_suffix(".json").read_text()) if resumed == 0 else {}
        tries.append(
            {
                "scenario": scenario,
                "kill_at": kill_at,
                "operation": log[kill_at - 1][1],
                "save": log[kill_at - 1][0],
                "completed_saves": len(completed),
                "killed_status": status,
                "checkpoints_after_kill": found,
                "resume_status": resumed,
                "resumed_from": Path(info.get("resumed_from", "None")).name,
                "damaged": info.get("damaged"),
                "left_over": sorted(p.name for p in work_dir.iterdir() if p.name.startswith(".")),
            }
        )
    (out / "report.json").write_text(json.dumps({"tries": tries, "save_operations": len(straight)}, indent=1))


@pytest.mark.slow
def test_killing_the_trainer_inside_checkpoint_saves_never_costs_a_checkpoint_or_changes_the_result(tmp_path):
    import torch
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    tries = json.loads((tmp_path / "report.json").read_text())["tries"]
    assert len(tries) >= 20 and len({(t["scenario"], t["kill_at"]) for t in tries}) == len(tries)
    want = load_file(str(tmp_path / "straight.safetensors"))
    for i, t in enumerate(tries):
        assert t["killed_status"] == -signal.SIGKILL, t  # the trainer really died inside a save
        assert t["resume_status"] == 0, t
        assert t["damaged"] == [] and t["left_over"] == [], t  # no half checkpoint, no temp left behind
        if t["scenario"] == "replace":  # the folder being replaced was never lost
            assert t["resumed_from"] == f"checkpoint-{STEPS:06d}", t
        elif t["completed_saves"]:  # never older than the last save that completed
            assert t["resumed_from"] >= f"checkpoint-{t['completed_saves']:06d}", t
        got = load_file(str(tmp_path / f"try{i:02d}.safetensors"))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), t


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(Path(sys.argv[1]))
