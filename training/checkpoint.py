"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``checkpoint-<step>/`` with ``adapter.safetensors`` (the LoRA weights under
peft's names), ``optimizer.safetensors`` (the optimizer's tensors plus the RNG states) and
``state.json`` (step, data position, losses, scheduler, optimizer scalars, the config). It is written
into a temp folder and renamed into place, so a crash never leaves a half checkpoint; only the newest
``keep`` checkpoints are kept. No pickle anywhere: tensors go to safetensors, the rest to JSON.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fs import atomic_save_safetensors
from .model import adapter_state, load_adapter_state

logger = logging.getLogger(__name__)

_NAME = re.compile(r"checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where a run stands after its last finished step; the loop updates it in place after every step."""

    step: int
    epoch: int  # data position: the epoch of the last batch drawn ...
    batch_in_epoch: int  # ... and how many batches of it were drawn
    losses: list[float]
    generator: torch.Tensor  # state of the generator of noise, σ and caption dropout
    torch_rng: torch.Tensor  # state of torch's global CPU generator (LoRA dropout)
    prior_epoch: int = 0
    prior_batch_in_epoch: int = 0

    @classmethod
    def fresh(cls, seed: int) -> TrainState:
        """Step 0 of a run with this seed."""
        generator = torch.Generator().manual_seed(seed).get_state()
        torch_rng = torch.Generator().manual_seed(seed + 1).get_state()
        return cls(step=0, epoch=0, batch_in_epoch=0, losses=[], generator=generator, torch_rng=torch_rng)


@dataclass
class Restored:
    """A checkpoint a run continues from, and the newer ones skipped because they were damaged."""

    path: Path
    state: TrainState
    skipped: list[str] = field(default_factory=list)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, entries in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    root: str | os.PathLike,
    transformer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    state: TrainState,
    config: dict[str, Any],
    keep: int,
) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=root))
    try:
        atomic_save_safetensors(tmp / "adapter.safetensors", adapter_state(transformer))
        opt_tensors, opt_rest = _split_optimizer(optimizer.state_dict())
        opt_tensors["rng.generator"] = state.generator
        opt_tensors["rng.torch"] = state.torch_rng
        atomic_save_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        info = {
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "prior_epoch": state.prior_epoch,
            "prior_batch_in_epoch": state.prior_batch_in_epoch,
            "losses": list(state.losses),
            "scheduler": scheduler.state_dict(),
            "optimizer": opt_rest,
            "config": config,
        }
        (tmp / "state.json").write_text(json.dumps(info))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, transformer, optimizer: torch.optim.Optimizer, scheduler) -> TrainState:
    """Restore LoRA weights, optimizer and scheduler in place; return the step, data position and RNG."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(
            f"{path} is not a training checkpoint (no state.json); pick a checkpoint-<step> folder"
        )
    info = json.loads((path / "state.json").read_text())
    load_adapter_state(transformer, load_file(str(path / "adapter.safetensors")), path.name)
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(_join_optimizer(tensors, info["optimizer"]))
    scheduler.load_state_dict(info["scheduler"])
    return TrainState(
        step=info["step"],
        epoch=info["epoch"],
        batch_in_epoch=info["batch_in_epoch"],
        losses=list(info["losses"]),
        generator=tensors["rng.generator"],
        torch_rng=tensors["rng.torch"],
        prior_epoch=info.get("prior_epoch", 0),
        prior_batch_in_epoch=info.get("prior_batch_in_epoch", 0),
    )


def restore_checkpoint(
    path: str | os.PathLike | None, root: str | os.PathLike | None, transformer, optimizer, scheduler
) -> Restored:
    """Restore ``path``, or with ``path=None`` the newest checkpoint in ``root``."""
    if path is None:
        path = latest_checkpoint(root) if root is not None else None
        if path is None:
            raise FileNotFoundError(f"resume: no checkpoint found in {root}")
    state = load_checkpoint(path, transformer, optimizer, scheduler)
    logger.info("resumed from %s at step %d", path, state.step)
    return Restored(Path(path), state)
