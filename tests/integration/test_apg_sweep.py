"""The comparison node's sweep mode through a real server, on the pretrained demo base."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tools import demo_samples, paths

SIZE = 128
PAPER = {"eta": 0.0, "norm_threshold": 15.0, "threshold_mode": "scaled", "momentum": -0.5}
WINDOW = {"window_start": 0.0, "window_end": 1.0, "window_unit": "steps"}


def sweep_graph(text: str, scales: str) -> dict:
    demo_samples.require_demo_models()
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": paths.DEMO_CHECKPOINT}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": paths.CLIP_L, "type": "sd3"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "compare": {
            "class_type": "SD35TunerCompareCFGAPG",
            "inputs": {
                "model": ["ckpt", 0],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["latent", 0],
                "vae": ["ckpt", 2],
                "seed": 3,
                "steps": 16,
                "cfg": 4.0,
                "sampler_name": "euler",
                "scheduler": "sgm_uniform",
                "denoise": 1.0,
                **PAPER,
                **WINDOW,
                "sweep_scales": scales,
            },
        },
        "save": {"class_type": "SaveImage", "inputs": {"images": ["compare", 0], "filename_prefix": "apg_sweep"}},
    }


def test_sweep_grid_renders_and_at_w9_apg_is_less_saturated_than_cfg(comfy, tmp_path):
    entry = comfy.run(sweep_graph("a cup of coffee", "3, 9"))
    shown = entry["outputs"]["compare"]
    result = shown["sd35_apg_compare"][0]
    assert result["mode"] == "sweep" and len(result["cfg"]) == len(result["apg"]) == 2
    cells = {(c["guidance"], c["scale"]): c for c in result["cells"]}
    assert set(cells) == {("CFG", 3.0), ("CFG", 9.0), ("APG", 3.0), ("APG", 9.0)}
    cfg9, apg9 = cells["CFG", 9.0], cells["APG", 9.0]
    assert apg9["saturation"] < cfg9["saturation"], (apg9, cfg9)
    # the figures explain why: the update APG applied is smaller, and CFG's grows with w
    assert apg9["update"] < cfg9["update"] and cells["CFG", 3.0]["update"] < cfg9["update"]
    text = shown["text"][0]
    assert "equal effective strength" in text and "CFG w=9 ~ APG w=" in text

    [png] = comfy.output_files(entry, "save")
    grid = np.asarray(Image.open(png).convert("RGB"))
    assert grid.shape[1] == 2 * SIZE + 4 and grid.shape[0] > 2 * SIZE  # 2 columns (w), 2 rows (CFG, APG)
    half = (grid.shape[0] - 4) // 2
    pictures = [
        grid[r * (half + 4) + half - SIZE : r * (half + 4) + half, c * (SIZE + 4) : c * (SIZE + 4) + SIZE]
        for r in (0, 1)
        for c in (0, 1)
    ]
    assert all(p.std() > 5 for p in pictures)  # four real pictures, not blanks
    assert np.abs(pictures[1].astype(int) - pictures[3].astype(int)).mean() > 2  # CFG and APG differ at w=9
