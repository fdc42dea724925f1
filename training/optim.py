"""Optimizers and learning-rate schedules for the LoRA parameters.

``adamw`` is torch's AdamW with fp32 states. ``adamw_lowmem`` is bitsandbytes' 8-bit AdamW when that
package is installed and the parameters live on CUDA, and otherwise :class:`BF16AdamW` (AdamW whose
moment estimates are stored in bfloat16: half the state memory, maths in fp32). ``prodigy`` and
``stableadamw`` come from optional packages (``prodigyopt``, ``torch-optimi``). Schedules are
diffusers' ``get_scheduler`` (constant / linear / cosine / cosine with restarts / polynomial, with
warmup).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

from .config import TrainConfig

logger = logging.getLogger(__name__)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) keeping ``exp_avg`` / ``exp_avg_sq`` in bfloat16.

    Why it exists: the low-memory choice where bitsandbytes' 8-bit AdamW cannot run (CPU, or the
    package missing); torch's AdamW keeps its states in the parameters' dtype (fp32 for a LoRA).
    """

    def __init__(
        self, params: Iterable[torch.nn.Parameter], lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    ):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = float(state["step"])
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**step))
        return loss


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    lr, wd = cfg.learning_rate, cfg.weight_decay
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "adamw_lowmem":
        if all(p.is_cuda for p in params):
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)
            except ImportError:
                logger.info("bitsandbytes not installed: adamw_lowmem uses bf16 optimizer states")
        return BF16AdamW(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as err:
            raise ValueError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt") from err
        return Prodigy(params, lr=lr, weight_decay=wd)
    if cfg.optimizer == "stableadamw":
        try:
            from optimi import StableAdamW
        except ImportError as err:
            raise ValueError(
                "optimizer 'stableadamw' needs the torch-optimi package: pip install torch-optimi"
            ) from err
        return StableAdamW(params, lr=lr, weight_decay=wd)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" and cfg.warmup_steps else cfg.lr_scheduler
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.steps,
        num_cycles=cfg.lr_cycles,
        power=cfg.lr_power,
    )


def grad_norm_and_clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Total gradient norm (before clipping); clip to ``max_norm`` unless it is 0."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm)
