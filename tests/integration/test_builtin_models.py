"""The built-in tiny models load through ComfyUI's own loaders and sample end to end."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tools import paths
from tools.builtin import point_at_builtin_models


def _graph(ckpt: str, clip_loader: dict, size: int = 64, seed: int = 1) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "clip": clip_loader,
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a red fox in snow"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "shift": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["ckpt", 0], "shift": 3.0}},
        "sample": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["shift", 0],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "seed": seed,
                "steps": 2,
                "cfg": 4.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"builtin_{ckpt}"}},
    }


CLIP_L_AS_SD3 = {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}}
TRIPLE = {
    "class_type": "TripleCLIPLoader",
    "inputs": {"clip_name1": "clip_l.safetensors"},
}  # swapped by point_at_builtin_models


@pytest.mark.parametrize(
    ("ckpt", "clip"),
    [(paths.SD3_CHECKPOINT, CLIP_L_AS_SD3), (paths.SD35_CHECKPOINT, TRIPLE)],
    ids=["sd3+CLIPLoader", "sd35+TripleCLIPLoader-swapped"],
)
def test_builtin_checkpoint_samples_and_decodes(comfy, ckpt, clip):
    entry = comfy.run(point_at_builtin_models(_graph(ckpt, dict(clip)), sd35=ckpt == paths.SD35_CHECKPOINT))
    [png] = comfy.output_files(entry, "save")
    pixels = np.asarray(Image.open(png))
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 0, "a constant image means the model or VAE produced nothing"


def test_same_seed_same_image_other_seed_other_image(comfy):
    a = comfy.output_files(comfy.run(_graph(paths.SD3_CHECKPOINT, CLIP_L_AS_SD3, seed=7)), "save")[0]
    b = comfy.output_files(comfy.run(_graph(paths.SD3_CHECKPOINT, CLIP_L_AS_SD3, seed=7)), "save")[0]
    c = comfy.output_files(comfy.run(_graph(paths.SD3_CHECKPOINT, CLIP_L_AS_SD3, seed=8)), "save")[0]
    a, b, c = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b, c))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 0
