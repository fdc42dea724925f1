"""The built-in tiny models: deterministic, randomly initialised, real architectures, never downloaded.

Written into a ComfyUI models layout (``checkpoints/``, ``vae/``, ``text_encoders/``) so the real
loaders (CheckpointLoaderSimple, VAELoader, CLIPLoader, TripleCLIPLoader) accept them:

- ``checkpoints/sd3_tiny.safetensors``: an SD3 MMDiT (2 joint blocks, hidden 128) in Stability's
  original key layout under ``model.diffusion_model.``, plus a full-size random SD3 VAE under
  ``first_stage_model.``. ComfyUI infers hidden = 64 x depth, so heads == layers and head dim 64.
- ``checkpoints/sd35_tiny.safetensors``: the SD3.5 variant (qk RMS-norm, dual attention in block 0).
- ``vae/sd3_vae_random.safetensors``: the same VAE on its own.
- ``vae_approx/taesd3_encoder.safetensors`` + ``taesd3_decoder.safetensors``: the demo VAE, a TAESD3
  with constructed weights whose round trip keeps the picture (``tools/demo_vae.py``); VAELoader
  lists the pair as ``taesd3``.
- ``text_encoders/clip_l_random.safetensors``: a full-size random CLIP-L. Alone, through
  ``CLIPLoader(type=sd3)``, it loads as SD3 CLIP (cond [B, 77, 4096] zero padded, pooled [B, 2048]).
  CLIP-G and T5-XXL are too large to generate here, and it must never go into TripleCLIPLoader (with
  three files ComfyUI builds CLIP-G and T5-XXL anyway: see ``tools/builtin.py``).

Run: ``python -m tools.tiny_models --out DIR``. Same seed, same bytes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from training.cache.sd3 import SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR
from training.fs import atomic_save_safetensors

from . import paths
from .comfy_import import import_comfy
from .demo_vae import decoder_weights, encoder_weights

TEXT_DIM = 4096  # SD3 CLIP cond width (CLIP-L 768 zero-padded to T5's 4096)
POOLED_DIM = 2048  # CLIP-L pooled 768 + CLIP-G pooled 1280 (zeros when G is absent)


def transformer_config(depth: int, sd35: bool) -> dict:
    config = dict(
        sample_size=64,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=depth,
        attention_head_dim=64,
        num_attention_heads=depth,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=64 * depth,
        pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=96,
    )
    if sd35:
        config.update(qk_norm="rms_norm", dual_attention_layers=(0,))
    return config


def build_transformer(depth: int, sd35: bool, seed: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**transformer_config(depth, sd35)).eval()


def diffusers_to_mmdit(state: dict[str, torch.Tensor], depth: int, prefix: str) -> dict[str, torch.Tensor]:
    """Map diffusers SD3 transformer keys to Stability's MMDiT keys, using ComfyUI's own key map."""
    import comfy.utils

    key_map = comfy.utils.mmdit_to_diffusers({"depth": depth}, output_prefix=prefix)
    out: dict[str, torch.Tensor] = {}
    qkv_parts: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, tensor in state.items():
        target = key_map.get(key)
        if target is None:
            if key == "pos_embed.pos_embed":
                target = prefix + "pos_embed"
            else:
                raise KeyError(f"no MMDiT key for diffusers key {key}")
        tensor = tensor.detach().clone()
        if isinstance(target, str):
            out[target] = tensor
        elif target[1] is None:  # (key, None, fn): fn is swap_scale_shift, its own inverse
            out[target[0]] = target[2](tensor)
        else:  # (qkv key, (dim, offset, length)): q, k, v concatenated along dim 0
            qkv_parts.setdefault(target[0], []).append((target[1][1], tensor))
    for key, parts in qkv_parts.items():
        out[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=0)
    return out


def build_vae_ldm(seed: int) -> dict[str, torch.Tensor]:
    """A full-size SD3 VAE (16 latent channels), random, in the original (ldm) key layout."""
    import comfy.diffusers_convert
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=SD3_SCALE_FACTOR,
        shift_factor=SD3_SHIFT_FACTOR,
    )
    state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    return comfy.diffusers_convert.convert_vae_state_dict(state)


def build_clip_l(seed: int) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    model = CLIPTextModelWithProjection(config)
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    atomic_save_safetensors(path, tensors, metadata)


def write_all(out: Path) -> dict[str, Path]:
    import_comfy()
    vae = build_vae_ldm(seed=2)
    written: dict[str, Path] = {}
    for name, depth, sd35, seed in ((paths.SD3_CHECKPOINT, 2, False, 0), (paths.SD35_CHECKPOINT, 2, True, 1)):
        model = build_transformer(depth, sd35, seed)
        mmdit = diffusers_to_mmdit(model.state_dict(), depth, "model.diffusion_model.")
        ckpt = {**mmdit, **{f"first_stage_model.{k}": v for k, v in vae.items()}}
        path = out / "checkpoints" / name
        _save(ckpt, path, {"sd35_tuner": "built-in tiny random model", "family": "sd35" if sd35 else "sd3"})
        written[name] = path
    written[paths.SD3_VAE] = out / "vae" / paths.SD3_VAE
    _save(vae, written[paths.SD3_VAE], {"sd35_tuner": "built-in random SD3 VAE"})
    for name, weights in ((paths.TAESD3_ENCODER, encoder_weights()), (paths.TAESD3_DECODER, decoder_weights())):
        written[name] = out / "vae_approx" / name
        _save(weights, written[name], {"sd35_tuner": "built-in demo VAE: constructed TAESD3 (tools/demo_vae.py)"})
    written[paths.CLIP_L] = out / "text_encoders" / paths.CLIP_L
    _save(build_clip_l(seed=3), written[paths.CLIP_L], {"sd35_tuner": "built-in random CLIP-L"})
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=paths.MODELS)
    args = parser.parse_args()
    for name, path in write_all(args.out).items():
        print(f"{name}: {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
