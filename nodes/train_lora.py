"""The trainer node: turns a latent cache into a LoRA in models/loras.

Thin: the run itself is ``training.run.run_training``. The ComfyUI pieces it is wired to live beside it:
model folders, run folder, VAE decoder and LoRA application in ``_train_glue``; progress, the websocket
events the node's panel draws and the Cancel/failure message in ``_train_events``; the validation input
group and the prompts' encoding in ``_train_validation``; a MODEL as the base in ``_model_base``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io, ui

from ._lora_io import NO_LORA, existing_lora_options, start_lora, trained_adapter
from ._model_base import FROM_MODEL, model_dtype
from ._train_events import RunReporter
from ._train_glue import (
    RUNS_FOLDER,
    apply_lora,
    base_model_options,
    check_model_input,
    run_dir,
    run_notes,
    run_problems,
    training_base,
    vae_decoder,
)
from ._train_validation import encode_prompts, guidance_problems, row_labels, split_prompts, validation_inputs
from ._types import CATEGORY, Cache, LoraModel, TrainSettings
from ._validation import Choice, verdict
from .train_settings import AUTO_DTYPE, settings_defaults

logger = logging.getLogger(__name__)

PRESET_HELP = (
    "Which layers get a LoRA. 'attention': image-stream attention (SimpleTuner's SD3 default). 'attention_ff': "
    "attention and feed-forward of both streams. 'all_linear': every linear layer of the blocks. 'x_stream' / "
    "'context_stream': one stream only (context-only suits small or low-quality datasets). Default 'attention'."
)


class SD35TunerTrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..training.options import MEMORY_PRESETS, PRESET_NAMES, QUANTIZATION

        return io.Schema(
            node_id="SD35TunerTrainLora",
            display_name="Train SD3.5 LoRA",
            category=f"{CATEGORY}/training",
            description="Trains a LoRA for an SD3 / SD3.5 checkpoint on a latent cache (flow matching, as SD3 was "
            "trained) and saves it in models/loras, where LoraLoader lists it. The loss streams into this node while "
            "it runs; Cancel stops after the current step and keeps a checkpoint to resume from.",
            is_output_node=True,
            not_idempotent=True,
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
            inputs=[
                Cache.Input("cache", tooltip="The latent + text-embedding cache (Cache Latents node)."),
                Choice(
                    "base_model",
                    options=[*base_model_options(), FROM_MODEL],
                    tooltip="The SD3 / SD3.5 checkpoint to train on, from checkpoints/ or diffusion_models/. With a MODEL "
                    "connected to 'model' the trainer trains on that MODEL's weights instead (nothing is loaded twice); "
                    f"pick '{FROM_MODEL}' then.",
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
                io.Int.Input(
                    "batch_size",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Samples per batch. Default 1. Memory: each extra 1024 px sample adds its activations "
                    "(GBs on SD3.5 Large); for a larger effective batch at no memory cost raise grad_accum in the "
                    "settings node instead.",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=4e-4,
                    min=1e-7,
                    max=1.0,
                    step=1e-6,
                    round=False,
                    tooltip="Default 4e-4: Stability's SD3.5 Large tutorial trained well at about 1e-3 with batch 6 "
                    "(alpha = rank) and saw runs explode above 1.5e-3; scaled by the square root of the batch, "
                    "that is 4e-4 at batch 1. Lower it if the loss jumps or samples turn to noise.",
                ),
                io.Int.Input(
                    "rank",
                    default=32,
                    min=1,
                    max=1024,
                    tooltip="LoRA rank: how much the adapter can learn. Default 32; 16-64 suits most subjects and "
                    "styles. Memory: small next to the base (rank 32 on SD3.5 Large's attention is about 0.4 GB "
                    "with AdamW states, rank 64 about 0.8 GB).",
                ),
                io.Float.Input(
                    "alpha",
                    default=32.0,
                    min=0.01,
                    max=4096.0,
                    step=0.01,
                    tooltip="LoRA alpha; strength scale is alpha/rank (folded into the saved file). Default 32 "
                    "(= rank, scale 1, as the learning-rate default assumes).",
                ),
                Choice("preset", options=list(PRESET_NAMES), default="attention", tooltip=PRESET_HELP),
                Choice(
                    "quantization",
                    options=list(QUANTIZATION),
                    default="int8",
                    tooltip="Quantise the frozen base with optimum-quanto to save memory. Default int8: SD3.5 "
                    "Large's 8 billion weights take about 8 GB instead of 16 GB in bf16, what fits a 24 GB card at "
                    "1024 px. int4: about 4 GB, some quality loss. none: the base in base_dtype (Large needs a "
                    "32 GB card). On CPU quantised steps are slower, not faster; training on the CPU over the "
                    "MODEL input's bf16/fp16 weights, none is used (a quantised copy would only add RAM next to "
                    "them).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=False,  # a seed that changed after each run would train anew each Run
                    tooltip="Seed of the LoRA's initialisation, batch order and noise: same seed, same run. It "
                    "stays as set after a run. Default 0.",
                ),
                io.Boolean.Input(
                    "resume",
                    default=False,
                    tooltip=f"Continue from the newest checkpoint in output/{RUNS_FOLDER}/<lora_name>/ (written "
                    "every checkpoint_every steps, at the end and on Cancel). Default off: a fresh run.",
                ),
                *validation_inputs(),
                TrainSettings.Input("settings", optional=True, tooltip="Advanced settings (Training Settings node)."),
                Cache.Input(
                    "class_cache",
                    optional=True,
                    tooltip="A cache of class images (e.g. other people for a person LoRA) trained alongside, "
                    "weighted by prior_loss_weight, so the class keeps its look (DreamBooth). Optional.",
                ),
                io.Clip.Input(
                    "clip",
                    optional=True,
                    tooltip="The CLIP the cache was built with, to encode the validation prompts. Optional.",
                ),
                io.Vae.Input("vae", optional=True, tooltip="The SD3 VAE, to decode validation images. Optional."),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="The base to train on, shared with the graph (e.g. CheckpointLoaderSimple's or UNETLoader's "
                    "MODEL, fp8-scaled files included): nothing is loaded twice. Returned with the trained LoRA applied "
                    "on the 'model' output. Optional: without it 'base_model' is read from its file.",
                ),
                Choice(
                    "existing_lora",
                    options=existing_lora_options(),
                    default=NO_LORA,
                    optional=True,
                    tooltip="A LoRA in models/loras to continue training (as core's trainer's existing_lora): its "
                    "targets, rank and weights replace the preset's, 'rank' and a fresh start. Diffusers-layout SD3 "
                    f"LoRAs (this node's, diffusers', SimpleTuner's). Default {NO_LORA}: a new LoRA.",
                ),
                LoraModel.Input(
                    "lora",
                    optional=True,
                    tooltip="A LORA_MODEL to continue training instead of a file (e.g. this node's 'lora' output "
                    "from an earlier run). Optional; not together with existing_lora.",
                ),
                Choice(
                    "memory_preset",
                    options=list(MEMORY_PRESETS),
                    default="manual",
                    optional=True,
                    tooltip="'auto': detect the GPU's memory and pick quantization, block offload, rank, batch and "
                    "gradient checkpointing that fit it at the cache's resolution (e.g. SD3.5 Large at 1024 px: "
                    "48 GB bf16 rank 64; 24 GB int8 rank 64; 16 GB int4 rank 32; 12 GB int4 rank 16; 8 GB int8 "
                    "with block offload), overriding those inputs; what it chose and why is logged and shown "
                    "here after the run. Default 'manual': the inputs as set (a run that cannot fit is stopped "
                    "before loading, saying what to change).",
                ),
            ],
            outputs=[
                io.String.Output(display_name="lora_name", tooltip="The LoRA file's name in models/loras."),
                io.Model.Output(
                    display_name="model",
                    tooltip=(
                        "The input MODEL with the LoRA applied as it computes, without a second copy of the "
                        "weights (None if no MODEL is connected). To save a merged checkpoint, apply the LoRA "
                        "file with LoraLoader instead."
                    ),
                ),
                io.Image.Output(display_name="loss_chart", tooltip="Loss per step (faint) and its moving average."),
                io.String.Output(display_name="losses", tooltip="Loss per step as a JSON list."),
                io.Image.Output(
                    display_name="validation",
                    tooltip="The last validation grid: a CFG row and an APG row, one column per prompt, labelled "
                    "(a blank image without prompts).",
                ),
                LoraModel.Output(
                    display_name="lora",
                    tooltip="The trained adapter as ComfyUI's LORA_MODEL: core's Load LoRA Model applies it as "
                    "LoraLoader applies the file; core's Save LoRA writes it.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(
        cls,
        lora_name: str,
        resume: bool,
        validation_cfg: float,
        apg_eta: float,
        apg_norm_threshold: float,
        apg_momentum: float,
    ) -> bool | str:
        apg = {"apg_eta": apg_eta, "apg_norm_threshold": apg_norm_threshold, "apg_momentum": apg_momentum}
        return verdict({**run_problems(lora_name, resume), **guidance_problems(cls, validation_cfg, **apg)})

    @classmethod
    def execute(
        cls,
        cache,
        base_model: str,
        lora_name: str,
        epochs: int,
        resume: bool,
        validation_prompts: str,
        settings: dict | None = None,
        class_cache=None,
        clip=None,
        vae=None,
        model=None,
        existing_lora: str = NO_LORA,
        lora: dict | None = None,
        **widgets,  # the other widgets are TrainConfig fields; an input that is not must be named above
    ) -> io.NodeOutput:
        from ..training.export import output_path
        from ..training.report import loss_chart
        from ..training.run import run_training

        start = start_lora(existing_lora, lora)
        if start is not None:
            widgets["rank"] = start.rank  # a continued LoRA keeps its rank
        cfg = train_config(settings, widgets, epochs, len(cache), model)
        check_model_input(model, base_model)
        prompts = encode_prompts(clip, cache, split_prompts(validation_prompts))
        if prompts and vae is None:
            raise ValueError("validation_prompts need the trainer's vae input to show the samples (or clear them)")
        loras = Path(folder_paths.get_folder_paths("loras")[0])
        lora_path = output_path(loras, lora_name)  # confined to models/loras; a taken name gets _2, _3...
        work_dir = run_dir(lora_name)
        report = RunReporter(
            cls.hidden.unique_id, cfg.steps, lora_name, work_dir, row_labels(cfg), [p for p, *_ in prompts]
        )
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        base = training_base(model, base_model)
        workflow = (cls.hidden.extra_pnginfo or {}).get("workflow")
        try:
            output = run_training(
                base,
                cache,
                cfg,
                lora_path,
                work_dir,
                on_step=report.on_step,
                resume=resume,
                info={"workflow": json.dumps(workflow)} if workflow else {},
                device=comfy.model_management.get_torch_device(),
                decode=vae_decoder(vae),
                prior=class_cache,
                start=start,
                on_validation=report.on_validation,
                prompts=prompts,
                on_images=report.on_images,
            )
        except (
            Exception,
            comfy.model_management.InterruptProcessingException,
        ) as err:  # a BaseException in ComfyUI 0.33
            report.stopped(err)
            raise
        finally:
            from ..training.heap import release_freed

            release_freed()  # the trainer's model (peft hooks hold reference cycles), its heap back to the OS
            comfy.model_management.soft_empty_cache()
        name = output.lora_path.relative_to(loras.resolve()).as_posix()
        patched = apply_lora(model, output.lora_path) if model is not None else None
        chart = torch.from_numpy(loss_chart(output.losses)).float()[None] / 255
        grid = report.grid(output.decoded)
        logger.info("trained %s: %d parameters, final loss %.4f", name, output.trainable, output.losses[-1])
        shown = grid if output.decoded else chart
        panel = {**ui.PreviewImage(shown, cls=cls).as_dict(), "lora_name": [name], "losses": output.losses}
        panel["memory"] = output.memory  # the memory plan: what memory_preset auto chose and the pre-flight
        panel["notes"] = run_notes(output.archived)
        adapter = trained_adapter(output.lora_path)
        return io.NodeOutput(name, patched, chart, json.dumps(output.losses), grid, adapter, ui=panel)


def train_config(settings: dict | None, widgets: dict, epochs: int, cache_size: int, model=None):
    """The run's TrainConfig: the settings node's values (or the defaults it shows), then the trainer's widgets."""
    from ..training.config import TrainConfig

    values = {**(settings if settings is not None else settings_defaults()), **widgets}
    if values["base_dtype"] == AUTO_DTYPE:  # a MODEL's own dtype first: its tensors are then shared
        auto = "bf16" if comfy.model_management.should_use_bf16() else "fp32"
        values["base_dtype"] = (model_dtype(model) if model is not None else None) or auto
    if epochs:
        values["steps"] = max(1, epochs * cache_size // (values["batch_size"] * values["grad_accum"]))
    return TrainConfig(**values)
