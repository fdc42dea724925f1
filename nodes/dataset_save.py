"""The Save Dataset node: a dataset's cropped, bucket-sized images + captions + manifest into output/.

Thin: writing is ``dataset.save.save_dataset``; here the folder is confined to ComfyUI's output folder and
an existing one gets a new version (like LoRA files) unless ``if_exists`` says otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import folder_paths
from comfy_api.latest import io

from ..dataset.options import FORMATS
from ..training.fs import resolve_inside
from ._types import Dataset as DatasetType
from ._validation import Choice
from .dataset import CATEGORY_DATASET, progress_callback

if TYPE_CHECKING:
    from ..dataset.manifest import Dataset

NEW_VERSION, STOP = "new version", "stop"
IF_EXISTS = (NEW_VERSION, "overwrite", STOP)


class SaveDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerSaveDataset",
            display_name="Save Dataset",
            category=CATEGORY_DATASET,
            description="Writes the cropped, bucket-sized images with .txt captions and a dataset.jsonl manifest to a "
            "folder under ComfyUI's output folder (the kohya / SimpleTuner layout). All files appear at once or "
            "not at all; a folder that exists already gets a new version (_2, _3...) unless if_exists says otherwise.",
            is_output_node=True,
            inputs=[
                DatasetType.Input("dataset"),
                io.String.Input(
                    "folder",
                    default="sd35_tuner_dataset",
                    tooltip="Target folder relative to ComfyUI's output folder (default 'sd35_tuner_dataset'); "
                    "'..' and absolute paths are refused.",
                ),
                Choice(
                    "image_format",
                    options=list(FORMATS),
                    default="png",
                    tooltip="png (default, lossless), jpg or webp (quality 95).",
                ),
                io.Combo.Input(  # checked in validate_inputs, with the folder it applies to
                    "if_exists",
                    options=list(IF_EXISTS),
                    default=NEW_VERSION,
                    tooltip="When the folder exists already. 'new version' (default): write folder_2, folder_3... "
                    "beside it, like LoRA files. 'overwrite': replace the files of the same names in it. 'stop': "
                    "refuse the run before anything is written.",
                ),
            ],
            outputs=[
                DatasetType.Output(display_name="dataset", tooltip="The saved dataset (its files, not the sources)."),
                io.String.Output(display_name="path", tooltip="The folder written."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder: str | None, if_exists: str | None) -> bool | str:
        if if_exists is not None and if_exists not in IF_EXISTS:
            return f"if_exists must be one of {list(IF_EXISTS)}, got {if_exists!r}"
        if folder is None:  # linked from another node: checked when it runs
            return True
        try:
            target = resolve_inside(folder_paths.get_output_directory(), folder, "folder")
        except ValueError as err:
            return str(err)
        if if_exists == STOP and target.exists():
            return (
                f"folder: output/{folder} exists already and if_exists is 'stop'; pick 'new version' (writes "
                f"{target.name}_2) or 'overwrite', or another folder name"
            )
        return True

    @classmethod
    def execute(cls, dataset: Dataset, folder: str, image_format: str, if_exists: str) -> io.NodeOutput:
        from ..dataset.save import save_dataset
        from ..training.fs import next_free

        target = resolve_inside(folder_paths.get_output_directory(), folder, "folder")
        if if_exists == NEW_VERSION:
            target = next_free(target)
        saved = save_dataset(
            dataset,
            target,
            image_format=image_format,
            overwrite=if_exists == "overwrite",
            progress=progress_callback(len(dataset)),
        )
        return io.NodeOutput(saved, str(target), ui={"text": [f"{len(saved)} image(s) saved to {target}"]})
