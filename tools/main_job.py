"""The main job: teach the built-in demo base a subject it has never seen, in a real headless ComfyUI.

The demo base (``tools/demo_base.py``) knows eight photos by their captions. Here the bundled pipeline
workflow (``example_workflows/``, converted to an API prompt as the frontend would queue it) runs on it:
a folder of four views of one red motorcycle, held out from pretraining -> smart crop -> captions with
the trigger word -> latent/text cache -> a LoRA trained for about a minute (loss chart) -> a CFG-vs-APG
sweep on the trained model. Then, through the server's API, the trigger prompt is sampled from one seed
with the base alone and with the LoRA, and ``story.png`` puts a training photo, the base's picture and
the trained picture side by side, with how close each is to the subject (PSNR to the nearest view).
Prints where everything is and the job's wall time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import paths
from .builtin import point_at_builtin_models
from .comfy_server import ComfyServer
from .demo_samples import SAMPLE_STEPS, SEED, SIZE, closeness, sample, subject_views
from .sample_data import SUBJECT_CAPTION, write_subject_folder
from .workflow_api import set_inputs, ui_to_api
from .workflow_specs import PIPELINE, bundled

log = logging.getLogger("main_job")

LORA_STEPS = 1200
LORA = {"batch_size": 4, "learning_rate": 3e-3, "rank": 16, "alpha": 16.0, "preset": "all_linear"}
LORA_NAME = "sd35_demo_motorcycle"
SWEEP = "1.5, 3, 6, 9"


@dataclass
class PipelineRun:
    prompt: dict[str, Any]
    entry: dict[str, Any]
    lora: str  # file name in models/loras
    trigger_prompt: str
    seconds: float


def _node(prompt: dict[str, Any], class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def point_at_demo(prompt: dict[str, Any], server: ComfyServer, steps: int = LORA_STEPS) -> None:
    """A bundled workflow's prompt on the demo models and the held-out subject's photos, sized for a CPU."""
    folder = write_subject_folder(server.base_dir / "input" / "motorcycle")
    point_at_builtin_models(prompt, SIZE, demo=True)
    set_inputs(prompt, "SD35TunerLoadDataset", folder=folder.name)
    set_inputs(prompt, "SD35TunerSmartCrop", resolution=SIZE)
    set_inputs(prompt, "SD35TunerCacheLatents", cache_name=f"sd35_cache/{folder.name}")
    settings = {"base_dtype": "fp32", "gradient_checkpointing": False}
    set_inputs(prompt, "SD35TunerTrainSettings", **settings)
    train = {"quantization": "none", "seed": SEED, "memory_preset": "manual", "validation_prompts": ""}
    set_inputs(prompt, "SD35TunerTrainLora", steps=steps, **LORA, **train)


def run_pipeline(server: ComfyServer, steps: int = LORA_STEPS, lora_name: str = LORA_NAME) -> PipelineRun:
    """The bundled pipeline on the held-out subject's photos, shrunk for a CPU; returns what it made."""
    from dataset.captions import CaptionTemplate, format_caption

    prompt = ui_to_api(json.loads(bundled(PIPELINE).read_text()), server.object_info())
    point_at_demo(prompt, server, steps)
    set_inputs(prompt, "SD35TunerTrainLora", lora_name=lora_name)
    trigger = prompt[_node(prompt, "SD35TunerCaption")]["inputs"]["trigger"]
    trigger_prompt = format_caption(SUBJECT_CAPTION, CaptionTemplate(trigger=trigger))
    positive, negative = (k for k, v in prompt.items() if v["class_type"] == "CLIPTextEncode")
    prompt[positive]["inputs"]["text"], prompt[negative]["inputs"]["text"] = trigger_prompt, ""
    set_inputs(prompt, "SD35TunerCompareCFGAPG", steps=SAMPLE_STEPS, seed=SEED, sweep_scales=SWEEP)
    started = time.monotonic()
    entry = server.run(prompt, timeout=3600)
    seconds = time.monotonic() - started
    [lora] = entry["outputs"][_node(prompt, "SD35TunerTrainLora")]["lora_name"]
    return PipelineRun(prompt, entry, lora, trigger_prompt, seconds)


def compose_story(panels: list[tuple[np.ndarray, str]], scale: int = 2) -> Image.Image:
    """Pictures side by side, each enlarged ``scale``× under its (wrapped) label."""
    from apg.compare import label_band

    width = panels[0][0].shape[1] * scale
    columns = []
    for picture, label in panels:
        big = np.asarray(Image.fromarray(picture).resize((width, width), Image.Resampling.LANCZOS))
        band = label_band(label, width, 13).numpy()
        columns.append((band, big))
    band_height = max(band.shape[0] for band, _ in columns)
    canvas = Image.new("RGB", (len(columns) * (width + 6) - 6, band_height + width), (24, 24, 24))
    for i, (band, big) in enumerate(columns):
        canvas.paste(Image.fromarray(band), (i * (width + 6), 0))
        canvas.paste(Image.fromarray(big), (i * (width + 6), band_height))
    return canvas


def _copy_outputs(server: ComfyServer, run: PipelineRun, out: Path) -> list[Path]:
    copied = []
    for node_id, outputs in run.entry["outputs"].items():
        title = run.prompt.get(node_id, {}).get("_meta", {}).get("title", node_id)
        for item in outputs.get("images", []):
            if item.get("type") == "output":
                src = server.base_dir / "output" / item.get("subfolder", "") / item["filename"]
                copied.append(Path(shutil.copy2(src, out / f"{title.replace(' ', '_')}.png")))
    copied.append(Path(shutil.copy2(server.base_dir / "models" / "loras" / run.lora, out / run.lora)))
    return copied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=paths.REPO / "out" / "main_job")
    parser.add_argument("--steps", type=int, default=LORA_STEPS, help="LoRA training steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[main-job] %(message)s")
    started = time.monotonic()
    # the server trains a tiny model: one torch thread is ~10x faster than two fighting over shared cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with ComfyServer(out / "comfyui") as server:
        log.info("ComfyUI %s, base directory %s", server.url, server.base_dir)
        run = run_pipeline(server, args.steps)
        log.info("pipeline (crop, captions, cache, %d LoRA steps, CFG/APG sweep) took %.0f s", args.steps, run.seconds)
        written = _copy_outputs(server, run, out)
        base, _ = sample(server, run.trigger_prompt)
        trained, _ = sample(server, run.trigger_prompt, lora=run.lora)
    views = subject_views()
    base_psnr, trained_psnr = closeness(base, views), closeness(trained, views)
    story = compose_story(
        [
            (views[0], "one of the 4 training photos (never seen by the base model)"),
            (base, f"base model, prompt '{run.trigger_prompt}'\n{base_psnr:.1f} dB to the nearest photo"),
            (trained, f"after {args.steps} LoRA steps, same seed\n{trained_psnr:.1f} dB to the nearest photo"),
        ]
    )
    story.save(out / "story.png")
    written.insert(0, out / "story.png")
    for path in written:
        print(f"wrote {path}")
    print(
        f"trigger prompt: '{run.trigger_prompt}'; PSNR to the subject: base {base_psnr:.2f} dB, LoRA {trained_psnr:.2f} dB"
    )
    print(f"main job wall time: {time.monotonic() - started:.0f} s (results in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
