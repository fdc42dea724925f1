"""Render the Templates dialog's thumbnails: one ``<workflow name>.jpg`` next to each bundled workflow.

Each picture is what its workflow makes, run in a real headless ComfyUI on the built-in demo models
(``tools/demo_base.py``): the dataset preparation's preview sheet of the held-out motorcycle photos, the
trained LoRA's picture, the trained pipeline's CFG|APG pair, and CFG|APG on the demo base for a caption
it knows. Nothing is drawn by hand; run ``python -m tools.thumbnails`` after the demo models change.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from .comfy_server import ComfyServer
from .demo_samples import SAMPLE_STEPS, SEED
from .main_job import LORA_NAME, point_at_demo, run_pipeline
from .sample_data import SUBJECT_CAPTION
from .workflow_api import set_inputs, ui_to_api
from .workflow_specs import CFG_VS_APG, DATASET_PREP, PIPELINE, TRAIN, bundled

log = logging.getLogger("thumbnails")

THUMBNAIL = 384  # pixels, the longer side
KNOWN_CAPTION = "a cup of coffee"  # one of the demo base's pretraining captions


def _shrink(prompt: dict[str, Any], server: ComfyServer) -> None:
    """The main job's demo setup (``main_job.point_at_demo``), plus the samplers' steps and seed."""
    point_at_demo(prompt, server)
    set_inputs(prompt, "SD35TunerSaveDataset", folder="thumbnail_dataset")
    for kind in ("KSampler", "SD35TunerCompareCFGAPG"):
        set_inputs(prompt, kind, steps=SAMPLE_STEPS, seed=SEED)


def _images(server: ComfyServer, entry: dict[str, Any], prompt: dict[str, Any], kind: str) -> list[Path]:
    node = next(k for k, v in prompt.items() if v["class_type"] == kind)
    return server.output_files(entry, node)


def dataset_prep(server: ComfyServer) -> list[Path]:
    prompt = ui_to_api(json.loads(bundled(DATASET_PREP).read_text()), server.object_info())
    _shrink(prompt, server)
    return _images(server, server.run(prompt), prompt, "SD35TunerPreviewDataset")[:4]


def train(server: ComfyServer) -> list[Path]:
    from dataset.captions import CaptionTemplate, format_caption

    prompt = ui_to_api(json.loads(bundled(TRAIN).read_text()), server.object_info())
    _shrink(prompt, server)
    set_inputs(prompt, "SD35TunerTrainLora", lora_name=f"{LORA_NAME}_train")
    positive, negative = (k for k, v in prompt.items() if v["class_type"] == "CLIPTextEncode")
    trigger = prompt[positive]["inputs"]["text"].split(",")[0]
    prompt[positive]["inputs"]["text"] = format_caption(SUBJECT_CAPTION, CaptionTemplate(trigger=trigger))
    prompt[negative]["inputs"]["text"] = ""
    return _images(server, server.run(prompt, timeout=3600), prompt, "SaveImage")[:1]


def pipeline(server: ComfyServer) -> list[Path]:
    run = run_pipeline(server, lora_name=f"{LORA_NAME}_thumbnail")
    set_inputs(run.prompt, "SD35TunerCompareCFGAPG", sweep_scales="")
    entry = server.run(run.prompt, timeout=3600)
    compare = next(k for k, v in run.prompt.items() if v["class_type"] == "SD35TunerCompareCFGAPG")
    [save] = [
        k for k, v in run.prompt.items() if v["class_type"] == "SaveImage" and v["inputs"]["images"][0] == compare
    ]
    return server.output_files(entry, save)


def cfg_vs_apg(server: ComfyServer) -> list[Path]:
    prompt = ui_to_api(json.loads(bundled(CFG_VS_APG).read_text()), server.object_info())
    _shrink(prompt, server)
    positive, negative = (k for k, v in prompt.items() if v["class_type"] == "CLIPTextEncode")
    prompt[positive]["inputs"]["text"], prompt[negative]["inputs"]["text"] = KNOWN_CAPTION, ""
    return _images(server, server.run(prompt), prompt, "SaveImage")[:1]


RENDERERS: dict[str, Callable[[ComfyServer], list[Path]]] = {
    DATASET_PREP: dataset_prep,
    TRAIN: train,
    PIPELINE: pipeline,
    CFG_VS_APG: cfg_vs_apg,
}


def thumbnail(pictures: list[Path], dest: Path) -> Path:
    """``pictures`` side by side (two rows when four), fitted into THUMBNAIL px (longer side, never enlarged
    past 3×), as a JPEG at ``dest``."""
    if not pictures:
        raise ValueError(f"nothing to make {dest.name} from: the workflow saved no picture")
    images = [Image.open(p).convert("RGB") for p in pictures]
    columns = 2 if len(images) == 4 else len(images)
    rows = -(-len(images) // columns)
    width, height = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (columns * width, rows * height), (24, 24, 24))
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    scale = min(THUMBNAIL / max(sheet.size), 3.0)
    size = (round(sheet.width * scale), round(sheet.height * scale))
    sheet.resize(size, Image.Resampling.LANCZOS).save(dest, "JPEG", quality=88)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(RENDERERS), action="append", help="render only these workflows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[thumbnails] %(message)s")
    with tempfile.TemporaryDirectory(prefix="sd35_thumbnails_") as tmp, ComfyServer(Path(tmp)) as server:
        for name, render in RENDERERS.items():
            if args.only and name not in args.only:
                continue
            dest = bundled(name).with_suffix(".jpg")
            print(f"{thumbnail(render(server), dest)}")


if __name__ == "__main__":
    main()
