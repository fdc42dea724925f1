"""Caption node: keep sidecar captions or generate them with a local VLM, then apply templates.

Registers the ``captioners`` model folder (``models/captioners/<name>/`` holding a transformers
model) with ComfyUI, so captioners sit next to checkpoints and LoRAs.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..dataset.captioner import DEFAULT_PROMPT, caption_images, find_captioner, list_captioners
from ..dataset.options import POLICIES
from ._progress import progress_callback
from ._types import CATEGORY
from ._types import Dataset as DatasetType
from ._validation import Choice

if TYPE_CHECKING:  # the libraries load on first use: ComfyUI imports every pack at start
    from ..dataset.manifest import Dataset

CAPTIONERS = "captioners"
KEEP = "none (keep existing captions)"

folder_paths.add_model_folder_path(CAPTIONERS, os.path.join(folder_paths.models_dir, CAPTIONERS), is_default=True)


def captioner_folders() -> list[str]:
    return folder_paths.get_folder_paths(CAPTIONERS)


class Caption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerCaption",
            display_name="Caption Dataset",
            category=f"{CATEGORY}/dataset",
            description="Fills or edits captions. Optionally generates them with a local vision-language model from "
            "models/captioners/ (BLIP, LLaVA/JoyCaption, Qwen2.5-VL, Florence-2 in transformers format), captioning "
            "the cropped image that will be trained on; the model is unloaded afterwards. Then applies trigger word, "
            "prefix, template, find/replace and suffix. Caption dropout and token shuffle happen at training time.",
            inputs=[
                DatasetType.Input("dataset"),
                io.Combo.Input(
                    "captioner",
                    options=[KEEP, *list_captioners(captioner_folders())],
                    default=KEEP,
                    tooltip=f"A model folder in models/{CAPTIONERS}/. Default '{KEEP}': no model runs, only the "
                    "template below is applied.",
                ),
                Choice(
                    "policy",
                    options=list(POLICIES),
                    default="fill_missing",
                    tooltip="fill_missing (default): generate only where there is no caption. overwrite: replace "
                    "every caption. prepend: put the generated caption in front of the existing one.",
                ),
                io.String.Input(
                    "trigger",
                    default="",
                    tooltip="Trigger word put first in every caption (once). Empty (default): none.",
                ),
                io.String.Input("prefix", default="", tooltip="Text after the trigger word. Empty (default): none."),
                io.String.Input(
                    "suffix", default="", tooltip="Text at the end of every caption. Empty (default): none."
                ),
                io.String.Input(
                    "template",
                    default="",
                    tooltip="E.g. 'a photo of {trigger}, {caption}'. Empty (default) is just '{caption}'.",
                ),
                io.String.Input("find", default="", tooltip="Text to replace in every caption. Empty (default): off."),
                io.String.Input("replace", default="", tooltip="Replacement for 'find'."),
                io.String.Input(
                    "prompt",
                    default=DEFAULT_PROMPT,
                    multiline=True,
                    tooltip="Instruction for chat-style captioners (LLaVA, Qwen); BLIP-style models ignore it.",
                ),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images per generate call (default 4)."),
                io.Int.Input(
                    "max_new_tokens", default=60, min=1, max=1024, tooltip="Longest generated caption (default 60)."
                ),
                io.Boolean.Input(
                    "trust_remote_code",
                    default=False,
                    tooltip="Let the captioner folder run its own Python code. Default off; only tick it for a "
                    "folder whose .py files you trust.",
                ),
            ],
            outputs=[DatasetType.Output(display_name="dataset", tooltip="The dataset with its new captions.")],
        )

    @classmethod
    def validate_inputs(cls, captioner: str | None) -> bool | str:
        if captioner is None or captioner == KEEP:
            return True
        try:
            find_captioner(captioner, captioner_folders())
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def execute(
        cls,
        dataset: Dataset,
        captioner: str,
        policy: str,
        trigger: str,
        prefix: str,
        suffix: str,
        template: str,
        find: str,
        replace: str,
        prompt: str,
        batch_size: int,
        max_new_tokens: int,
        trust_remote_code: bool,
    ) -> io.NodeOutput:
        from ..dataset.captions import CaptionTemplate, apply_captions
        from ..dataset.images import render_item

        settings = CaptionTemplate(trigger, prefix, suffix, template, find, replace, policy)
        generated: list[str] | None = None
        todo = [i for i, item in enumerate(dataset.items) if policy != "fill_missing" or not item.caption.strip()]
        if captioner != KEEP and todo:
            folder = find_captioner(captioner, captioner_folders())
            progress = progress_callback(len(todo))
            texts = caption_images(
                folder,
                [dataset.items[i] for i in todo],
                render_item,
                prompt=prompt,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                trust_remote_code=trust_remote_code,
                device=comfy.model_management.get_torch_device(),
                progress=progress,
            )
            comfy.model_management.soft_empty_cache()
            generated = [""] * len(dataset.items)
            for i, text in zip(todo, texts, strict=True):
                generated[i] = text
        return io.NodeOutput(apply_captions(dataset, settings, generated))
