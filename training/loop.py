"""The training loop: one readable function, diffusers-example style.

``train`` runs ``cfg.steps`` optimizer steps of the flow-matching loss on a transformer that already
carries its LoRA (see ``model.add_lora``), reading batches from a :class:`~.data.TrainingSource`.
After every step it calls ``on_step(info)``; the callback may raise (ComfyUI's Cancel does) and the
loop then writes a checkpoint of the finished step before re-raising, so ``resume`` continues the
run to the same result as an uninterrupted one. All randomness (noise, σ, caption dropout, LoRA
dropout) comes from seeded generators whose states are checkpointed.

It leaves ``torch.inference_mode`` (ComfyUI runs prompts inside it) and stops with a clear message
when the loss or the gradient stops being finite, without stepping the optimizer on that step.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Batch, TrainingSource
from .loss import flow_matching_loss, sample_sigmas
from .model import lora_parameters
from .optim import grad_norm_and_clip, make_optimizer, make_scheduler

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the LoRA weights are the last good ones."""


class DatasetTooSmallError(ValueError):
    pass


@dataclass
class StepInfo:
    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    epoch: int


@dataclass
class TrainResult:
    losses: list[float]
    step: int
    checkpoint: Path | None = None
    validations: list[Path] = field(default_factory=list)


OnStep = Callable[[StepInfo], None]


def check_source(source: TrainingSource, cfg: TrainConfig, world_size: int = 1) -> None:
    """Refuse a dataset that cannot fill one optimizer step (SimpleTuner's rule)."""
    need = cfg.batch_size * cfg.grad_accum
    if len(source) < need:
        raise DatasetTooSmallError(
            f"the dataset has {len(source)} sample(s) but one step needs batch_size x grad_accum = {need}; "
            "add images or lower batch_size / grad_accum"
        )
    if cfg.batch_size % world_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} is the global batch and must divide evenly over {world_size} processes"
        )


def _stream(source: TrainingSource, cfg: TrainConfig, epoch: int, skip: int) -> Iterator[tuple[Batch, int, int]]:
    """Batches forever, epoch after epoch; yields (batch, epoch, batches consumed in that epoch)."""
    while True:
        count = 0
        for i, batch in enumerate(source.batches(cfg.batch_size, cfg.seed, epoch, drop_last=True)):
            count += 1
            if i >= skip:
                yield batch, epoch, i + 1
        if count == 0:
            raise DatasetTooSmallError(f"epoch {epoch} produced no full batch of {cfg.batch_size}; lower batch_size")
        epoch, skip = epoch + 1, 0


def _drop_captions(
    batch: Batch, empty: tuple[torch.Tensor, torch.Tensor] | None, p: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if p <= 0 or empty is None:
        return batch.cond, batch.pooled
    drop = torch.rand(batch.cond.shape[0], generator=gen) < p
    if not drop.any():
        return batch.cond, batch.pooled
    empty_cond, empty_pooled = empty
    if empty_cond.shape[1:] != batch.cond.shape[1:]:
        raise ValueError(
            f"the cache's empty caption has shape {tuple(empty_cond.shape[1:])} but captions have "
            f"{tuple(batch.cond.shape[1:])}; rebuild the cache"
        )
    cond = torch.where(drop.view(-1, 1, 1), empty_cond.to(batch.cond.dtype), batch.cond)
    pooled = torch.where(drop.view(-1, 1), empty_pooled.to(batch.pooled.dtype), batch.pooled)
    return cond, pooled


def train(
    transformer,
    source: TrainingSource,
    cfg: TrainConfig,
    work_dir: str | os.PathLike | None = None,
    on_step: OnStep | None = None,
    resume: str | os.PathLike | bool | None = None,
    validate: Callable[[int], list[Path]] | None = None,
    accelerator=None,
    prior: TrainingSource | None = None,
) -> TrainResult:
    """Train the LoRA already attached to ``transformer``; checkpoints go to ``work_dir``.

    ``resume``: a checkpoint folder, or True for the newest one in ``work_dir``.
    ``validate(step)``: called every ``cfg.validation_every`` steps; returns the image files written.
    ``accelerator``: an ``accelerate.Accelerator`` for data-parallel runs. ``cfg.batch_size`` is the
    global batch: every process draws the same batch, noise and σ and trains on its slice, and DDP
    averages the gradients, so the result equals a one-process run (and resume works with any
    process count). Only the main process writes checkpoints and validates.
    ``prior``: DreamBooth-style class (regularisation) data; each micro-batch adds
    ``cfg.prior_loss_weight`` x the loss on a batch of it (no caption dropout there).
    """
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    main = rank == 0
    check_source(source, cfg, world)
    if world > 1 and cfg.quantization != "none":
        raise ValueError(
            "quantization with more than one process is not supported (PEFT LoRA on a quantised base fails under "
            "DDP); train unquantised across processes, or quantised in one process"
        )
    params = lora_parameters(transformer)
    if not params:
        raise ValueError("the transformer carries no LoRA; call model.add_lora first")
    device = params[0].device
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch_rng = torch.Generator().manual_seed(cfg.seed + 1).get_state()
    start, epoch, skip, losses = 0, 0, 0, []
    prior_epoch, prior_skip = 0, 0
    if resume:
        path = latest_checkpoint(work_dir) if resume is True and work_dir is not None else resume
        if path is None or path is True:
            raise FileNotFoundError(f"resume: no checkpoint found in {work_dir}")
        state = load_checkpoint(path, transformer, optimizer, scheduler)
        start, epoch, skip, losses = state.step, state.epoch, state.batch_in_epoch, state.losses
        prior_epoch, prior_skip = state.prior_epoch, state.prior_batch_in_epoch
        gen.set_state(state.generator)
        torch_rng = state.torch_rng
        logger.info("resumed from %s at step %d", path, start)
    empty = source.empty_text() if cfg.caption_dropout > 0 else None
    batches = _stream(source, cfg, epoch, skip)
    prior_batches = _stream(prior, cfg, prior_epoch, prior_skip) if prior is not None else None
    result = TrainResult(losses=losses, step=start)
    last_good: Path | None = None
    done = (epoch, skip, gen.get_state(), torch_rng, prior_epoch, prior_skip)  # state after the last finished step

    def checkpoint(step: int) -> Path | None:
        nonlocal last_good
        if work_dir is None:
            return None
        state = TrainState(step, done[0], done[1], list(losses), done[2], done[3], done[4], done[5])
        if main:
            last_good = save_checkpoint(
                work_dir, transformer, optimizer, scheduler, state, cfg.to_dict(), cfg.keep_checkpoints
            )
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return last_good

    model = accelerator.prepare_model(transformer) if world > 1 else transformer
    part = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)

    def batch_loss(batch: Batch, dropout: bool) -> torch.Tensor:
        """Flow-matching loss on this process's slice of a global batch (noise and σ drawn for all of it)."""
        cond, pooled = (
            _drop_captions(batch, empty, cfg.caption_dropout, gen) if dropout else (batch.cond, batch.pooled)
        )
        latents = batch.latents.float()
        noise = torch.randn(latents.shape, generator=gen)
        sigmas = sample_sigmas(
            latents.shape[0], gen, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.shift
        )
        return flow_matching_loss(
            model,
            latents[part].to(device),
            cond[part].to(device),
            pooled[part].to(device),
            noise[part].to(device),
            sigmas[part].to(device),
            cfg.loss_weighting,
        )

    step = start
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
        torch.set_rng_state(torch_rng)  # LoRA dropout draws from the global generator
        transformer.train()
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        try:
            for step in range(start + 1, cfg.steps + 1):
                step_loss = 0.0
                for _ in range(cfg.grad_accum):
                    batch, epoch, skip = next(batches)
                    loss = batch_loss(batch, dropout=True)
                    if prior_batches is not None:
                        prior_batch, prior_epoch, prior_skip = next(prior_batches)
                        loss = loss + cfg.prior_loss_weight * batch_loss(prior_batch, dropout=False)
                    (loss / cfg.grad_accum).backward()
                    if world > 1:
                        loss = accelerator.reduce(loss.detach(), "mean")
                    step_loss += loss.item() / cfg.grad_accum
                grad_norm = grad_norm_and_clip(params, cfg.max_grad_norm)
                if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                    what = "loss" if not math.isfinite(step_loss) else "gradient norm"
                    value = step_loss if what == "loss" else grad_norm
                    where = str(last_good) if last_good else "none saved yet"
                    raise NonFiniteLossError(
                        f"{what} became {value} at step {step}; last good checkpoint at {where}; "
                        "try a lower learning rate or max_grad_norm"
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(step_loss)
                result.step = step
                done = (epoch, skip, gen.get_state(), torch.get_rng_state(), prior_epoch, prior_skip)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    checkpoint(step)
                if main and validate is not None and cfg.validation_every and step % cfg.validation_every == 0:
                    transformer.eval()
                    result.validations = validate(step)
                    transformer.train()
                if on_step is not None:
                    on_step(StepInfo(step, cfg.steps, step_loss, scheduler.get_last_lr()[0], grad_norm, epoch))
            result.checkpoint = checkpoint(result.step)
        except NonFiniteLossError:
            optimizer.zero_grad(set_to_none=True)
            raise
        except BaseException:
            # Cancel (or any error) after a finished step: keep that step so the run can resume.
            optimizer.zero_grad(set_to_none=True)
            if (
                result.step > start
                and work_dir is not None
                and (last_good is None or result.step > _step_of(last_good))
            ):
                checkpoint(result.step)
            raise
        finally:
            if cfg.gradient_checkpointing:
                transformer.disable_gradient_checkpointing()
            transformer.eval()
    return result


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])
