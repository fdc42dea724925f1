"""Sample the built-in demo models through a ComfyUI server's API, and score what they draw.

One seeded text-to-image graph on the demo checkpoint (optionally with a LoRA from ``models/loras``),
and the yardstick the main job, its test and the thumbnails use: PSNR of a picture to the nearest of
some reference photos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import paths
from .comfy_server import ComfyServer
from .sample_data import square, subject_photos

SIZE = 128  # pixels: the demo base's size (tools/demo_base.py)
SEED = 7
CFG = 1.5  # low guidance: the tiny model's pictures stay smooth (3 adds token-sized speckle)
SAMPLE_STEPS = 20


def require_demo_models() -> None:
    """FileNotFoundError naming the missing demo checkpoint and how to build it (setup pretrains it once)."""
    checkpoint = paths.MODELS / "checkpoints" / paths.DEMO_CHECKPOINT
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"the demo base {checkpoint} is missing: run 'bash scripts/setup_env.sh' (with the same "
            f"SD35_TUNER_HOME={paths.HOME}), which pretrains it once (about 3 minutes)"
        )


def sample_graph(text: str, lora: str | None = None, seed: int = SEED, cfg: float = CFG, size: int = SIZE) -> dict:
    """An API graph: the demo checkpoint (plus ``lora`` if given) samples ``text`` once and saves it."""
    require_demo_models()
    model = ["lora", 0] if lora else ["ckpt", 0]
    graph: dict[str, Any] = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": paths.DEMO_CHECKPOINT}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "seed": seed,
                "steps": SAMPLE_STEPS,
                "cfg": cfg,
                "sampler_name": "euler",
                "scheduler": "sgm_uniform",
                "denoise": 1.0,
            },
        },
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "sd35_demo"}},
    }
    if lora:
        graph["lora"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["ckpt", 0], "lora_name": lora, "strength_model": 1.0},
        }
    return graph


def sample(server: ComfyServer, text: str, lora: str | None = None, **kwargs: Any) -> tuple[np.ndarray, Path]:
    """Sample ``text`` on the server (see ``sample_graph``); the RGB picture and its file."""
    [png] = server.output_files(server.run(sample_graph(text, lora, **kwargs)), "save")
    return np.asarray(Image.open(png).convert("RGB")), png


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * float(np.log10(255.0**2 / max(mse, 1e-12)))


def closeness(picture: np.ndarray, references: list[np.ndarray]) -> float:
    """PSNR of ``picture`` to the nearest of ``references`` (same size)."""
    return max(psnr(picture, ref) for ref in references)


def subject_views(size: int = SIZE) -> list[np.ndarray]:
    """The held-out subject's four views, squared to ``size``."""
    return [square(view, size) for view in subject_photos()]
