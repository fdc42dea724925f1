"""Custom socket types of the pack, declared once."""

from comfy_api.latest import io

Dataset = io.Custom("SD35_DATASET")  # dataset.manifest.Dataset
Cache = io.Custom("SD35_CACHE")  # training.cache handle (a directory of safetensors shards + index)
TrainSettings = io.Custom("SD35_TRAIN_SETTINGS")  # advanced trainer settings (training.config)
# core's trained-adapter type (a state dict): exported by name where the API has it, else declared as core does
LoraModel = getattr(io, "LoraModel", None) or io.Custom("LORA_MODEL")

CATEGORY = "SD3.5 Tuner"
