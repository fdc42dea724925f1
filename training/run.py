"""One training run from a base-model file to a LoRA file: the path the node and the CLI share.

Order matters and is kept in one place: take the run folder's lock (one trainer per folder, before
anything loads), check the data can fill a step (before any model loads),
load the base, check the cache was encoded for this model family, quantise + freeze the base, add
the LoRA, train (checkpoints, validation samples), and only then write the LoRA file, atomically,
so a failed or cancelled run leaves nothing half-written in the LoRA folder.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .cpu_linear import float32_products_on_cpu
from .data import TrainingSource
from .export import PACK_VERSION, export_lora
from .folder_lock import folder_lock
from .fs import resolve_inside
from .heap import release_freed, training_heap
from .loading import InMemoryBase, base_name, load_base
from .loop import OnStep, Trainer, TrainResult, grad_enabled
from .metadata import base_model_hashes, dataset_facts, sd3_variant
from .model import add_lora, count_trainable, load_adapter_state, lora_target_modules
from .run_folder import VALIDATION
from .start_lora import StartLora
from .validate import Decode, OnImages, OnValidation, Prompts, SampleSettings, Validation

logger = logging.getLogger(__name__)


@dataclass
class RunOutput:
    lora_path: Path
    losses: list[float]
    trainable: int
    decoded: dict[str, torch.Tensor] = field(default_factory=dict)  # latest validation samples [N,H,W,3] per guidance
    resumed_from: Path | None = None  # the checkpoint the run continued from
    damaged: list[str] = field(default_factory=list)  # newer checkpoints skipped on resume, each with its reason
    archived: Path | None = None  # where this fresh run moved an earlier run's files in its work_dir
    memory: list[str] = field(default_factory=list)  # the memory pre-flight's verdict (and what "auto" chose)


def check_compatible(meta: dict[str, Any], config: Any) -> None:
    """Refuse a cache whose latents or text embeddings were made for another model family."""
    pairs = (
        ("latent_channels", "in_channels", "latents", "VAE"),
        ("text_dim", "joint_attention_dim", "text embeddings", "text encoders"),
        ("pooled_dim", "pooled_projection_dim", "pooled text embeddings", "text encoders"),
    )
    for meta_key, config_key, what, made_by in pairs:
        have, want = meta.get(meta_key), getattr(config, config_key)
        if have is not None and int(have) != int(want):
            raise ValueError(
                f"the cache holds {what} of width {have} but the base model takes {want}: the cache was built "
                f"with another model family's {made_by}; rebuild it with the SD3/SD3.5 {made_by}"
            )


def prepare_model(
    base_model: str | os.PathLike | InMemoryBase,
    cfg: TrainConfig,
    device: str | torch.device = "cpu",
    start: StartLora | None = None,
):
    """The model a run trains: the base (a file, or a ComfyUI MODEL's weights) built block by block on
    ``device``, quantised and frozen as asked, then the LoRA attached: a fresh one, or with ``start`` an
    existing LoRA's targets, rank and weights. With ``cfg.block_offload`` the joint blocks' frozen
    weights stay in CPU RAM and visit ``device`` one block at a time (``training.offload``). Frozen
    bf16/fp16 layers compute in float32 while on a CPU (``training.cpu_linear``)."""
    blocks_device = "cpu" if cfg.block_offload else None
    transformer = load_base(base_model, cfg.base_dtype, cfg.quantization, device, blocks_device=blocks_device)
    if start is None:
        targets = lora_target_modules(transformer, cfg.preset, cfg.blocks, cfg.exclude_blocks)
        spec = add_lora(transformer, cfg.rank, cfg.alpha, targets, cfg.lora_dropout, seed=cfg.seed)
    else:
        start.check_fits(transformer)
        spec = add_lora(transformer, start.rank, cfg.alpha, list(start.targets), cfg.lora_dropout, seed=cfg.seed)
        load_adapter_state(transformer, start.adapter_tensors(cfg.alpha), start.name)
    float32_products_on_cpu(transformer)
    if cfg.block_offload:
        from .offload import offload_blocks

        offload_blocks(transformer, device)
        return transformer, spec
    return transformer.to(device), spec


def plan_memory(
    base_model, source: TrainingSource, cfg: TrainConfig, device, validation: bool, start: StartLora | None = None
) -> tuple[TrainConfig, list[str]]:
    """Before the base is loaded: with ``memory_preset`` "auto" the settings the GPU fits (logged with
    the reason); on the CPU over the graph's MODEL weights no quantised copy (``keep_graph_weights``);
    then the pre-flight that stops a run that cannot fit and warns when tight. Returns the run's settings
    and the lines said."""
    from .loading import read_config
    from .memory import auto_settings, check_run, keep_graph_weights, shares_graph_weights

    first = next(source.batches(1, cfg.seed, 0, drop_last=False))
    resolution = 8 * max(first.latents.shape[-2:])
    config = read_config(base_model)
    said = []
    if cfg.memory_preset == "auto":
        cfg, why = auto_settings(config, cfg, resolution, device, validation, len(source), start and start.rank)
        logger.info(why)
        said.append(why)
    cfg, kept = keep_graph_weights(base_model, cfg, device)
    if kept:
        logger.info(kept)
        said.append(kept)
    shared = shares_graph_weights(base_model, cfg, device)
    level, message = check_run(config, cfg, resolution, device, validation, shared)
    (logger.warning if level == "warn" else logger.info)(message)
    return cfg, [*said, message]


def sample_settings(cfg: TrainConfig) -> SampleSettings:
    return SampleSettings(
        steps=cfg.validation_steps,
        scale=cfg.validation_cfg,
        shift=cfg.shift,
        apg_eta=cfg.apg_eta,
        apg_norm_threshold=cfg.apg_norm_threshold,
        apg_momentum=cfg.apg_momentum,
        seed=cfg.seed,
    )


def _holding_work_dir(run: Callable[..., RunOutput]) -> Callable[..., RunOutput]:
    """Hold the work folder's lock around the whole of ``run`` in the process that writes it, taken before
    anything loads: a second trainer on the same folder (another ComfyUI, the CLI) fails at once, naming
    the holder (``folder_lock.FolderInUseError``); a killed trainer's lock is recovered by the next run."""
    signature = inspect.signature(run)

    @functools.wraps(run)
    def locked(*args, **kwargs) -> RunOutput:
        given = signature.bind(*args, **kwargs).arguments
        accelerator = given.get("accelerator")
        if accelerator is not None and not accelerator.is_main_process:
            return run(*args, **kwargs)
        with folder_lock(given["work_dir"], f"training {Path(given['lora_path']).name}"):
            return run(*args, **kwargs)

    return locked


@_holding_work_dir
@grad_enabled()  # weights loaded as inference tensors (inside ComfyUI) could not take part in the backward pass
def run_training(
    base_model: str | os.PathLike | InMemoryBase,
    source: TrainingSource,
    cfg: TrainConfig,
    lora_path: str | os.PathLike,
    work_dir: str | os.PathLike,
    on_step: OnStep | None = None,
    resume: str | os.PathLike | bool | None = None,
    info: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    decode: Decode | None = None,
    accelerator=None,
    prior: TrainingSource | None = None,
    on_validation: OnValidation | None = None,
    start: StartLora | None = None,
    prompts: Prompts | None = None,
    on_images: OnImages | None = None,
) -> RunOutput:
    """Train a LoRA on ``source`` and write it to ``lora_path``; checkpoints and samples go to ``work_dir``.

    ``on_step(StepInfo)`` after every optimizer step and ``on_validation(step, done, total)`` during
    validation sampling may raise to cancel; the finished steps are then checkpointed for ``resume``.
    ``start`` continues an existing LoRA instead of a fresh one.
    ``prompts`` (prompt, cond, pooled) replace the cache's validation prompts; ``on_images(step, decoded)``
    gets every validation's decoded samples as they are made.
    """
    samples = resolve_inside(work_dir, VALIDATION, "validation folder")  # a planted link must not lead out
    trainer = Trainer(source, cfg, prior, accelerator)
    planned, memory = plan_memory(base_model, source, cfg, device, decode is not None, start)
    if planned != cfg:
        cfg, trainer = planned, Trainer(source, planned, prior, accelerator)
    transformer, spec = prepare_model(base_model, cfg, device, start)
    for data in (source, prior):
        if data is not None:
            check_compatible(data.meta, transformer.config)
    trainable = count_trainable(transformer)
    logger.info("training %d LoRA parameters on %d modules of %s", trainable, len(spec.targets), base_name(base_model))
    work_dir = Path(work_dir)
    validation = Validation(
        transformer, source, sample_settings(cfg), samples, decode, on_validation, prompts, on_images
    )
    with training_heap(device, trainable):
        result = trainer.fit(transformer, work_dir, on_step, resume, validation if cfg.validation_every else None)
        release_freed()  # the optimizer's state and gradients, before the final samples are made
        if trainer.main and validation.step != cfg.steps:  # the final samples, unless the loop just made them
            validation(cfg.steps)
    path = Path(lora_path)
    if trainer.main:
        facts = {"title": path.stem, "model_type": sd3_variant(transformer.config), **dataset_facts(source)}
        info = {**facts, **base_model_hashes(base_model), **(info or {})}
        export_lora(transformer, spec, path, _lora_info(base_model, source, cfg, result, info), cfg.save_dtype)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return RunOutput(
        path,
        result.losses,
        trainable,
        validation.decoded,
        result.resumed_from,
        result.damaged,
        result.archived,
        memory,
    )


def _lora_info(base_model, source: TrainingSource, cfg: TrainConfig, result: TrainResult, extra) -> dict[str, Any]:
    """The run's facts for the LoRA file's header."""
    losses = result.losses
    return {
        "base_model": base_name(base_model),
        "steps": result.step,
        "learning_rate": cfg.learning_rate,
        "dataset_size": len(source),
        "seed": cfg.seed,
        "pack_version": PACK_VERSION,
        "config": cfg.to_dict(),
        "final_loss": losses[-1] if losses else None,
        **(extra or {}),
    }
