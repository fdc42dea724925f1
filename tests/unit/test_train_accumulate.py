"""Gradient accumulation under data parallel: one gradient all-reduce per optimizer step, not one per micro-batch.

Two CPU processes (torchrun, gloo) train through ``Trainer`` with ``grad_accum`` micro-batches per step.
Each worker records every ``torch.distributed.all_reduce`` with the number of forward passes run
before it, and which of them carry gradients (a DDP communication hook on the real DDP model). The
final LoRA must equal a one-process run of the same config.

Run as a script (``python -m torch.distributed.run ... test_train_accumulate.py OUT``) it is the worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS, ACCUM = 3, 3


def _setup():
    from tools import paths
    from training.config import TrainConfig
    from training.data import TensorSource
    from training.model import add_lora, load_transformer, lora_target_modules

    g = torch.Generator().manual_seed(0)
    n = 6
    source = TensorSource(
        [torch.randn(16, 8, 8, generator=g) for _ in range(n)],
        [torch.randn(8, 4096, generator=g) for _ in range(n)],
        [torch.randn(2048, generator=g) for _ in range(n)],
    )
    cfg = TrainConfig(steps=STEPS, batch_size=2, grad_accum=ACCUM, learning_rate=1e-3, rank=2, alpha=2, seed=4)
    model = load_transformer(paths.MODELS / "checkpoints" / paths.SD3_CHECKPOINT)
    add_lora(model, rank=2, alpha=2, targets=lora_target_modules(model, "attention"))
    return model, source, cfg


def _worker(out: Path) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from training.loop import train
    from training.model import adapter_state

    torch.set_num_threads(1)
    forwards, grad_syncs, all_reduces = [0], [], []

    class CountingAccelerator(Accelerator):
        def prepare_model(self, model, *args, **kwargs):
            ddp = super().prepare_model(model, *args, **kwargs)

            def hook(state, bucket):
                grad_syncs.append(forwards[0])
                return allreduce_hook(dist.group.WORLD, bucket)

            ddp.register_comm_hook(None, hook)
            return ddp

    plain_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        all_reduces.append(forwards[0])
        return plain_all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    model, source, cfg = _setup()
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    accelerator = CountingAccelerator(cpu=True)
    result = train(model, source, cfg, accelerator=accelerator)
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in adapter_state(model).items()}, str(out / "two.safetensors"))
        counts = {"forwards": forwards[0], "grad_syncs": grad_syncs, "all_reduces": all_reduces}
        (out / "counts.json").write_text(json.dumps({**counts, "losses": result.losses}))


@pytest.mark.slow
def test_accumulation_all_reduces_once_per_step_and_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    from training.loop import train
    from training.model import adapter_state

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, __file__, str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads((tmp_path / "counts.json").read_text())

    # Every all-reduce comes after a step's last micro-batch (forward ACCUM, 2*ACCUM, ...), none in between:
    # the gradients of each step (DDP, once) and the logged loss (one average per step).
    last_micro_batches = [ACCUM * (s + 1) for s in range(STEPS)]
    assert counts["forwards"] == STEPS * ACCUM
    assert sorted(set(counts["all_reduces"])) == last_micro_batches, counts["all_reduces"]
    assert sorted(set(counts["grad_syncs"])) == last_micro_batches, counts["grad_syncs"]
    buckets = len(counts["grad_syncs"]) // STEPS
    assert len(counts["all_reduces"]) == STEPS * (buckets + 1)

    model, source, cfg = _setup()
    one = train(model, source, cfg)
    assert one.losses == pytest.approx(counts["losses"], rel=1e-5)
    # the same LoRA up to float reduction order (Adam's normalisation amplifies it on tiny gradients)
    two, want = load_file(str(tmp_path / "two.safetensors")), adapter_state(model)
    assert two.keys() == want.keys()
    diff = sum(float((two[k] - want[k]).square().sum()) for k in want) ** 0.5
    norm = sum(float(want[k].square().sum()) for k in want) ** 0.5
    assert diff <= 1e-4 * norm, (diff, norm)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(Path(sys.argv[1]))
