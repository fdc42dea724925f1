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

from .builtin import point_at_builtin_models
from .comfy_server import ComfyServer
from .demo_samples import SAMPLE_STEPS, SEED, SIZE
from .main_job import LORA, LORA_NAME, LORA_STEPS, run_pipeline
from .sample_data import SUBJECT_CAPTION, write_subject_folder
from .workflow_api import set_inputs, ui_to_api
from .workflow_specs import CFG_VS_APG, DATASET_PREP, PIPELINE, TRAIN, bundled

log = logging.getLogger("thumbnails")

THUMBNAIL = 384  # pixels, the longer side
KNOWN_CAPTION = "a cup of coffee"  # one of the demo base's pretraining captions


def _shrink(prompt: dict[str, Any], server: ComfyServer) -> str:
    """Point the data nodes at the subject's photos, the models at the demo ones, sizes at a CPU's."""
    folder = write_subject_folder(server.base_dir / "input" / "motorcycle")
    point_at_builtin_models(prompt, SIZE, demo=True)
    set_inputs(prompt, "SD35TunerLoadDataset", folder=folder.name)
    set_inputs(prompt, "SD35TunerSmartCrop", resolution=SIZE)
    set_inputs(prompt, "SD35TunerCacheLatents", cache_name=f"sd35_cache/{folder.name}")
    set_inputs(prompt, "SD35TunerTrainSettings", base_dtype="fp32", gradient_checkpointing=False)
    set_inputs(
        prompt,
        "SD35TunerTrainLora",
        steps=LORA_STEPS,
        **LORA,
        quantization="none",
        seed=SEED,
        memory_preset="manual",
        validation_prompts="",
    )
    set_inputs(prompt, "SD35TunerSaveDataset", folder="thumbnail_dataset")
    for kind in ("KSampler", "SD35TunerCompareCFGAPG"):
        set_inputs(prompt, kind, steps=SAMPLE_STEPS, seed=SEED)
    return folder.name


def _images(server: ComfyServer, entry: dict[str, Any], prompt: dict[str, Any], kind: str) -> list[Path]:
    node = next(k for k, v in prompt.items() if v["class_type"] == kind)
    return server.output_files(entry, node)


def dataset_prep(server: ComfyServer) -> Path:
    prompt = ui_to_api(json.loads(bundled(DATASET_PREP).read_text()), server.object_info())
    _shrink(prompt, server)
    return _images(server, server.run(prompt), prompt, "SD35TunerPreviewDataset")[0]


def train(server: ComfyServer) -> Path:
    from dataset.captions import CaptionTemplate, format_caption

    prompt = ui_to_api(json.loads(bundled(TRAIN).read_text()), server.object_info())
    _shrink(prompt, server)
    set_inputs(prompt, "SD35TunerTrainLora", lora_name=f"{LORA_NAME}_train")
    positive, negative = (k for k, v in prompt.items() if v["class_type"] == "CLIPTextEncode")
    trigger = prompt[positive]["inputs"]["text"].split(",")[0]
    prompt[positive]["inputs"]["text"] = format_caption(SUBJECT_CAPTION, CaptionTemplate(trigger=trigger))
    prompt[negative]["inputs"]["text"] = ""
    return _images(server, server.run(prompt, timeout=3600), prompt, "SaveImage")[0]


def pipeline(server: ComfyServer) -> Path:
    run = run_pipeline(server, lora_name=f"{LORA_NAME}_thumbnail")
    set_inputs(run.prompt, "SD35TunerCompareCFGAPG", sweep_scales="")
    return _images(server, server.run(run.prompt, timeout=3600), run.prompt, "SD35TunerCompareCFGAPG")[0]


def cfg_vs_apg(server: ComfyServer) -> Path:
    prompt = ui_to_api(json.loads(bundled(CFG_VS_APG).read_text()), server.object_info())
    _shrink(prompt, server)
    positive, negative = (k for k, v in prompt.items() if v["class_type"] == "CLIPTextEncode")
    prompt[positive]["inputs"]["text"], prompt[negative]["inputs"]["text"] = KNOWN_CAPTION, ""
    return _images(server, server.run(prompt), prompt, "SaveImage")[0]


RENDERERS: dict[str, Callable[[ComfyServer], Path]] = {
    DATASET_PREP: dataset_prep,
    TRAIN: train,
    PIPELINE: pipeline,
    CFG_VS_APG: cfg_vs_apg,
}


def thumbnail(picture: Path, dest: Path) -> Path:
    """``picture`` fitted into THUMBNAIL px (longer side, never enlarged past 3×), as a JPEG at ``dest``."""
    image = Image.open(picture).convert("RGB")
    scale = min(THUMBNAIL / max(image.size), 3.0)
    size = (round(image.width * scale), round(image.height * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    image.resize(size, resample).save(dest, "JPEG", quality=88)
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
