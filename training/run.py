"""One training run from a base-model file to a LoRA file: the path the node and the CLI share.

Order matters and is kept in one place: check the data can fill a step (before any model loads),
load the base, check the cache was encoded for this model family, quantise + freeze the base, add
the LoRA, train (checkpoints, validation samples), and only then write the LoRA file, atomically,
so a failed or cancelled run leaves nothing half-written in the LoRA folder.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .data import TrainingSource
from .export import PACK_VERSION, export_lora
from .loop import OnStep, check_source, train
from .model import LoraSpec, add_lora, count_trainable, load_transformer, lora_target_modules, quantize_base
from .validate import SampleSettings, sample_prompts

logger = logging.getLogger(__name__)

Decode = Callable[[torch.Tensor], torch.Tensor]  # latents [N,C,h,w] (transformer space) -> images [N,H,W,3] in 0..1


@dataclass
class RunOutput:
    lora_path: Path
    losses: list[float]
    spec: LoraSpec
    trainable: int
    transformer: Any
    validation_images: list[Path] = field(default_factory=list)
    validation: dict[str, torch.Tensor] = field(default_factory=dict)  # latest latents per guidance
    decoded: dict[str, torch.Tensor] = field(default_factory=dict)  # the same, decoded [N,H,W,3]


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


def prepare_model(base_model: str | os.PathLike, cfg: TrainConfig, device: str | torch.device = "cpu"):
    """Load the base, quantise and freeze it if asked, then attach the LoRA."""
    transformer = load_transformer(base_model, cfg.base_dtype)
    quantize_base(transformer, cfg.quantization)
    targets = lora_target_modules(transformer, cfg.preset, cfg.blocks, cfg.exclude_blocks)
    spec = add_lora(transformer, cfg.rank, cfg.alpha, targets, cfg.lora_dropout, seed=cfg.seed)
    return transformer.to(device), spec


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


def save_pngs(images: torch.Tensor, folder: Path, stem: str) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{stem}_{i:02d}.png"
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray((image.clamp(0, 1).numpy() * 255).round().astype("uint8")).save(tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def run_training(
    base_model: str | os.PathLike,
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
) -> RunOutput:
    """Train a LoRA on ``source`` and write it to ``lora_path``; checkpoints and samples go to ``work_dir``.

    Runs outside ``torch.inference_mode`` even when called inside it (ComfyUI): weights loaded as
    inference tensors could not take part in the backward pass.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _run(
            base_model, source, cfg, lora_path, work_dir, on_step, resume, info, device, decode, accelerator, prior
        )


def _run(
    base_model: str | os.PathLike,
    source: TrainingSource,
    cfg: TrainConfig,
    lora_path: str | os.PathLike,
    work_dir: str | os.PathLike,
    on_step: OnStep | None,
    resume: str | os.PathLike | bool | None,
    info: dict[str, Any] | None,
    device: str | torch.device,
    decode: Decode | None,
    accelerator,
    prior: TrainingSource | None,
) -> RunOutput:
    world = accelerator.num_processes if accelerator is not None else 1
    main = accelerator is None or accelerator.is_main_process
    check_source(source, cfg, world)
    transformer, spec = prepare_model(base_model, cfg, device)
    check_compatible(source.meta, transformer.config)
    if prior is not None:
        check_source(prior, cfg, world)
        check_compatible(prior.meta, transformer.config)
    trainable = count_trainable(transformer)
    logger.info("training %d LoRA parameters on %d modules of %s", trainable, len(spec.targets), base_model)
    work_dir = Path(work_dir)
    prompts = source.validation_prompts()
    first = next(source.batches(1, cfg.seed, 0, drop_last=True))
    shape = tuple(first.latents.shape[1:])
    written: list[Path] = []
    latest: dict[str, torch.Tensor] = {}
    decoded: dict[str, torch.Tensor] = {}

    def validate(step: int) -> list[Path]:
        nonlocal latest, decoded
        if not prompts:
            return []
        latest = sample_prompts(transformer, prompts, source.empty_text(), shape, sample_settings(cfg))
        if decode is None:
            return []
        decoded = {g: decode(lat) for g, lat in latest.items()}
        files = [
            p for g, img in decoded.items() for p in save_pngs(img, work_dir / "validation", f"step{step:06d}_{g}")
        ]
        written.extend(files)
        return files

    result = train(
        transformer,
        source,
        cfg,
        work_dir=work_dir,
        on_step=on_step,
        resume=resume,
        validate=validate if cfg.validation_every else None,
        accelerator=accelerator,
        prior=prior,
    )
    if main and prompts and (not cfg.validation_every or cfg.steps % cfg.validation_every):
        validate(cfg.steps)
    meta = {
        "base_model": Path(base_model).name,
        "steps": result.step,
        "learning_rate": cfg.learning_rate,
        "dataset_size": len(source),
        "seed": cfg.seed,
        "pack_version": PACK_VERSION,
        "config": cfg.to_dict(),
        "final_loss": result.losses[-1] if result.losses else None,
        **(info or {}),
    }
    path = Path(lora_path)
    if main:
        export_lora(transformer, spec, path, meta, dtype=cfg.save_dtype)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return RunOutput(path, result.losses, spec, trainable, transformer, written, latest, decoded)


def release(output: RunOutput | None) -> None:
    """Drop the trainer's model and give memory back."""
    if output is not None:
        output.transformer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
