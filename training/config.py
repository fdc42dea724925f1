"""Every setting of a training run, validated up front so a bad value fails before any model loads.

One frozen dataclass is shared by the node, the CLI (JSON/TOML files) and the checkpoints (its
fields are stored with every checkpoint and in the LoRA header), so a run is fully described by it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .model import DTYPES, PRESETS, QUANT
from .options import LOSS_WEIGHTING, MEMORY_PRESETS, OPTIMIZERS, SCHEDULES, TIMESTEP_SAMPLING


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-4
    rank: int = 16
    alpha: float = 16.0
    lora_dropout: float = 0.0
    preset: str = "attention"
    blocks: str = ""  # e.g. "12-24"; empty: every block
    exclude_blocks: str = ""  # e.g. "30-37"
    base_dtype: str = "fp32"
    quantization: str = "none"
    gradient_checkpointing: bool = False
    block_offload: bool = False  # frozen blocks in CPU RAM, one at a time on the device (needs checkpointing)
    memory_preset: str = "manual"  # "auto": the settings above chosen for the detected GPU (training.memory)
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    lr_cycles: int = 1
    lr_power: float = 1.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    timestep_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 3.0
    loss_weighting: str = "none"
    caption_dropout: float = 0.0
    prior_loss_weight: float = 1.0  # DreamBooth class-data loss weight (only with a class dataset)
    repeats: int = 1
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end and on cancel
    keep_checkpoints: int = 3
    validation_every: int = 0  # 0: no validation samples
    validation_steps: int = 20
    validation_cfg: float = 4.0
    apg_eta: float = 0.0  # validation samples' APG: the APG node's defaults (r scaled to the latent size)
    apg_norm_threshold: float = 15.0
    apg_momentum: float = -0.5
    save_dtype: str = "bf16"

    def __post_init__(self) -> None:
        problems = config_problems(self.to_dict())
        if problems:
            raise ValueError("; ".join(problems.values()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def _choice(options) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"must be one of {sorted(options)}"


def _at_least(low: float, note: str = "") -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"must be >= {low:g}{note}"


def _blocks_ok(spec: str) -> bool:
    """Readable block list; indices are checked against the real model when it loads (SD3.5 Large has 38)."""
    from .model import parse_blocks

    try:
        parse_blocks(spec, MAX_BLOCKS)
    except ValueError:
        return False
    return True


MAX_BLOCKS = 1000
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": _at_least(1),
    "batch_size": _at_least(1),
    "grad_accum": _at_least(1),
    "learning_rate": ((lambda v: 0 < v <= 1), "must be in (0, 1]; 1e-4 is a safe start"),
    "rank": ((lambda v: 1 <= v <= 1024), "must be in 1-1024"),
    "alpha": ((lambda v: v > 0), "must be > 0 (alpha = rank gives scale 1)"),
    "lora_dropout": ((lambda v: 0 <= v < 1), "must be in [0, 1)"),
    "preset": _choice(PRESETS),
    "blocks": (_blocks_ok, "must list block indices like '12-24,30' (empty: every block)"),
    "exclude_blocks": (_blocks_ok, "must list block indices like '30-37' (empty: none)"),
    "base_dtype": _choice(DTYPES),
    "save_dtype": _choice(DTYPES),
    "quantization": _choice(QUANT),
    "memory_preset": _choice(MEMORY_PRESETS),
    "optimizer": _choice(OPTIMIZERS),
    "weight_decay": _at_least(0),
    "lr_scheduler": _choice(SCHEDULES),
    "warmup_steps": _at_least(0),
    "lr_cycles": _at_least(1),
    "max_grad_norm": _at_least(0, " (0 disables clipping)"),
    "timestep_sampling": _choice(TIMESTEP_SAMPLING),
    "logit_std": ((lambda v: v > 0), "must be > 0"),
    "shift": ((lambda v: v > 0), "must be > 0 (1.0 disables the shift)"),
    "loss_weighting": _choice(LOSS_WEIGHTING),
    "caption_dropout": ((lambda v: 0 <= v <= 1), "must be in [0, 1]"),
    "prior_loss_weight": _at_least(0),
    "repeats": _at_least(1),
    "checkpoint_every": _at_least(0, " (0: only at the end)"),
    "keep_checkpoints": _at_least(1),
    "validation_every": _at_least(0, " (0 disables validation)"),
    "validation_steps": _at_least(1),
    "validation_cfg": _at_least(1, " (1 = unguided)"),
    "apg_norm_threshold": _at_least(0, " (0 disables clipping)"),
}


def config_problems(values: Mapping[str, Any]) -> dict[str, str]:
    """What is wrong with any subset of TrainConfig's fields: ``{field: "field must be ..., got X"}``.

    The one check of training settings: ``TrainConfig`` runs it on every field, the nodes'
    ``validate_inputs`` on the inputs they hold, so ComfyUI refuses a bad value before the run with the
    same words. Floats must be finite; rules between two fields apply when both are given.
    """
    problems: dict[str, str] = {}
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            problems[name] = f"{name} must be a finite number, got {value!r}"
        elif name in _RULES and not _RULES[name][0](value):
            problems[name] = f"{name} {_RULES[name][1]}, got {value!r}"
    warmup, steps = values.get("warmup_steps"), values.get("steps")
    if "warmup_steps" not in problems and warmup and steps is not None and warmup >= steps:
        problems["warmup_steps"] = f"warmup_steps must be < steps ({steps}), got {warmup!r}"
    if values.get("block_offload") and values.get("gradient_checkpointing") is False:
        problems["block_offload"] = (
            "block_offload needs gradient_checkpointing on (without it the backward pass keeps every block's "
            "weights on the device, and offloading saves nothing); turn gradient_checkpointing on"
        )
    return problems


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON or TOML file into a dict (the CLI's format)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    raise ValueError(f"{path.name}: config files are .json or .toml")
