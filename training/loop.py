"""The training loop, read top to bottom in :meth:`Trainer.fit` as diffusers' SD3 LoRA example reads.

``Trainer(source, cfg)`` checks the data can fill an optimizer step (cheap, before any model
loads); ``fit(transformer)`` then runs ``cfg.steps`` optimizer steps of the flow-matching loss on a
transformer that already carries its LoRA (see ``model.add_lora``). After every step it calls
``on_step(info)``; the callback may raise (ComfyUI's Cancel does) and the loop then writes a
checkpoint of the finished step before re-raising, so a resume continues the run to the same
result as an uninterrupted one. All randomness (noise, σ, caption dropout, LoRA dropout) comes from
seeded generators whose states are checkpointed with the rest of :class:`TrainState`.

Training leaves ``torch.inference_mode`` (ComfyUI runs prompts inside it) and stops with a clear
message when the loss or the gradient stops being finite, without stepping the optimizer on that
step. Under ``accelerate`` (data parallel), gradients are all-reduced once per optimizer step, on
the last micro-batch (``no_sync`` on the others).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Restored, TrainState, clean_work_dir, restore_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Batch, TrainingSource
from .loss import flow_matching_loss, sample_sigmas
from .model import lora_parameters
from .optim import grad_norm_and_clip, make_optimizer, make_scheduler
from .run_folder import archive_earlier_run

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
    resumed_from: Path | None = None  # the checkpoint the run continued from
    damaged: list[str] = field(default_factory=list)  # newer checkpoints skipped on resume, with the reason
    archived: Path | None = None  # where a fresh run moved an earlier run's files in its work_dir


OnStep = Callable[[StepInfo], None]
Validate = Callable[[int], None]  # called with the finished step every cfg.validation_every steps


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


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Autograd on, even inside ComfyUI's ``torch.inference_mode`` (also usable as a decorator)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


class Trainer:
    """One LoRA training run over pre-encoded data (and optional DreamBooth class data ``prior``).

    ``accelerator``: an ``accelerate.Accelerator`` for data-parallel runs. ``cfg.batch_size`` is the
    global batch: every process draws the same batch, noise and σ and trains on its slice, and DDP
    averages the gradients, so the result equals a one-process run (and resume works with any
    process count). Only the main process writes checkpoints and validates.
    ``prior``: each micro-batch adds ``cfg.prior_loss_weight`` x the loss on a batch of it (no
    caption dropout there).
    """

    def __init__(
        self, source: TrainingSource, cfg: TrainConfig, prior: TrainingSource | None = None, accelerator=None
    ) -> None:
        self.source, self.cfg, self.prior, self.accelerator = source, cfg, prior, accelerator
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.main = self.rank == 0  # the process that writes checkpoints and validates
        for data in (source, prior):
            if data is not None:
                check_source(data, cfg, self.world)
        if self.world > 1 and cfg.quantization != "none":
            raise ValueError(
                "quantization with more than one process is not supported (PEFT LoRA on a quantised base fails "
                "under DDP); train unquantised across processes, or quantised in one process"
            )

    def fit(
        self,
        transformer,
        work_dir: str | os.PathLike | None = None,
        on_step: OnStep | None = None,
        resume: str | os.PathLike | bool | None = None,
        validate: Validate | None = None,
    ) -> TrainResult:
        """Train the LoRA attached to ``transformer``; checkpoints go to ``work_dir``.

        ``resume``: a checkpoint folder, or True for the newest intact one in ``work_dir``. Without it, an
        earlier run's checkpoints and validation images in ``work_dir`` are first moved to a ``previous-*``
        folder there (``run_folder.archive_earlier_run``), so this run's saves and rotation never touch them.
        """
        with grad_enabled():
            run = _Run(self, transformer, work_dir, resume)
            with run.training(), torch.random.fork_rng(devices=[]):
                torch.set_rng_state(run.state.torch_rng)  # LoRA dropout draws from the global generator
                try:
                    while run.state.step < self.cfg.steps:
                        info = run.optimizer_step()
                        run.after_step(info, validate, on_step)
                    run.save_unsaved_progress()
                except BaseException as err:
                    run.optimizer.zero_grad(set_to_none=True)
                    if not isinstance(err, NonFiniteLossError):  # Cancel or an error: keep the finished steps
                        run.save_unsaved_progress()
                    raise
        result = TrainResult(run.state.losses, run.state.step, archived=run.archived)
        if run.resumed is not None:
            result.resumed_from, result.damaged = run.resumed.path, run.resumed.skipped
        return result


def train(
    transformer,
    source: TrainingSource,
    cfg: TrainConfig,
    work_dir: str | os.PathLike | None = None,
    on_step: OnStep | None = None,
    resume: str | os.PathLike | bool | None = None,
    validate: Validate | None = None,
    accelerator=None,
    prior: TrainingSource | None = None,
) -> TrainResult:
    """``Trainer(source, cfg, prior, accelerator).fit(transformer, ...)`` in one call."""
    return Trainer(source, cfg, prior, accelerator).fit(transformer, work_dir, on_step, resume, validate)


class _Feed:
    """Global batches of one dataset, epoch after epoch, from a saved position.

    ``epoch`` and ``drawn`` (batches drawn in that epoch) always describe the last batch handed out,
    which is what a checkpoint stores to continue exactly there.
    """

    def __init__(self, source: TrainingSource, cfg: TrainConfig, epoch: int, drawn: int) -> None:
        self.source, self.batch_size, self.seed = source, cfg.batch_size, cfg.seed
        self.epoch, self.drawn = epoch, drawn
        self._batches = self._epochs()

    def __next__(self) -> Batch:
        return next(self._batches)

    def _epochs(self) -> Iterator[Batch]:
        while True:
            count = 0
            for i, batch in enumerate(self.source.batches(self.batch_size, self.seed, self.epoch, drop_last=True)):
                count += 1
                if i >= self.drawn:
                    self.drawn = i + 1
                    yield batch
            if count == 0:
                raise DatasetTooSmallError(
                    f"epoch {self.epoch} produced no full batch of {self.batch_size}; lower batch_size"
                )
            self.epoch, self.drawn = self.epoch + 1, 0


class _Run:
    """What one ``fit`` holds: model, optimizer, schedule, generators, data positions and the saved state."""

    def __init__(self, trainer: Trainer, transformer, work_dir: str | os.PathLike | None, resume) -> None:
        cfg, world = trainer.cfg, trainer.world
        self.cfg, self.accelerator, self.world, self.main = cfg, trainer.accelerator, world, trainer.main
        self.transformer = transformer
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.params = lora_parameters(transformer)
        self.device = self.params[0].device
        self.optimizer = make_optimizer(self.params, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.archived: Path | None = None
        if self.work_dir is not None and self.main:
            clean_work_dir(self.work_dir)  # temps of killed runs; a checkpoint a killed save moved aside
            self.archived = None if resume else archive_earlier_run(self.work_dir)
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        self.resumed = self.restore(resume) if resume else None
        self.state = self.resumed.state if self.resumed else TrainState.fresh(cfg.seed)
        self.start = self.saved_step = self.state.step  # saved_step: the newest step on disk
        self.last_good = self.resumed.path if self.resumed else None
        self.gen = torch.Generator()
        self.gen.set_state(self.state.generator)
        self.empty = trainer.source.empty_text() if cfg.caption_dropout > 0 else None
        self.feed = _Feed(trainer.source, cfg, self.state.epoch, self.state.batch_in_epoch)
        self.prior_feed = (
            _Feed(trainer.prior, cfg, self.state.prior_epoch, self.state.prior_batch_in_epoch)
            if trainer.prior is not None
            else None
        )
        self.model = self.accelerator.prepare_model(transformer) if world > 1 else transformer
        lo, hi = trainer.rank * cfg.batch_size // world, (trainer.rank + 1) * cfg.batch_size // world
        self.part = slice(lo, hi)

    def restore(self, resume: str | os.PathLike | bool) -> Restored:
        """Weights, optimizer and schedule from the asked checkpoint (``True``: the newest intact one)."""
        path = None if resume is True else Path(resume)
        return restore_checkpoint(path, self.work_dir, self.transformer, self.optimizer, self.scheduler)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        """Train mode (and gradient checkpointing if asked) for the loop; eval mode after it."""
        self.transformer.train()
        if self.cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if self.cfg.gradient_checkpointing:
                self.transformer.disable_gradient_checkpointing()
            self.transformer.eval()

    # -- one optimizer step ---------------------------------------------------------------------

    def optimizer_step(self) -> StepInfo:
        step = self.state.step + 1
        loss = self.accumulate_gradients()
        grad_norm = grad_norm_and_clip(self.params, self.cfg.max_grad_norm)
        self.refuse_non_finite(step, loss, grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.commit(step, loss)
        return StepInfo(step, self.cfg.steps, loss, self.scheduler.get_last_lr()[0], grad_norm, self.feed.epoch)

    def accumulate_gradients(self) -> float:
        """Backward over ``grad_accum`` micro-batches; returns their mean loss (over all processes)."""
        total = torch.zeros((), device=self.device)
        for i in range(self.cfg.grad_accum):
            with self.sync_gradients(i == self.cfg.grad_accum - 1):
                loss = self.micro_batch_loss()
                (loss / self.cfg.grad_accum).backward()
            total += loss.detach() / self.cfg.grad_accum
        if self.world > 1:
            total = self.accelerator.reduce(total, "mean")
        return total.item()

    def sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients only on the last micro-batch of a step (accelerate's ``no_sync`` before)."""
        if self.world > 1 and not last:
            return self.accelerator.no_sync(self.model)
        return contextlib.nullcontext()

    def micro_batch_loss(self) -> torch.Tensor:
        loss = self.batch_loss(next(self.feed), dropout=True)
        if self.prior_feed is not None:
            loss = loss + self.cfg.prior_loss_weight * self.batch_loss(next(self.prior_feed), dropout=False)
        return loss

    def batch_loss(self, batch: Batch, dropout: bool) -> torch.Tensor:
        """Flow-matching loss on this process's slice of a global batch (noise and σ drawn for all of it)."""
        cfg, part, device = self.cfg, self.part, self.device
        cond, pooled = (
            _drop_captions(batch, self.empty, cfg.caption_dropout, self.gen) if dropout else (batch.cond, batch.pooled)
        )
        latents = batch.latents.float()
        noise = torch.randn(latents.shape, generator=self.gen)
        sigmas = sample_sigmas(
            latents.shape[0], self.gen, cfg.timestep_sampling, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.shift
        )
        inputs = (latents, cond, pooled, noise, sigmas)
        return flow_matching_loss(self.model, *(t[part].to(device) for t in inputs), cfg.loss_weighting)

    def refuse_non_finite(self, step: int, loss: float, grad_norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
        where = str(self.last_good) if self.last_good else "none saved yet"
        raise NonFiniteLossError(
            f"{what} became {value} at step {step}; last good checkpoint at {where}; "
            "try a lower learning rate or max_grad_norm"
        )

    def commit(self, step: int, loss: float) -> None:
        """The step is done: record where data and generators stand, so a checkpoint resumes right after it."""
        state = self.state
        state.step = step
        state.losses.append(loss)
        state.epoch, state.batch_in_epoch = self.feed.epoch, self.feed.drawn
        if self.prior_feed is not None:
            state.prior_epoch, state.prior_batch_in_epoch = self.prior_feed.epoch, self.prior_feed.drawn
        state.generator, state.torch_rng = self.gen.get_state(), torch.get_rng_state()

    # -- after a step ---------------------------------------------------------------------------

    def after_step(self, info: StepInfo, validate: Validate | None, on_step: OnStep | None) -> None:
        """Periodic checkpoint, validation samples, then the caller's callback (which may cancel)."""
        cfg, step = self.cfg, info.step
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            self.save()
        if self.main and validate is not None and cfg.validation_every and step % cfg.validation_every == 0:
            validate(step)
        if on_step is not None:
            on_step(info)

    def save(self) -> None:
        """Checkpoint the last finished step (main process writes, every process waits)."""
        if self.work_dir is None:
            return
        if self.main:
            self.last_good = save_checkpoint(
                self.work_dir,
                self.transformer,
                self.optimizer,
                self.scheduler,
                self.state,
                self.cfg.to_dict(),
                self.cfg.keep_checkpoints,
            )
        self.saved_step = self.state.step
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def save_unsaved_progress(self) -> None:
        """Checkpoint the last finished step, if this run finished one that is not on disk yet."""
        if self.state.step > self.start and self.saved_step != self.state.step:
            self.save()


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
