"""The demo base model: the tiny SD3.5 transformer, pretrained at setup so that each caption draws its photo.

The built-in random models only have the right shapes; a newcomer cannot see anything learn on them.
This one knows eight pictures (``tools.sample_data.PRETRAIN_PHOTOS``): every photo is squared to
128 px (a CPU-sized picture: 64 image tokens), encoded with the demo VAE (``tools.demo_vae``, the ``taesd3`` that ships next to it), every
caption with the built-in CLIP-L exactly as ComfyUI's CLIPTextEncode does, and the transformer
(2 blocks, hidden 128, SD3.5 layout) is trained from a fixed seed with SD3's rectified-flow loss
(``training.loss``). A share of the steps uses the empty prompt, so classifier-free guidance has an
unconditional model to push away from. The result is a Stability-layout checkpoint with the demo VAE
inside (``first_stage_model.taesd_*``), loadable by CheckpointLoaderSimple and by the trainer.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import paths

log = logging.getLogger(__name__)

SIZE = 128  # pixels per side of every pretraining photo
STEPS = 1500
LEARNING_RATE = 3e-3
EMPTY_SHARE = 0.15  # share of samples trained with the empty prompt (the unconditional model)
SEED = 20260
THREADS = 1  # two threads on 2 shared cores ran 10x slower here (spinning); one is ~0.1 s a step


@dataclass
class Corpus:
    """Latents of the pretraining photos and their captions' conditioning, plus the empty prompt's."""

    captions: list[str]
    latents: torch.Tensor  # [N, 16, 16, 16]
    cond: torch.Tensor  # [N, 77, 4096]
    pooled: torch.Tensor  # [N, 2048]
    empty_cond: torch.Tensor  # [1, 77, 4096]
    empty_pooled: torch.Tensor  # [1, 2048]


def encode_texts(texts: list[str], clip_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text through ComfyUI's SD3 CLIP on the built-in CLIP-L, as CLIPTextEncode computes it."""
    from .comfy_import import import_comfy

    import_comfy()
    import comfy.sd

    clip = comfy.sd.load_clip(ckpt_paths=[str(clip_path)], clip_type=comfy.sd.CLIPType.SD3)
    conds, pooleds = [], []
    for text in texts:
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        conds.append(cond.float())
        pooleds.append(pooled.float())
    return torch.cat(conds), torch.cat(pooleds)


def build_corpus(models: Path) -> Corpus:
    from .demo_vae import _pixels, reference_encode
    from .sample_data import PRETRAIN_PHOTOS, photo, square

    captions = [caption for _, caption in PRETRAIN_PHOTOS]
    pixels = _pixels([square(photo(name), SIZE) for name, _ in PRETRAIN_PHOTOS])
    cond, pooled = encode_texts([*captions, ""], models / "text_encoders" / paths.CLIP_L)
    return Corpus(captions, reference_encode(pixels), cond[:-1], pooled[:-1], cond[-1:], pooled[-1:])


def pretrain(corpus: Corpus, steps: int = STEPS, seed: int = SEED, depth: int = 2):
    """Train a fresh SD3.5-layout transformer on ``corpus`` (every photo in every step); return it in eval mode."""
    from training.loss import flow_matching_loss, sample_sigmas

    from .tiny_models import build_transformer

    model = build_transformer(depth, sd35=True, seed=seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    n = corpus.latents.shape[0]
    started = time.monotonic()
    for step in range(steps):
        empty = torch.rand(n, generator=generator) < EMPTY_SHARE
        cond = torch.where(empty[:, None, None], corpus.empty_cond, corpus.cond)
        pooled = torch.where(empty[:, None], corpus.empty_pooled, corpus.pooled)
        noise = torch.randn(corpus.latents.shape, generator=generator)
        sigmas = sample_sigmas(n, generator)
        loss = flow_matching_loss(model, corpus.latents, cond, pooled, noise, sigmas)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            log.info(
                "pretraining step %d/%d, loss %.4f, %.0f s", step + 1, steps, loss.item(), time.monotonic() - started
            )
    return model.eval().requires_grad_(False)


def write_demo_models(out: Path, steps: int = STEPS, threads: int = THREADS) -> dict[str, Path]:
    """Write the pretrained demo checkpoint (with the demo VAE inside) under ``out``.

    ``out`` must already hold the built-in CLIP-L (``tools.tiny_models``), whose encodings the
    base learns its captions from.
    """
    from training.fs import atomic_save_safetensors

    from .comfy_import import import_comfy
    from .demo_vae import checkpoint_vae
    from .tiny_models import diffusers_to_mmdit

    import_comfy()
    torch.set_num_threads(threads)
    written = {paths.DEMO_CHECKPOINT: out / "checkpoints" / paths.DEMO_CHECKPOINT}
    corpus = build_corpus(out)
    model = pretrain(corpus, steps)
    state = diffusers_to_mmdit(model.state_dict(), 2, "model.diffusion_model.")
    meta = {
        "sd35_tuner": "built-in demo base: tiny SD3.5 transformer pretrained on skimage photos",
        "family": "sd35",
        "captions": "\n".join(corpus.captions),
    }
    atomic_save_safetensors(written[paths.DEMO_CHECKPOINT], {**state, **checkpoint_vae()}, meta)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=paths.MODELS, help="models folder holding the built-in CLIP-L")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument(
        "--threads", type=int, default=THREADS, help="torch threads (1 on a machine shared with others)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[demo-base] %(message)s")
    started, cpu = time.monotonic(), time.process_time()
    for name, path in write_demo_models(args.out, args.steps, args.threads).items():
        print(f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"demo base: {time.monotonic() - started:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
