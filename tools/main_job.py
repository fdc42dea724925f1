"""The main job: the bundled workflows, end to end, in a real headless ComfyUI on the built-in models.

Folder of photos -> dataset (smart crop + captions) -> latent/text cache -> SD3.5 LoRA training
(loss chart) -> CFG vs APG comparison. Each stage is a bundled workflow from ``example_workflows/``,
converted to an API prompt exactly as the frontend would queue it, with the model pickers pointed
at the built-in tiny models and image sizes shrunk for a CPU. Stages whose workflow is not in this
checkout are reported and skipped. Results are copied to ``--out`` (default ``out/main_job``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import paths
from .builtin import point_at_builtin_models
from .comfy_server import ComfyServer
from .workflow_api import set_inputs, ui_to_api
from .workflow_specs import PIPELINE, bundled

log = logging.getLogger("main_job")


@dataclass
class Stage:
    name: str
    workflow: str
    prepare: Callable[[dict[str, Any], ComfyServer], None] | None = None


def _shrink_pipeline_for_cpu(prompt: dict[str, Any], server: ComfyServer) -> None:
    """Real photos into input/, 256-px buckets, a short fp32 training run, a 128-px comparison."""
    from .sample_data import write_sample_folder

    folder = write_sample_folder(server.base_dir / "input" / "sample_photos")
    set_inputs(prompt, "SD35TunerLoadDataset", folder=folder.name)
    set_inputs(prompt, "SD35TunerSmartCrop", resolution=256)
    set_inputs(prompt, "SD35TunerCacheLatents", cache_name="sd35_cache/sample_photos")
    set_inputs(prompt, "SD35TunerTrainSettings", base_dtype="fp32")
    set_inputs(
        prompt,
        "SD35TunerTrainLora",
        steps=60,
        learning_rate=1e-3,
        quantization="none",
        lora_name="sd35_tuner_demo",
        validation_every=0,
    )
    set_inputs(prompt, "SD35TunerCompareCFGAPG", steps=8)


STAGES = [
    Stage(
        "folder -> crop -> caption -> cache -> LoRA -> CFG vs APG",
        PIPELINE,
        _shrink_pipeline_for_cpu,
    )
]


def run_stage(server: ComfyServer, stage: Stage, size: int, out: Path) -> list[Path]:
    path = bundled(stage.workflow)
    if not path.exists():
        log.warning("skipped '%s': %s is not in this checkout", stage.name, path)
        return []
    prompt = ui_to_api(json.loads(path.read_text()), server.object_info())
    point_at_builtin_models(prompt, size)
    if stage.prepare:
        stage.prepare(prompt, server)
    started = time.monotonic()
    entry = server.run(prompt, timeout=3600)
    log.info("%s: done in %.1f s", stage.name, time.monotonic() - started)
    copied = []
    for node_id, outputs in entry["outputs"].items():
        title = prompt.get(node_id, {}).get("_meta", {}).get("title", node_id)
        for item in outputs.get("images", []):
            if item.get("type") != "output":
                continue
            src = server.base_dir / "output" / item.get("subfolder", "") / item["filename"]
            dst = out / f"{title.replace(' ', '_')}-{item['filename']}"
            shutil.copy2(src, dst)
            copied.append(dst)
    return copied


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=paths.REPO / "out" / "main_job")
    parser.add_argument("--size", type=int, default=128, help="image size used for sampling on a CPU")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[main-job] %(message)s")
    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    written: list[Path] = []
    with ComfyServer(out / "comfyui") as server:
        log.info("ComfyUI %s with base directory %s", server.url, server.base_dir)
        for stage in STAGES:
            written += run_stage(server, stage, args.size, out)
        for lora in sorted((server.base_dir / "models" / "loras").glob("*.safetensors")):
            shutil.copy2(lora, out / lora.name)
            written.append(out / lora.name)
    for path in written:
        log.info("wrote %s", path)
    print(f"results: {out}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
