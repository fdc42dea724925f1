"""The trainer's choices, in a module light enough for ComfyUI to import at start.

Node schemas need these names when ComfyUI registers the pack (before any training); config.py
and model.py import them from here, so there is one definition.
"""

OPTIMIZERS = ("adamw", "adamw_lowmem", "prodigy", "stableadamw")
SCHEDULES = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
TIMESTEP_SAMPLING = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
PRESET_NAMES = ("attention", "attention_ff", "all_linear", "x_stream", "context_stream")
QUANTIZATION = ("none", "int8", "int4", "fp8")
DTYPE_NAMES = ("fp32", "bf16", "fp16")
MEMORY_PRESETS = ("manual", "auto")  # auto: quantization, block offload, rank, batch, checkpointing for the GPU
