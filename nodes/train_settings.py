"""The trainer's advanced settings node: one SD35_TRAIN_SETTINGS dict for the trainer's 'settings' input."""

from __future__ import annotations

from typing import Any

from comfy_api.latest import io

from ._types import CATEGORY, TrainSettings
from ._validation import Choice, verdict


class SD35TunerTrainSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..training.options import DTYPE_NAMES, LOSS_WEIGHTING, OPTIMIZERS, SCHEDULES, TIMESTEP_SAMPLING

        return io.Schema(
            node_id="SD35TunerTrainSettings",
            display_name="LoRA Training Settings",
            category=f"{CATEGORY}/training",
            description="The trainer's advanced settings. Connect to the trainer's 'settings' input; without it the "
            "defaults shown here are used. The defaults suit SD3.5 Large on a 24 GB card.",
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
                Choice("optimizer", options=list(OPTIMIZERS), default="adamw", tooltip=_OPT_HELP),
                Choice(
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
                    default=0.1,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Clip the gradient norm to this value. Default 0.1, the low value SD3.5 Large needs to "
                    "ride out loss spikes (with AdamW the clip tames spikes without slowing normal steps, so it "
                    "suits Medium too); 0 disables clipping.",
                ),
                io.Int.Input(
                    "grad_accum",
                    default=1,
                    min=1,
                    max=256,
                    tooltip="Batches accumulated per optimizer step: a larger effective batch at no extra memory "
                    "(one batch's activations at a time), each step taking that many batches' time. Default 1.",
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
                Choice(
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
                Choice(
                    "loss_weighting",
                    options=list(LOSS_WEIGHTING),
                    default="none",
                    tooltip="Per-σ loss weights (SD3 paper). Default 'none' = equal weights.",
                ),
                io.Boolean.Input(
                    "gradient_checkpointing",
                    default=True,
                    tooltip="Recompute activations in the backward pass instead of keeping them. Default on: it "
                    "saves several GB on SD3.5 Large at 1024 px for about a third more time per step; turn it "
                    "off only with memory to spare.",
                ),
                Choice(
                    "base_dtype",
                    options=[AUTO_DTYPE, *DTYPE_NAMES],
                    default=AUTO_DTYPE,
                    tooltip="Precision of the frozen base and its compute (the LoRA always trains in fp32). Default "
                    "'auto': bf16 where the device supports it, else fp32. Memory without quantization: SD3.5 "
                    "Large's weights take about 16 GB in bf16/fp16 and 32 GB in fp32.",
                ),
                Choice(
                    "save_dtype",
                    options=list(DTYPE_NAMES),
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
                io.Boolean.Input(
                    "block_offload",
                    default=False,
                    optional=True,
                    tooltip="Keep the frozen transformer blocks in CPU RAM and bring one block at a time to the GPU "
                    "for each forward and backward pass (kohya's block swap). Default off. Memory: the GPU then "
                    "holds about two blocks of the base instead of all (SD3.5 Large int8: under 1 GB instead of "
                    "8 GB), at the cost of copying the base over PCIe twice per step; the RAM must hold the base. "
                    "Needs gradient_checkpointing on. The trainer's memory_preset 'auto' turns it on when needed.",
                ),
            ],
            outputs=[TrainSettings.Output(display_name="settings", tooltip="For the trainer's settings input.")],
        )

    @classmethod
    def validate_inputs(cls, blocks: str, exclude_blocks: str) -> bool | str:
        from ..training.config import config_problems

        return verdict(config_problems({"blocks": blocks, "exclude_blocks": exclude_blocks}))

    @classmethod
    def execute(cls, **settings: Any) -> io.NodeOutput:
        return io.NodeOutput(settings)  # checked in full by the trainer's TrainConfig, with its own inputs


_OPT_HELP = (
    "adamw: AdamW, fp32 states (default; 8 bytes per LoRA parameter, under 1 GB up to rank 64). adamw_lowmem: 8-bit "
    "AdamW with bitsandbytes on CUDA, else bf16 states (a quarter or half of that). prodigy / stableadamw: need the "
    "prodigyopt / torch-optimi packages."
)
AUTO_DTYPE = "auto"


def settings_defaults() -> dict[str, Any]:
    """What the trainer uses without a settings node: exactly the defaults this node shows."""
    return {i.id: i.default for i in SD35TunerTrainSettings.define_schema().inputs}
