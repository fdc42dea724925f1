"""Crop throughput on 1024-px photos, against the cost of VAE-encoding the same images.

Smart crop runs once per image before latents are cached; it must never be the bottleneck of
dataset preparation. This measures crop decisions per second (image decode + Haar face
detection + spectral-residual saliency + window search, as the Smart Crop node does them) and
the crop-and-resize render, then encodes some of the same bucket-sized crops with the
built-in full-size SD3 VAE through ComfyUI's ``comfy.sd.VAE``. The last line is the ratio of
crop time to encode time per image (target: at most 0.05).

    ~/.cache/sd35-tuner/venv/bin/python bench/bench_crop.py [--repeats 3] [--encode 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dataset.buckets import SD35_BUCKETS_1024  # noqa: E402
from dataset.crop import CropSettings, crop_dataset  # noqa: E402
from dataset.faces import haar_face_detector  # noqa: E402
from dataset.images import render_item  # noqa: E402
from dataset.manifest import Dataset, DatasetItem  # noqa: E402
from tools import paths  # noqa: E402
from tools.comfy_import import import_comfy  # noqa: E402
from tools.sample_data import photo  # noqa: E402


def write_photos(folder: Path) -> Dataset:
    """Eight 1024-px images: the five photos scaled to a 1024 long side, three pasted into canvases."""
    items = []
    rng = np.random.default_rng(0)
    for name in ("astronaut", "coffee", "rocket", "chelsea", "camera"):
        im = Image.fromarray(photo(name))
        scale = 1024 / max(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        path = folder / f"{name}.png"
        im.save(path)
        items.append(DatasetItem(str(path)))
    for name, canvas, at in (
        ("astronaut", (1024, 640), (480, 60)),
        ("rocket", (640, 1024), (0, 500)),
        ("coffee", (1024, 1024), (600, 560)),
    ):
        arr = photo(name)[:400, :400]
        out = np.clip(rng.normal(128, 6, (canvas[1], canvas[0], 3)), 0, 255).astype(np.uint8)
        out[at[1] : at[1] + 400, at[0] : at[0] + 400] = arr
        path = folder / f"{name}_canvas.png"
        Image.fromarray(out).save(path)
        items.append(DatasetItem(str(path)))
    return Dataset(tuple(items), root=str(folder))


def load_vae():
    import_comfy()
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(paths.MODELS / "vae" / paths.SD3_VAE))
    return comfy.sd.VAE(sd=sd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="passes over the 8 images for the crop timing")
    parser.add_argument("--encode", type=int, default=2, help="images VAE-encoded for the baseline (about 30 s each)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    detector, why = haar_face_detector()
    if detector is None:
        print(f"warning: no face detector ({why}); timing saliency only")
    settings = CropSettings(max_upscale=0)
    with tempfile.TemporaryDirectory(prefix="bench-crop-") as tmp:
        dataset = write_photos(Path(tmp))
        crop_dataset(dataset, SD35_BUCKETS_1024, settings, detector)  # warm-up: cascade load, caches
        start = time.perf_counter()
        for _ in range(args.repeats):
            cropped = crop_dataset(dataset, SD35_BUCKETS_1024, settings, detector)
        decide = (time.perf_counter() - start) / (args.repeats * len(dataset))
        reasons = [i.crop_reason for i in cropped.items]
        start = time.perf_counter()
        crop_dataset(dataset, SD35_BUCKETS_1024, CropSettings(mode="saliency", max_upscale=0))
        saliency_only = (time.perf_counter() - start) / len(dataset)
        start = time.perf_counter()
        rendered = [render_item(item) for item in cropped.items]
        render = (time.perf_counter() - start) / len(rendered)
        print(f"images: {len(dataset)} at 1024 px long side; reasons: {', '.join(reasons)}")
        print(
            f"crop decisions: {1 / decide:.2f}/s ({decide * 1000:.0f} ms each; saliency-only mode "
            f"{saliency_only * 1000:.0f} ms); render to bucket {render * 1000:.0f} ms each"
        )

        vae = load_vae()
        times = []
        for image in rendered[: args.encode]:
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
            start = time.perf_counter()
            latent = vae.encode(pixels)
            times.append(time.perf_counter() - start)
            print(f"VAE encode {image.width}x{image.height}: {times[-1]:.2f} s -> latent {tuple(latent.shape)}")
        encode = sum(times) / len(times)
    ratio = (decide + render) / encode
    print(
        f"crop time / VAE-encode time per image: {ratio:.4f} (crop {decide + render:.3f} s vs encode {encode:.2f} s; target <= 0.05)"
    )


if __name__ == "__main__":
    main()
