"""The training nodes: advanced settings, and the trainer that turns a cache into a LoRA in models/loras.

Thin: the run itself is ``training.run.run_training``. Here ComfyUI's pieces are mapped onto it:
model folders, freeing loaded models, the progress bar (which is also where Cancel is noticed), the
live loss stream to the queuing client, the VAE for validation images, and applying the trained
LoRA to an input MODEL.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import comfy.model_base
import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ._types import CATEGORY, Cache, TrainSettings

logger = logging.getLogger(__name__)

PROGRESS_EVENT = "sd35tuner.train.progress"
MODEL_FOLDERS = ("checkpoints", "diffusion_models")
PRESET_HELP = (
    "Which layers get a LoRA. 'attention': image-stream attention (SimpleTuner's SD3 default). 'attention_ff': "
    "attention and feed-forward of both streams. 'all_linear': every linear layer of the blocks. 'x_stream' / "
    "'context_stream': one stream only (context-only suits small or low-quality datasets). Default 'attention'."
)


def base_model_options() -> list[str]:
    return sorted({name for folder in MODEL_FOLDERS for name in folder_paths.get_filename_list(folder)})


def base_model_path(choice: str) -> Path:
    path = next(filter(None, (folder_paths.get_full_path(folder, choice) for folder in MODEL_FOLDERS)), None)
    if path is None:
        raise ValueError(
            f"base_model {choice!r} was not found in ComfyUI's checkpoints/ or diffusion_models/ folders; "
            "put an SD3 / SD3.5 .safetensors file there and refresh"
        )
    return Path(path)


class SD35TunerTrainSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..training.options import LOSS_WEIGHTING, OPTIMIZERS, SCHEDULES, TIMESTEP_SAMPLING

        return io.Schema(
            node_id="SD35TunerTrainSettings",
            display_name="LoRA Training Settings (SD3.5 Tuner)",
            category=f"{CATEGORY}/training",
            description="The trainer's advanced settings. Connect to the trainer's 'settings' input; without it the "
            "defaults shown here are used.",
            inputs=[
                io.String.Input(
                    "blocks",
                    default="",
                    tooltip="Blocks to train, e.g. '12-24'. Default empty = every block.",
                ),
                io.String.Input(
                    "exclude_blocks",
                    default="",
                    tooltip="Blocks to keep frozen, e.g. '30-37' (the SD3.5 authors say it protects fine detail on "
                    "photos). Default empty = none.",
                ),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="adamw", tooltip=_OPT_HELP),
                io.Combo.Input(
                    "lr_scheduler",
                    options=list(SCHEDULES),
                    default="constant",
                    tooltip="Learning-rate schedule after warmup. Default 'constant'.",
                ),
                io.Int.Input(
                    "warmup_steps", default=0, min=0, max=100_000, tooltip="Linear warmup steps. Default 0 = none."
                ),
                io.Float.Input(
                    "max_grad_norm",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Clip the gradient norm to this value (SD3.5 Large wants it low, e.g. 0.1). Default 1.0; "
                    "0 disables clipping.",
                ),
                io.Int.Input(
                    "grad_accum",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Batches accumulated per optimizer step. Default 1 = no accumulation.",
                ),
                io.Float.Input(
                    "caption_dropout",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Probability of training a sample with the empty caption. Default 0 = never.",
                ),
                io.Float.Input(
                    "prior_loss_weight",
                    default=1.0,
                    min=0.0,
                    max=10.0,
                    step=0.05,
                    tooltip="Weight of the class-image loss when the trainer's 'class_cache' is connected "
                    "(DreamBooth prior preservation). Default 1.0; 0 ignores the class images.",
                ),
                io.Float.Input(
                    "lora_dropout", default=0.0, min=0.0, max=0.9, step=0.01, tooltip="LoRA dropout. Default 0 = off."
                ),
                io.Combo.Input(
                    "timestep_sampling",
                    options=list(TIMESTEP_SAMPLING),
                    default="logit_normal",
                    tooltip="How σ is drawn (SD3 paper): logit-normal (default), mode or uniform.",
                ),
                io.Float.Input(
                    "shift",
                    default=3.0,
                    min=0.1,
                    max=20.0,
                    step=0.1,
                    tooltip="SD3 timestep shift toward noisier σ. Default 3.0; 1.0 disables the shift.",
                ),
                io.Combo.Input(
                    "loss_weighting",
                    options=list(LOSS_WEIGHTING),
                    default="none",
                    tooltip="Per-σ loss weights (SD3 paper). Default 'none' = equal weights.",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=False,
                    tooltip="Recompute activations in the backward pass: less memory, slower. Default off.",
                ),
                io.Combo.Input(
                    "base_dtype",
                    options=["fp32", "bf16", "fp16"],
                    default="bf16",
                    tooltip="Precision of the frozen base weights (the LoRA always trains in fp32). Default bf16.",
                ),
                io.Combo.Input(
                    "save_dtype",
                    options=["bf16", "fp16", "fp32"],
                    default="bf16",
                    tooltip="Precision of the saved LoRA file. Default bf16.",
                ),
                io.Int.Input(
                    "checkpoint_every",
                    default=0,
                    min=0,
                    max=100_000,
                    tooltip="Save a resumable checkpoint every N steps. Default 0 = only at the end and on Cancel.",
                ),
                io.Int.Input(
                    "keep_checkpoints", default=3, min=1, max=1000, tooltip="Keep the newest N checkpoints. Default 3."
                ),
                io.Int.Input(
                    "validation_every",
                    default=0,
                    min=0,
                    max=100_000,
                    tooltip="Sample the cache's validation prompts every N steps (needs the VAE input). Default 0 = "
                    "only once at the end.",
                ),
                io.Int.Input(
                    "validation_steps", default=20, min=1, max=200, tooltip="Sampler steps per validation image."
                ),
                io.Float.Input(
                    "validation_cfg",
                    default=4.0,
                    min=1.0,
                    max=30.0,
                    step=0.1,
                    tooltip="Guidance scale of the validation samples (CFG and APG). Default 4.0; 1.0 = unguided.",
                ),
                io.Boolean.Input(
                    "resume",
                    default=False,
                    tooltip="Continue from the newest checkpoint of a run with the same LoRA name. Default off.",
                ),
            ],
            outputs=[TrainSettings.Output(display_name="settings")],
        )

    @classmethod
    def execute(cls, **settings: Any) -> io.NodeOutput:
        from ..training.config import TrainConfig

        resume = settings.pop("resume")
        TrainConfig(steps=settings["warmup_steps"] + 1, **settings)  # a bad value fails here, naming the field
        return io.NodeOutput({**settings, "resume": resume})


_OPT_HELP = (
    "adamw: AdamW, fp32 states (default). adamw_lowmem: 8-bit AdamW with bitsandbytes on CUDA, else bf16 states. "
    "prodigy / stableadamw: need the prodigyopt / torch-optimi packages."
)


class SD35TunerTrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..training.options import PRESET_NAMES

        return io.Schema(
            node_id="SD35TunerTrainLora",
            display_name="Train SD3.5 LoRA (SD3.5 Tuner)",
            category=f"{CATEGORY}/training",
            description="Trains a LoRA for an SD3 / SD3.5 checkpoint on a latent cache (flow matching, as SD3 was "
            "trained) and saves it in models/loras, where LoraLoader lists it. The loss streams into this node while "
            "it runs; Cancel stops after the current step and keeps a checkpoint to resume from.",
            is_output_node=True,
            not_idempotent=True,
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
            inputs=[
                Cache.Input("cache", tooltip="The latent + text-embedding cache (Cache Latents node)."),
                io.Combo.Input(
                    "base_model",
                    options=base_model_options(),
                    tooltip="The SD3 / SD3.5 checkpoint to train on, from checkpoints/ or diffusion_models/.",
                ),
                io.String.Input(
                    "lora_name",
                    default="sd35_lora",
                    tooltip="File name in models/loras (sub-folders allowed). An existing name gets a _2, _3... "
                    "suffix instead of being overwritten.",
                ),
                io.Int.Input("steps", default=500, min=1, max=1_000_000, tooltip="Optimizer steps. Default 500."),
                io.Int.Input(
                    "epochs",
                    default=0,
                    min=0,
                    max=10_000,
                    tooltip="Train this many passes over the cache instead of 'steps'. Default 0 = use steps.",
                ),
                io.Int.Input("batch_size", default=1, min=1, max=256, tooltip="Samples per batch. Default 1."),
                io.Float.Input(
                    "learning_rate",
                    default=1e-4,
                    min=1e-7,
                    max=1.0,
                    step=1e-6,
                    round=False,
                    tooltip="Default 1e-4. SD3.5 Large can explode above ~1e-3 at high rank.",
                ),
                io.Int.Input("rank", default=16, min=1, max=1024, tooltip="LoRA rank. Default 16."),
                io.Float.Input(
                    "alpha",
                    default=16.0,
                    min=0.01,
                    max=4096.0,
                    step=0.01,
                    tooltip="LoRA alpha; strength scale is alpha/rank (folded into the saved file). Default 16.",
                ),
                io.Combo.Input("preset", options=list(PRESET_NAMES), default="attention", tooltip=PRESET_HELP),
                io.Combo.Input(
                    "quantization",
                    options=["none", "int8", "int4", "fp8"],
                    default="none",
                    tooltip="Quantise the frozen base with optimum-quanto to save memory (int8 is the safe choice; "
                    "on CPU it is slower). Default 'none'.",
                ),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed: same seed, same run."),
                TrainSettings.Input("settings", optional=True, tooltip="Advanced settings (Training Settings node)."),
                Cache.Input(
                    "class_cache",
                    optional=True,
                    tooltip="A cache of class images (e.g. other people for a person LoRA) trained alongside, "
                    "weighted by prior_loss_weight, so the class keeps its look (DreamBooth). Optional.",
                ),
                io.Vae.Input("vae", optional=True, tooltip="The SD3 VAE, to decode validation images. Optional."),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="A MODEL to return with the trained LoRA applied, ready for a sampler. Optional.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="lora_name", tooltip="The LoRA file's name in models/loras."),
                io.Model.Output(
                    display_name="model", tooltip="The input MODEL with the LoRA applied (None if absent)."
                ),
                io.Image.Output(display_name="loss_chart", tooltip="Loss per step (faint) and its moving average."),
                io.String.Output(display_name="losses", tooltip="Loss per step as a JSON list."),
                io.Image.Output(
                    display_name="validation",
                    tooltip="Validation samples: CFG row over APG row (a blank image without VAE or prompts).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, base_model: str, lora_name: str, learning_rate: float, rank: int) -> bool | str:
        from ..training.export import output_path

        try:
            base_model_path(base_model)
            output_path(folder_paths.get_folder_paths("loras")[0], lora_name)
        except ValueError as err:
            return str(err)
        if learning_rate <= 0:
            return "learning_rate must be > 0; 1e-4 is a safe start"
        if rank < 1:
            return "rank must be >= 1"
        return True

    @classmethod
    def execute(
        cls,
        cache,
        base_model: str,
        lora_name: str,
        steps: int,
        epochs: int,
        batch_size: int,
        learning_rate: float,
        rank: int,
        alpha: float,
        preset: str,
        quantization: str,
        seed: int,
        settings: dict | None = None,
        class_cache=None,
        vae=None,
        model=None,
    ) -> io.NodeOutput:
        from ..training.config import TrainConfig
        from ..training.export import output_path
        from ..training.report import loss_chart
        from ..training.run import release, run_training

        extra = dict(settings or {})
        resume = extra.pop("resume", False)
        if epochs:
            steps = max(1, epochs * len(cache) // (batch_size * extra.get("grad_accum", 1)))
        base_dtype = "bf16" if comfy.model_management.should_use_bf16() else "fp32"
        cfg = TrainConfig(
            **{"base_dtype": base_dtype, **extra},
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            rank=rank,
            alpha=alpha,
            preset=preset,
            quantization=quantization,
            seed=seed,
        )
        base = base_model_path(base_model)
        if model is not None and not isinstance(model.model, comfy.model_base.SD3):
            raise ValueError(
                f"model: got a {type(model.model).__name__} model; connect the SD3/SD3.5 MODEL the LoRA should be "
                "applied to (or leave 'model' empty)"
            )
        loras = Path(folder_paths.get_folder_paths("loras")[0])
        lora_path = output_path(loras, lora_name)  # confined to models/loras; a taken name gets _2, _3...
        # checkpoints are keyed by the name asked for, so 'resume' finds them whatever version gets written
        work_dir = (
            Path(folder_paths.get_output_directory())
            / "sd35_tuner_runs"
            / lora_name.strip().removesuffix(".safetensors")
        )
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        workflow = (cls.hidden.extra_pnginfo or {}).get("workflow")
        info = {"workflow": json.dumps(workflow)} if workflow else {}
        output = None
        try:
            output = run_training(
                base,
                cache,
                cfg,
                lora_path,
                work_dir,
                on_step=_progress(cfg.steps, cls.hidden.unique_id),
                resume=resume and work_dir.is_dir(),
                info=info,
                device=comfy.model_management.get_torch_device(),
                decode=_decoder(vae),
                prior=class_cache,
            )
            name = output.lora_path.relative_to(loras.resolve()).as_posix()
            patched = _apply(model, output.lora_path) if model is not None else None
            chart = torch.from_numpy(loss_chart(output.losses)).float()[None] / 255
            grid = _grid(output.decoded)
            logger.info("trained %s: %d parameters, final loss %.4f", name, output.trainable, output.losses[-1])
        finally:
            release(output)
            comfy.model_management.soft_empty_cache()
        shown = grid if output.decoded else chart
        panel = {**ui.PreviewImage(shown, cls=cls).as_dict(), "lora_name": [name], "losses": output.losses}
        return io.NodeOutput(name, patched, chart, json.dumps(output.losses), grid, ui=panel)


def _progress(total: int, node_id: str | None):
    """on_step for the trainer: progress bar every step (Cancel lands here), loss to the queuing client."""
    from server import PromptServer

    bar = comfy.utils.ProgressBar(total, node_id=node_id)
    server = PromptServer.instance
    last_sent = 0.0

    def on_step(info) -> None:
        nonlocal last_sent
        now = time.monotonic()
        if now - last_sent >= 0.2 or info.step == info.total_steps:
            last_sent = now
            data = {"node": node_id, "step": info.step, "total": info.total_steps, "loss": info.loss, "lr": info.lr}
            server.send_sync(PROGRESS_EVENT, data, server.client_id)
        bar.update_absolute(info.step, total)

    return on_step


def _decoder(vae):
    if vae is None:
        return None

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # the trainer calls this with autograd on; ComfyUI's VAE is inference-only
            return vae.decode(vae_latents(latents)).float().cpu()

    return decode


def vae_latents(latents: torch.Tensor) -> torch.Tensor:
    """Transformer-space latents back to raw VAE latents (undo SD3's shift/scale)."""
    return latents / 1.5305 + 0.0609


def _apply(model, lora_path: Path):
    from safetensors.torch import load_file

    patched, _ = comfy.sd.load_lora_for_models(model, None, load_file(str(lora_path)), 1.0, 0.0)
    return patched


def _grid(decoded: dict[str, torch.Tensor]) -> torch.Tensor:
    """CFG samples in the top row, APG below; a blank 64 px image when there are none."""
    if not decoded:
        return torch.zeros(1, 64, 64, 3)
    return torch.cat([torch.cat(list(decoded[g]), dim=1) for g in ("cfg", "apg")], dim=0)[None]


NODES = [SD35TunerTrainSettings, SD35TunerTrainLora]
