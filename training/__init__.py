"""The SD3/SD3.5 LoRA trainer: a plain library (diffusers + peft + optimum-quanto), no ComfyUI import."""
