"""The command line over a config file, one process and two data-parallel processes (accelerate, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools import paths
from training.data import TensorSource
from training.fs import atomic_save_safetensors

REPO = Path(__file__).resolve().parents[2]


def save_tensor_source(path: Path, source: TensorSource) -> None:
    """Write an in-memory source in the CLI's one-file format (see ``training.data.load_tensor_source``)."""
    tensors = {
        "latents": torch.stack(source.latents),
        "cond": torch.stack(source.cond),
        "pooled": torch.stack(source.pooled),
    }
    empty_cond, empty_pooled = source.empty_text()
    tensors.update(empty_cond=empty_cond, empty_pooled=empty_pooled)
    for i, (_, cond, pooled) in enumerate(source.validation_prompts()):
        tensors[f"prompt.{i}.cond"], tensors[f"prompt.{i}.pooled"] = cond, pooled
    meta = {
        "captions": json.dumps(source.captions),
        "prompts": json.dumps([p for p, _, _ in source.validation_prompts()]),
        "meta": json.dumps(source.meta),
    }
    atomic_save_safetensors(path, tensors, meta)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(0)
    n = 4
    source = TensorSource(
        [torch.randn(16, 8, 8, generator=g) for _ in range(n)],
        [torch.randn(8, 4096, generator=g) for _ in range(n)],
        [torch.randn(2048, generator=g) for _ in range(n)],
        meta={"latent_channels": 16, "text_dim": 4096, "pooled_dim": 2048},
    )
    path = tmp_path_factory.mktemp("data") / "tensors.safetensors"
    save_tensor_source(path, source)
    return path


def _config(tmp_path: Path, data: Path, name: str, **train) -> Path:
    spec = {
        "base_model": str(paths.MODELS / "checkpoints" / paths.SD3_CHECKPOINT),
        "tensors": str(data),
        "output": str(tmp_path / f"{name}.safetensors"),
        "work_dir": str(tmp_path / f"{name}_run"),
        "train": {
            "steps": 4,
            "batch_size": 4,
            "rank": 2,
            "alpha": 4,
            "learning_rate": 1e-3,
            "save_dtype": "fp32",
            "seed": 1,
            **train,
        },
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _run(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes > 1:
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",  # torchrun under accelerate; the CLI asks Accelerator for CPU (gloo) itself
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "training",
        ]
    else:
        launch = [sys.executable, "-m", "training"]
    done = subprocess.run([*launch, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _close(a: Path, b: Path) -> None:
    """Same LoRA up to float reduction order (Adam's normalisation amplifies it on tiny gradients)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    diff = sum(float((ta[k] - tb[k]).square().sum()) for k in ta) ** 0.5
    norm = sum(float(ta[k].square().sum()) for k in ta) ** 0.5
    assert diff <= 1e-4 * norm, (diff, norm)


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_process_counts(tmp_path, data):
    one = _run(["train", "--config", str(_config(tmp_path, data, "one")), "--log-every", "1"])
    assert "step 4/4" in one.stderr and (tmp_path / "one.safetensors").is_file()
    meta_lora = load_file(str(tmp_path / "one.safetensors"))
    assert all(k.startswith("transformer.") for k in meta_lora)

    two = _run(["train", "--config", str(_config(tmp_path, data, "two"))], processes=2)
    assert "data-parallel: 2 processes (DistributedType.MULTI_CPU), 2 samples each per batch" in two.stderr
    _close(tmp_path / "one.safetensors", tmp_path / "two.safetensors")

    # 2 steps in one process, then the last 2 resumed in two processes
    split = _config(tmp_path, data, "split")
    _run(["train", "--config", str(split), "--set", "steps=2"])
    spec = json.loads(split.read_text())
    split.write_text(json.dumps({**spec, "resume": True}))
    _run(["train", "--config", str(split)], processes=2)
    _close(tmp_path / "one.safetensors", tmp_path / "split.safetensors")


def test_bad_config_is_named(tmp_path, data):
    path = _config(tmp_path, data, "bad", rank=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "training", "train", "--config", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "rank must be in 1-1024" in done.stderr
