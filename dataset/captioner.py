"""Caption images with a local vision-language model loaded through plain transformers.

A captioner is a folder in transformers' native format (``config.json``, weights, processor
files), e.g. BLIP, LLaVA-style JoyCaption, Qwen2.5-VL or the native Florence-2 port, loaded
with ``AutoModelForImageTextToText`` from local files only: nothing is downloaded, and the
folder's own Python code never runs unless the caller passes ``trust_remote_code=True``.
Models with a chat template are prompted through it, Florence-2 with a task token
(``<DETAILED_CAPTION>`` unless the prompt names another), others (BLIP) caption unconditionally.
The model is freed when ``caption_images`` returns or raises (including a cancel raised by
the progress callback), so a captioner never stays resident next to the diffusion model.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

logger = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_PROMPT = "Describe this image in one detailed sentence."
FLORENCE_TASK = "<DETAILED_CAPTION>"  # used unless the prompt is itself a Florence-2 task token


def list_captioners(folders: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Names of the sub-folders of ``folders`` that hold a transformers model (a config.json)."""
    names: set[str] = set()
    for folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            names.update(p.parent.name for p in folder.glob("*/config.json"))
    return sorted(names)


def find_captioner(name: str, folders: Sequence[str | os.PathLike[str]]) -> Path:
    """The folder of captioner ``name``; ValueError naming the searched folders if absent."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"captioner '{name}' must be a folder name inside models/captioners")
    for folder in folders:
        candidate = Path(folder) / name
        if (candidate / "config.json").is_file():
            return candidate
    searched = ", ".join(str(f) for f in folders) or "(no captioners folder registered)"
    raise ValueError(
        f"captioner '{name}' not found: no {name}/config.json in {searched}. Put a transformers model "
        "folder (config.json, weights, processor files) there and refresh"
    )


def check_loadable(folder: Path, trust_remote_code: bool) -> None:
    """Refuse, with the reason, a folder whose model type transformers does not know natively
    unless remote code is allowed (then its own code defines the type)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"captioner {config_path}: unreadable config ({err})") from err
    model_type = config.get("model_type", "")
    if model_type in CONFIG_MAPPING_NAMES or trust_remote_code:
        return
    if config.get("auto_map"):
        raise ValueError(
            f"captioner {folder}: model type '{model_type}' is not built into transformers {transformers.__version__} "
            "and the folder ships its own code (auto_map in config.json). Tick trust_remote_code only if you trust "
            "its .py files, or use a version converted to transformers' native format"
        )
    raise ValueError(
        f"captioner {folder}: model type '{model_type}' is not known to transformers {transformers.__version__}; "
        "upgrade transformers or use a model in transformers' native format"
    )


class Captioner:
    """A loaded model + processor. Use ``caption_images`` unless you manage unloading yourself."""

    def __init__(
        self, folder: Path, *, trust_remote_code: bool = False, device: Any = "cpu", dtype: Any = None
    ) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_loadable(folder, trust_remote_code)
        self.folder = folder
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": True}
        try:
            self.processor = AutoProcessor.from_pretrained(folder, **kwargs)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, **kwargs)
        except (ValueError, OSError, KeyError) as err:
            hint = (
                " It needs its own code: tick trust_remote_code only if you trust that folder's .py files."
                if "trust_remote_code" in str(err) and not trust_remote_code
                else ""
            )
            raise ValueError(f"captioner {folder}: cannot be loaded with transformers: {err}.{hint}") from err
        self.model.to(self.device).eval()
        self.dtype = dtype
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        self.chat = bool(getattr(self.processor, "chat_template", None))
        if self.tokenizer is not None and self.chat:
            self.tokenizer.padding_side = "left"  # decoder-only models generate after the prompt

    def __call__(self, images: list[Image.Image], prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 60) -> list[str]:
        import torch

        tasks = getattr(self.processor, "task_prompts_without_inputs", None)
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        elif isinstance(tasks, dict):  # Florence-2 is prompted with a task token, not free text
            task = prompt.strip() if prompt.strip() in tasks else FLORENCE_TASK
            inputs = self.processor(images=images, text=[task] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        if self.chat and "input_ids" in inputs and not self.model.config.is_encoder_decoder:
            out = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def close(self) -> None:
        import torch

        self.model = None
        self.processor = None
        self.tokenizer = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def caption_images(
    folder: Path,
    items: Sequence[T],
    to_image: Callable[[T], Image.Image],
    *,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = 4,
    max_new_tokens: int = 60,
    trust_remote_code: bool = False,
    device: Any = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Caption ``items`` (turned into images by ``to_image``) in batches; unload the model after.

    ``progress(done, total)`` runs after each batch and may raise to cancel.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    captioner = Captioner(folder, trust_remote_code=trust_remote_code, device=device)
    captions: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            batch = [to_image(item) for item in items[start : start + batch_size]]
            captions.extend(captioner(batch, prompt, max_new_tokens))
            if progress is not None:
                progress(len(captions), len(items))
    finally:
        captioner.close()
        del captioner
        gc.collect()
    logger.info("captioned %d image(s) with %s", len(captions), folder.name)
    return captions
