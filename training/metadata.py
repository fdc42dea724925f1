"""The LoRA file's header: our ``sd35_tuner.*`` keys next to the keys the ecosystem reads.

Model browsers (ComfyUI-Manager's model views, Civitai, Forge/A1111) read Stability's ModelSpec
(``modelspec.*``); LoRA inspectors and kohya-based tools read kohya's ``ss_*`` training keys. Both
are written the way kohya sd-scripts writes them for SD3-family LoRAs (``library/sai_model_spec.py``,
``train_network.py``, ``sd3_train_network.py``), so a reader written against those files finds ours.
Every value is a string (safetensors headers hold strings only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from . import fs
from .model import LoraSpec

PACK_VERSION = "0.1.0"
MODELSPEC_VERSION = "1.0.1"  # the ModelSpec version kohya writes
# kohya's SD3 model types (sd3_utils.analyze_state_dict_state), appended to "stable-diffusion-3-"
SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE = "medium", "5-medium", "5-large"
SD3_FAMILY = {SD3_MEDIUM: "SD3 Medium", SD35_MEDIUM: "SD3.5 Medium", SD35_LARGE: "SD3.5 Large"}
# header() reads these from ``info`` instead of writing them under sd35_tuner.*
INPUT_ONLY = ("captions", "buckets", "dataset_name", "date", "title")


def sd3_variant(config: Any) -> str:
    """kohya's id of an SD3-family transformer: qk-norm marks SD3.5, dual-attention layers SD3.5 Medium."""
    if not getattr(config, "qk_norm", None):
        return SD3_MEDIUM
    return SD35_MEDIUM if getattr(config, "dual_attention_layers", ()) else SD35_LARGE


def base_model_hashes(path: Any) -> dict[str, str]:
    """The base file's hashes as A1111 and kohya name them: the legacy 8-hex hash and the full SHA-256.

    The full hash reads the whole file (seconds for a 16 GB SD3.5 Large), once per training run. A base
    that is no single file (a diffusers folder, a MODEL already in memory) gets none.
    """
    if not isinstance(path, str | os.PathLike) or not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        f.seek(0x100000)
        legacy = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    return {"base_model_hash": legacy, "base_model_sha256": fs.file_sha256(path)}


def dataset_facts(source: Any) -> dict[str, Any]:
    """Captions and pixel buckets of a training source: a cache (``CacheReader``) or an in-memory one."""
    items = getattr(source, "items", None)
    if items is not None:
        buckets = dict((getattr(source, "meta", None) or {}).get("buckets") or {})
        name = getattr(getattr(source, "dir", None), "name", "dataset")
        return {"captions": [e["caption"] for e in items], "buckets": buckets, "dataset_name": name}
    shapes = Counter(f"{t.shape[-1] * 8}x{t.shape[-2] * 8}" for t in getattr(source, "latents", ()))
    return {"captions": list(getattr(source, "captions", ())), "buckets": dict(shapes), "dataset_name": "dataset"}


def trigger_phrase(captions: Sequence[str]) -> str | None:
    """The leading comma-separated phrase every caption starts with (the Caption node's trigger), if any."""
    leads = {c.split(",", 1)[0].strip() for c in captions}
    if len(leads) != 1 or len(captions) < 2:
        return None
    (lead,) = leads
    return lead if lead and len(lead.split()) <= 6 else None


def tag_frequency(captions: Sequence[str]) -> dict[str, int]:
    """kohya's per-dataset tag counts: each caption's comma-separated parts, stripped."""
    return dict(Counter(tag for c in captions for tag in {t.strip() for t in c.split(",")} if tag))


def _resolution(buckets: Mapping[str, int]) -> tuple[int, int] | None:
    """The bucket most samples trained at, as (width, height) pixels."""
    if not buckets:
        return None
    w, h = re.fullmatch(r"(\d+)x(\d+)", max(buckets, key=lambda b: (buckets[b], b))).groups()
    return int(w), int(h)


def _description(spec: LoraSpec, info: Mapping[str, Any], cfg: Mapping[str, Any], family: str) -> str:
    steps, lr = info.get("steps", cfg.get("steps")), info.get("learning_rate", cfg.get("learning_rate"))
    parts = [
        f"{family} LoRA trained with SD3.5 Tuner {PACK_VERSION} on {info.get('base_model', 'an SD3 base')}",
        f"{steps} steps, batch {cfg.get('batch_size', 1)} x {cfg.get('grad_accum', 1)} accumulated",
        f"learning rate {lr} ({cfg.get('lr_scheduler', 'constant')}, {cfg.get('warmup_steps', 0)} warmup steps, "
        f"{cfg.get('optimizer', 'adamw')}, max grad norm {cfg.get('max_grad_norm')})",
        f"rank {spec.rank}, alpha {spec.alpha} (folded into lora_B), preset {cfg.get('preset', 'custom')}"
        + (f", blocks {cfg['blocks']}" if cfg.get("blocks") else "")
        + (f", frozen {cfg['exclude_blocks']}" if cfg.get("exclude_blocks") else ""),
        f"timesteps {cfg.get('timestep_sampling')}, shift {cfg.get('shift')}, loss weighting "
        f"{cfg.get('loss_weighting')}, caption dropout {cfg.get('caption_dropout')}",
        f"base {cfg.get('base_dtype')}, quantization {cfg.get('quantization')}, seed {info.get('seed', cfg.get('seed'))}",
    ]
    if info.get("dataset_size") is not None:
        parts.append(f"{info['dataset_size']} training samples")
    return "; ".join(parts) + "."


def _epochs(info: Mapping[str, Any], cfg: Mapping[str, Any]) -> int | None:
    size, steps = info.get("dataset_size"), info.get("steps")
    if not size or steps is None:
        return None
    return max(1, math.ceil(int(steps) * cfg.get("batch_size", 1) * cfg.get("grad_accum", 1) / int(size)))


def header(spec: LoraSpec, info: Mapping[str, Any]) -> dict[str, str]:
    """Header metadata: our keys (the LoRA's shape, the run's facts), ModelSpec and kohya's ``ss_*``.

    ``info`` holds the run's facts (``steps``, ``learning_rate``, ``dataset_size``, ``seed``, ``config``,
    ``base_model``, ``model_type`` from :func:`sd3_variant`, the :func:`base_model_hashes`...); the
    :data:`INPUT_ONLY` keys (from :func:`dataset_facts`, ``title``, ``date``) feed the other keys only.
    """
    ours = {k: v for k, v in info.items() if k not in INPUT_ONLY}
    meta = {
        "sd35_tuner.version": PACK_VERSION,
        "sd35_tuner.format": "diffusers-sd3-lora",
        "sd35_tuner.rank": str(spec.rank),
        "sd35_tuner.alpha": str(spec.alpha),
        "sd35_tuner.alpha_folded": "lora_B is scaled by alpha/rank; load with alpha = rank (strength 1.0)",
        "sd35_tuner.targets": json.dumps(list(spec.targets)),
        **{f"sd35_tuner.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in ours.items()},
    }
    return {**meta, **_modelspec(spec, info), **_kohya(spec, info)}


def _modelspec(spec: LoraSpec, info: Mapping[str, Any]) -> dict[str, str]:
    cfg = info.get("config") or {}
    variant = info.get("model_type")
    captions = info.get("captions") or []
    resolution = _resolution(info.get("buckets") or {})
    trigger = trigger_phrase(captions)
    date = info.get("date") or datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"stable-diffusion-3{'-' + variant if variant else ''}/lora",
        "modelspec.implementation": "diffusers",  # kohya's value for SD3 LoRAs; the keys are diffusers' too
        "modelspec.implementation_version": f"sd35-tuner/{PACK_VERSION}",
        "modelspec.title": str(info.get("title") or "LoRA"),
        "modelspec.date": date,
        "modelspec.description": _description(spec, info, cfg, SD3_FAMILY.get(variant, "SD3-family")),
    }
    if resolution:
        out["modelspec.resolution"] = "{}x{}".format(*resolution)
    if trigger:
        out["modelspec.trigger_phrase"] = trigger
        out["modelspec.usage_hint"] = f"Put '{trigger}' in the prompt."
    return out


def _kohya(spec: LoraSpec, info: Mapping[str, Any]) -> dict[str, Any]:
    cfg = info.get("config") or {}
    resolution = _resolution(info.get("buckets") or {})
    epochs = _epochs(info, cfg)
    values: dict[str, Any] = {
        "ss_output_name": info.get("title"),
        "ss_sd_model_name": info.get("base_model"),
        "ss_sd_model_hash": info.get("base_model_hash"),
        "ss_new_sd_model_hash": info.get("base_model_sha256"),
        "ss_base_model_version": info.get("model_type"),
        "ss_network_dim": spec.rank,
        "ss_network_alpha": spec.alpha,
        "ss_network_dropout": cfg.get("lora_dropout"),
        "ss_learning_rate": info.get("learning_rate", cfg.get("learning_rate")),
        "ss_unet_lr": info.get("learning_rate", cfg.get("learning_rate")),
        "ss_max_train_steps": cfg.get("steps", info.get("steps")),
        "ss_steps": info.get("steps"),
        "ss_num_epochs": epochs,
        "ss_epoch": epochs,
        "ss_num_train_images": info.get("dataset_size"),
        "ss_batch_size_per_device": cfg.get("batch_size"),
        "ss_gradient_accumulation_steps": cfg.get("grad_accum"),
        "ss_total_batch_size": cfg["batch_size"] * cfg.get("grad_accum", 1) if "batch_size" in cfg else None,
        "ss_resolution": resolution,
        "ss_optimizer": cfg.get("optimizer"),
        "ss_lr_scheduler": cfg.get("lr_scheduler"),
        "ss_lr_warmup_steps": cfg.get("warmup_steps"),
        "ss_max_grad_norm": cfg.get("max_grad_norm"),
        "ss_caption_dropout_rate": cfg.get("caption_dropout"),
        "ss_prior_loss_weight": cfg.get("prior_loss_weight"),
        "ss_gradient_checkpointing": cfg.get("gradient_checkpointing"),
        "ss_mixed_precision": cfg.get("base_dtype"),
        "ss_seed": info.get("seed", cfg.get("seed")),
        "ss_weighting_scheme": cfg.get("timestep_sampling"),
        "ss_logit_mean": cfg.get("logit_mean"),
        "ss_logit_std": cfg.get("logit_std"),
        "ss_mode_scale": cfg.get("mode_scale"),
        "ss_training_comment": f"SD3.5 Tuner {PACK_VERSION}",
    }
    captions = info.get("captions") or []
    if captions:
        values["ss_tag_frequency"] = json.dumps({info.get("dataset_name", "dataset"): tag_frequency(captions)})
    return {k: str(v) for k, v in values.items() if v is not None}  # kohya writes str() of each value
