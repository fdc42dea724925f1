"""The built-in tiny models load through ComfyUI's own loaders and sample end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tools import demo_samples, demo_vae, paths
from tools.builtin import point_at_builtin_models
from tools.sample_data import PRETRAIN_PHOTOS, photo, square, subject_photos


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
    ids=["sd3+CLIPLoader", "sd35+CLIPLoader-replacing-TripleCLIPLoader"],
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


def test_demo_vae_round_trip_through_vaeencode_and_vaedecode_keeps_the_picture(comfy):
    """ComfyUI's VAELoader('taesd3') + VAEEncode + VAEDecode give the constructed codec's latents and
    picture, and the round trip beats a 32 px thumbnail blown up to 256 px."""
    pictures = {"astronaut": square(photo("astronaut"), 256), "motorcycle": square(subject_photos()[0], 256)}
    graph = {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": paths.DEMO_VAE}}}
    for name, arr in pictures.items():
        Image.fromarray(arr).save(comfy.base_dir / "input" / f"vae_{name}.png")
        graph |= {
            f"load_{name}": {"class_type": "LoadImage", "inputs": {"image": f"vae_{name}.png"}},
            f"enc_{name}": {"class_type": "VAEEncode", "inputs": {"pixels": [f"load_{name}", 0], "vae": ["vae", 0]}},
            f"dec_{name}": {"class_type": "VAEDecode", "inputs": {"samples": [f"enc_{name}", 0], "vae": ["vae", 0]}},
            f"save_{name}": {
                "class_type": "SaveImage",
                "inputs": {"images": [f"dec_{name}", 0], "filename_prefix": f"vae_round_trip_{name}"},
            },
            f"latent_{name}": {
                "class_type": "SaveLatent",
                "inputs": {"samples": [f"enc_{name}", 0], "filename_prefix": f"latents/vae_{name}"},
            },
        }
    entry = comfy.run(graph)
    for name, arr in pictures.items():
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 255
        [latent_file] = comfy.output_files(entry, f"latent_{name}", kind="latents")
        latent = load_file(str(latent_file))["latent_tensor"].float()
        expected = demo_vae.reference_encode(x) / demo_vae.SD3_SCALE + demo_vae.SD3_SHIFT  # VAE space
        assert torch.allclose(latent, expected, atol=1e-4), float((latent - expected).abs().max())
        # the first channels are the 8x8 means (model space = A0 * (mean - 0.5))
        model_space = (latent - demo_vae.SD3_SHIFT) * demo_vae.SD3_SCALE
        means = torch.nn.functional.avg_pool2d(x, 8)
        assert torch.allclose(model_space[:, :3], demo_vae.A0 * (means - 0.5), atol=1e-4)

        [png] = comfy.output_files(entry, f"save_{name}")
        decoded = torch.from_numpy(np.asarray(Image.open(png).convert("RGB")).copy()).permute(2, 0, 1)[None] / 255
        reference = demo_vae.reference_decode(demo_vae.reference_encode(x)).clamp(0, 1)
        assert (decoded - reference).abs().max() <= 1.5 / 255  # 8-bit rounding of the saved PNG
        ours = demo_vae.psnr(decoded, x)
        bar = demo_vae.psnr(torch.from_numpy(demo_vae.thumbnail_bar(arr).copy()).permute(2, 0, 1)[None] / 255, x)
        assert ours > bar + 1.0, f"{name}: round trip {ours:.2f} dB vs thumbnail {bar:.2f} dB"


def test_demo_base_draws_each_pretraining_caption_nearest_to_its_own_photo(comfy):
    photos = [square(photo(name), demo_samples.SIZE) for name, _ in PRETRAIN_PHOTOS]
    nearest = {}
    for index, (name, caption) in enumerate(PRETRAIN_PHOTOS):
        picture, _ = demo_samples.sample(comfy, caption, seed=index)
        scores = [demo_samples.psnr(picture, ref) for ref in photos]
        nearest[name] = PRETRAIN_PHOTOS[int(np.argmax(scores))][0]
    assert nearest == {name: name for name, _ in PRETRAIN_PHOTOS}
