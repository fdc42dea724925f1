"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder ``checkpoint-<step>/`` with ``adapter.safetensors`` (the LoRA weights under
peft's names), ``optimizer.safetensors`` (the optimizer's tensors plus the RNG states) and
``state.json`` (step, data position, losses, scheduler, optimizer scalars, the config, and the
SHA-256 of both tensor files). No pickle anywhere: tensors go to safetensors, the rest to JSON.

Saving is atomic (``fs.atomic_folder``): the new checkpoint is written and fsynced in a uniquely
named temp folder, renamed into place, and only then is an old folder of that name removed; only
the newest ``keep`` checkpoints stay (older ones are renamed away before they are deleted, so none is
ever seen half-deleted). Rotation only ever sees the current run's checkpoints: a fresh run first
moves an earlier run's out of the way (``run_folder``). Temp folders of killed runs are removed by the next run.

Resuming reads a checkpoint whole and checks it before anything is changed: every file present and
readable, ``state.json`` with the right fields and types, tensor files matching their checksums,
the adapter's names and shapes matching the run's LoRA. A damaged checkpoint is named with its file
and the reason; resuming the newest one falls back to the newest intact one (and says so), or
refuses with what to do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .fs import (
    atomic_folder,
    atomic_save_safetensors,
    atomic_write_json,
    file_sha256,
    remove_folder,
    remove_stale_temps,
)
from .model import adapter_mismatch, adapter_state, load_adapter_state

logger = logging.getLogger(__name__)

ADAPTER, OPTIMIZER, STATE = "adapter.safetensors", "optimizer.safetensors", "state.json"
_NAME = re.compile(r"checkpoint-(\d+)$")
_LEGACY_TEMP = re.compile(r"\.checkpoint-[a-z0-9_]{8}$")  # tempfile.mkdtemp names of earlier versions
_COUNTERS = ("step", "epoch", "batch_in_epoch", "prior_epoch", "prior_batch_in_epoch")
_RNG_BYTES = torch.Generator().get_state().numel()


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and the reason."""


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
    """The ``checkpoint-<step>`` folders in ``root``, oldest step first (intact or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def clean_work_dir(root: str | os.PathLike) -> None:
    """Remove the temp files and folders killed runs left in a run folder (checkpoints, validation images),
    and put back a checkpoint that a killed save had moved aside."""
    root = Path(root)
    if not root.is_dir():
        return
    removed = remove_stale_temps(root, recursive=True)
    for path in root.iterdir():
        if _LEGACY_TEMP.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in removed:
        logger.info("removed %s, left by an interrupted save", path)


# -- saving ----------------------------------------------------------------------------------------


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
    """Write ``root/checkpoint-<step>`` atomically, then drop all but the newest ``keep``."""
    root = Path(root)
    final = root / f"checkpoint-{state.step:06d}"
    opt_tensors, opt_rest = _split_optimizer(optimizer.state_dict())
    opt_tensors["rng.generator"] = state.generator
    opt_tensors["rng.torch"] = state.torch_rng
    with atomic_folder(final) as tmp:
        atomic_save_safetensors(tmp / ADAPTER, adapter_state(transformer))
        atomic_save_safetensors(tmp / OPTIMIZER, opt_tensors)
        info = {
            **{name: getattr(state, name) for name in _COUNTERS},
            "losses": list(state.losses),
            "scheduler": scheduler.state_dict(),
            "optimizer": opt_rest,
            "config": config,
            "sha256": {name: file_sha256(tmp / name) for name in (ADAPTER, OPTIMIZER)},
        }
        atomic_write_json(tmp / STATE, info)
    for old in list_checkpoints(root)[:-keep]:
        remove_folder(old)
    return final


# -- reading and checking --------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    path: Path
    info: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]


def _damaged(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: {reason}")


def _read_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _damaged(path, "is missing")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"is not valid JSON ({err})") from err
    if not isinstance(info, dict):
        raise _damaged(path, f"holds a {type(info).__name__}, not the checkpoint's fields")
    for name in _COUNTERS:
        value = info.get(name, 0) if name.startswith("prior_") else info.get(name)
        if type(value) is not int or value < 0:
            raise _damaged(path, f"field {name!r} should be a whole number >= 0, found {value!r}")
    kinds = {"losses": list, "scheduler": dict, "optimizer": dict, "config": dict}
    for name, kind in kinds.items():
        if not isinstance(info.get(name), kind):
            raise _damaged(path, f"field {name!r} should be a {kind.__name__}, found {info.get(name)!r:.80}")
    if not all(type(v) in (int, float) for v in info["losses"]) or len(info["losses"]) != info["step"]:
        raise _damaged(path, f"field 'losses' should hold {info['step']} numbers, one per step")
    opt = info["optimizer"]
    groups = opt.get("param_groups")
    if not (
        isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise _damaged(path, "field 'optimizer' has no valid 'param_groups'")
    if not isinstance(opt.get("scalars"), dict):
        raise _damaged(path, "field 'optimizer' has no valid 'scalars'")
    return info


def _read_tensors(path: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise _damaged(path, "is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _damaged(path, f"cannot be read as safetensors, it is truncated or overwritten ({err})") from err
    if sha256 is not None and file_sha256(path) != sha256:
        raise _damaged(path, "does not match the checksum in state.json (changed or damaged after it was saved)")
    return tensors


def read_checkpoint(path: str | os.PathLike, adapter_shapes: dict[str, tuple[int, ...]]) -> _Checkpoint:
    """Read and check a checkpoint folder whole; CheckpointError names the damaged file and why."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder; pick a checkpoint-<step> folder")
    info = _read_state(path / STATE)
    match = _NAME.match(path.name)
    if match and int(match.group(1)) != info["step"]:
        raise _damaged(path / STATE, f"says step {info['step']}, but the folder is named for step {match.group(1)}")
    sums = info.get("sha256") if isinstance(info.get("sha256"), dict) else {}
    adapter = _read_tensors(path / ADAPTER, sums.get(ADAPTER))
    why = adapter_mismatch(adapter_shapes, {k: tuple(v.shape) for k, v in adapter.items()})
    if why:
        raise _damaged(
            path / ADAPTER, f"does not fit this run's LoRA: {why}; resume with the same preset, blocks and rank"
        )
    optimizer = _read_tensors(path / OPTIMIZER, sums.get(OPTIMIZER))
    for key in ("rng.generator", "rng.torch"):
        rng = optimizer.get(key)
        if rng is None or rng.dtype != torch.uint8 or rng.numel() != _RNG_BYTES:
            raise _damaged(path / OPTIMIZER, f"has no valid random-generator state {key!r}")
    params = sum(len(g["params"]) for g in info["optimizer"]["param_groups"])
    if params != len(adapter_shapes):
        raise _damaged(
            path / STATE, f"describes an optimizer over {params} tensors; this run's LoRA has {len(adapter)}"
        )
    return _Checkpoint(path, info, adapter, optimizer)


def _apply(ckpt: _Checkpoint, transformer, optimizer: torch.optim.Optimizer, scheduler) -> TrainState:
    """Put a checked checkpoint's weights, optimizer and schedule in place; return its state."""
    info = ckpt.info
    load_adapter_state(transformer, ckpt.adapter, str(ckpt.path / ADAPTER))
    try:
        optimizer.load_state_dict(_join_optimizer(ckpt.optimizer, info["optimizer"]))
        scheduler.load_state_dict(info["scheduler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise _damaged(ckpt.path / STATE, f"holds an optimizer or schedule this run cannot take ({err!r})") from err
    return TrainState(
        **{name: info.get(name, 0) for name in _COUNTERS},
        losses=[float(v) for v in info["losses"]],
        generator=ckpt.optimizer["rng.generator"],
        torch_rng=ckpt.optimizer["rng.torch"],
    )


def restore_checkpoint(
    path: str | os.PathLike | None, root: str | os.PathLike | None, transformer, optimizer, scheduler
) -> Restored:
    """Restore ``path`` (refused if damaged), or with ``path=None`` the newest intact checkpoint in ``root``."""
    if path is not None:
        candidates = [Path(path)]
    else:
        candidates = list_checkpoints(root)[::-1] if root is not None else []
        if not candidates:
            raise FileNotFoundError(f"resume: no checkpoint found in {root}; turn resume off to start a new run")
    shapes = {k: tuple(v.shape) for k, v in adapter_state(transformer).items()}
    skipped: list[str] = []
    for candidate in candidates:
        try:
            state = _apply(read_checkpoint(candidate, shapes), transformer, optimizer, scheduler)
        except CheckpointError as err:
            if path is not None:
                raise CheckpointError(f"cannot resume: {err}. Pick another checkpoint folder") from err
            logger.warning("skipping a damaged checkpoint: %s", err)
            skipped.append(str(err))
            continue
        if skipped:
            logger.warning("resuming from %s, the newest intact checkpoint (step %d)", candidate, state.step)
        else:
            logger.info("resumed from %s at step %d", candidate, state.step)
        return Restored(candidate, state, skipped)
    raise CheckpointError(
        f"cannot resume: no intact checkpoint in {root}: " + "; ".join(skipped) + ". Delete the damaged "
        "checkpoint folders, or turn resume off to train from step 0"
    )
