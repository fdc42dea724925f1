"""The cache node: a dataset manifest + the graph's VAE and CLIP -> an on-disk latent/text cache.

Thin: the format, keys, incremental logic and loader are ``training.cache``. Here ComfyUI's VAE and
CLIP become plain encode callables with identities, the cache name becomes a folder confined to
ComfyUI's output or temp directory, and progress/Cancel/model freeing go through ComfyUI.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ._progress import progress_callback
from ._types import CATEGORY, Cache, Dataset

if TYPE_CHECKING:
    from ..training.cache import LatentEncoder, TextEncoder

# The library is imported inside the functions: the pack's import time at ComfyUI start stays small.
LOCATIONS = ("output", "temp")


def cache_dir(cache_name: str, location: str) -> Path:
    from ..training.fs import resolve_inside

    base = folder_paths.get_temp_directory() if location == "temp" else folder_paths.get_output_directory()
    folder = resolve_inside(base, cache_name, "cache_name")
    if folder == Path(base).resolve():
        raise ValueError(f"cache_name '{cache_name}' names no sub-folder: give one such as 'sd35_cache/my_dataset'")
    return folder


def vae_encoder(vae, tile_above: int) -> LatentEncoder:
    """ComfyUI VAE -> LatentEncoder. Identity: its weights (sampled), dtype and class; tiling is part of the key."""
    from ..training.cache import LatentEncoder, state_dict_identity

    if vae is None:
        raise ValueError("vae is missing: connect a VAE (VAELoader, or the VAE output of an SD3/SD3.5 checkpoint)")
    vae.throw_exception_if_invalid()
    identity = state_dict_identity(vae.get_sd(), str(vae.vae_dtype), type(vae.first_stage_model).__name__)
    tile = max(64, min(512, tile_above))

    def tiled(bucket: tuple[int, int]) -> bool:
        return tile_above > 0 and max(bucket) > tile_above

    def encode(pixels, bucket):
        if tiled(bucket):
            return vae.encode_tiled(pixels, tile_x=tile, tile_y=tile, overlap=tile // 8)
        return vae.encode(pixels)

    return LatentEncoder(
        identity=identity,
        encode=encode,
        channels=vae.latent_channels if vae.latent_dim == 2 else -1,
        variant=lambda bucket: f"tiled{tile}" if tiled(bucket) else "full",
        name="The connected VAE",
    )


def clip_encoder(clip) -> TextEncoder:
    """ComfyUI CLIP -> TextEncoder: tokenize, keep one chunk of at most 77 tokens per encoder, encode_from_tokens.

    Identity: the text-encoder weights (sampled), class, clip-skip layer, tokenizer options and any
    LoRA patches applied to the CLIP.
    """
    from ..training.cache import TextEncoder, TextEncoding, state_dict_identity, tensor_identity, truncate_tokens
    from ..training.cache.sd3 import MAX_TOKENS

    if clip is None:
        raise ValueError("clip is missing: the checkpoint has no text encoders; load them with TripleCLIPLoader")
    model = clip.cond_stage_model
    identity = state_dict_identity(
        model.state_dict(),
        type(model).__name__,
        clip.layer_idx,
        sorted(clip.tokenizer_options.items()),
        tensor_identity(clip.patcher.patches),
    )

    def encode(text: str) -> TextEncoding:
        tokens, cut = truncate_tokens(clip.tokenize(text), MAX_TOKENS)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return TextEncoding(cond, pooled, cut)

    return TextEncoder(identity=identity, encode=encode, name="The connected CLIP")


def free_models(*patchers) -> None:
    """Unload these models (and their clones) through ComfyUI's public model-management calls."""
    mm = comfy.model_management
    unload = getattr(mm, "unload_model_and_clones", None)  # newer ComfyUI; 0.3.x can only unload everything
    if unload is None:
        mm.unload_all_models()
    else:
        for patcher in patchers:
            unload(patcher)
    mm.soft_empty_cache()


class SD35TunerCacheLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SD35TunerCacheLatents",
            display_name="Cache Latents + Text Embeddings",
            category=f"{CATEGORY}/training",
            is_output_node=True,  # caching is worth running on its own, before any trainer is wired
            description="Encodes every dataset image with the VAE and every caption with the CLIP once, into "
            "safetensors shards on disk that the trainer reads. Re-running encodes only what changed: an edited "
            "caption re-encodes one text, a different VAE re-encodes the latents but no text.",
            inputs=[
                Dataset.Input("dataset", tooltip="The dataset manifest (cropped and bucketed images + captions)."),
                io.Vae.Input("vae", tooltip="An SD3/SD3.5 VAE (16 latent channels), e.g. the checkpoint's VAE."),
                io.Clip.Input(
                    "clip", tooltip="SD3 text encoders: TripleCLIPLoader (with or without T5) or a checkpoint's CLIP."
                ),
                io.String.Input(
                    "cache_name",
                    default="sd35_cache/my_dataset",
                    tooltip="Folder of the cache, relative to ComfyUI's output (or temp) directory. Default "
                    "'sd35_cache/my_dataset'. Re-using a name updates that cache incrementally.",
                ),
                io.Combo.Input(  # checked in validate_inputs, with the cache name it is the base of
                    "location",
                    options=list(LOCATIONS),
                    default="output",
                    tooltip="Where the cache folder lives. Default 'output' (kept); 'temp' is wiped when ComfyUI "
                    "restarts.",
                ),
                io.Boolean.Input(
                    "random_flip",
                    default=False,
                    tooltip="Also cache a mirrored latent of every image; the trainer picks one at random each "
                    "step. Default off (doubles VAE time and latent disk space when on).",
                ),
                io.Int.Input(
                    "caption_variants",
                    default=0,
                    min=0,
                    max=16,
                    tooltip="Token shuffle: also encode this many re-orderings of each caption's comma-separated "
                    "parts; the trainer picks the caption or one variant at random each step. Default 0 = off "
                    "(captions used as written).",
                ),
                io.Int.Input(
                    "keep_first_parts",
                    default=1,
                    min=0,
                    max=32,
                    tooltip="With caption_variants: how many leading comma-separated parts (e.g. the trigger word) "
                    "never move. Default 1; 0 shuffles every part. Ignored when caption_variants is 0.",
                ),
                io.Int.Input(
                    "tile_above",
                    default=0,
                    min=0,
                    max=8192,
                    step=64,
                    tooltip="Encode buckets wider or taller than this many pixels with tiled VAE encoding (less "
                    "memory, slightly different latents). Default 0 = never tile.",
                ),
                io.Int.Input(
                    "batch_size",
                    default=4,
                    min=1,
                    max=64,
                    tooltip="Images per VAE encode call. Default 4; lower it if the VAE runs out of memory.",
                ),
            ],
            outputs=[
                Cache.Output(
                    display_name="cache", tooltip="The cache, for the trainer's cache (or class_cache) input."
                ),
                io.String.Output(
                    display_name="summary",
                    tooltip="Items, buckets, what was encoded vs reused, truncated captions, repairs (also shown in "
                    "this node).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, cache_name: str | None, location: str | None) -> bool | str:
        if location is not None and location not in LOCATIONS:
            return f"location must be one of {list(LOCATIONS)}, got {location!r}"
        try:
            _ = cache_name is None or cache_dir(cache_name, location or "output")
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def fingerprint_inputs(cls, cache_name: str, location: str, **_) -> str:
        from ..training.cache import cache_fingerprint

        try:
            return cache_fingerprint(cache_dir(cache_name, location))
        except (ValueError, OSError) as err:
            return f"unavailable: {err}"

    @classmethod
    def execute(
        cls,
        dataset,
        vae,
        clip,
        cache_name,
        location,
        random_flip,
        caption_variants,
        keep_first_parts,
        tile_above,
        batch_size,
    ) -> io.NodeOutput:
        from ..dataset.images import render_item
        from ..training.cache import CacheReader, build_cache

        folder = cache_dir(cache_name, location)
        latent, text = vae_encoder(vae, tile_above), clip_encoder(clip)
        progress = progress_callback()
        try:
            report = build_cache(
                dataset,
                folder,
                latent,
                text,
                flip=random_flip,
                batch_size=batch_size,
                shuffle_variants=caption_variants,
                keep_first=keep_first_parts,
                render=render_item,
                progress=progress,  # also where Cancel lands
            )
        finally:
            free_models(vae.patcher, clip.patcher)
        summary = report.summary()
        return io.NodeOutput(CacheReader(folder), summary, ui=ui.PreviewText(summary))
