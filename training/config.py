"""Every setting of a training run, validated up front so a bad value fails before any model loads.

One frozen dataclass is shared by the node, the CLI (JSON/TOML files) and the checkpoints (its
fields are stored with every checkpoint and in the LoRA header), so a run is fully described by it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .model import DTYPES, PRESETS, QUANT
from .options import LOSS_WEIGHTING, OPTIMIZERS, SCHEDULES, TIMESTEP_SAMPLING


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
    apg_eta: float = 0.0
    apg_norm_threshold: float = 5.0
    apg_momentum: float = 0.0
    save_dtype: str = "bf16"

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"{field} {rule}, got {getattr(self, field)!r}")

        need(self.steps >= 1, "steps", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(0 < self.learning_rate <= 1, "learning_rate", "must be in (0, 1]; 1e-4 is a safe start")
        need(1 <= self.rank <= 1024, "rank", "must be in 1-1024")
        need(self.alpha > 0, "alpha", "must be > 0 (alpha = rank gives scale 1)")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}")
        need(self.base_dtype in DTYPES, "base_dtype", f"must be one of {sorted(DTYPES)}")
        need(self.save_dtype in DTYPES, "save_dtype", f"must be one of {sorted(DTYPES)}")
        need(self.quantization in QUANT, "quantization", f"must be one of {QUANT}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.lr_scheduler in SCHEDULES, "lr_scheduler", f"must be one of {SCHEDULES}")
        need(0 <= self.warmup_steps < self.steps or self.warmup_steps == 0, "warmup_steps", "must be < steps")
        need(self.lr_cycles >= 1, "lr_cycles", "must be >= 1")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.timestep_sampling in TIMESTEP_SAMPLING, "timestep_sampling", f"must be one of {TIMESTEP_SAMPLING}")
        need(self.logit_std > 0, "logit_std", "must be > 0")
        need(self.shift > 0, "shift", "must be > 0 (1.0 disables the shift)")
        need(self.loss_weighting in LOSS_WEIGHTING, "loss_weighting", f"must be one of {LOSS_WEIGHTING}")
        need(0 <= self.caption_dropout <= 1, "caption_dropout", "must be in [0, 1]")
        need(self.prior_loss_weight >= 0, "prior_loss_weight", "must be >= 0")
        need(self.repeats >= 1, "repeats", "must be >= 1")
        need(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0 (0: only at the end)")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.validation_every >= 0, "validation_every", "must be >= 0 (0 disables validation)")
        need(self.validation_steps >= 1, "validation_steps", "must be >= 1")
        need(self.apg_norm_threshold >= 0, "apg_norm_threshold", "must be >= 0 (0 disables clipping)")

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
