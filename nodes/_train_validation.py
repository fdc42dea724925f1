"""The trainer's validation input group: prompts, cadence, sampler steps, guidance scale and the APG settings of
the validation samples, plus the text encoding of the prompts.

The prompts are typed on the trainer and encoded there with the CLIP the cache was built with (the trainer's
``clip`` input, checked against the cache's text-encoder identity), so they get exactly the embeddings the
training captions got, and editing them never re-runs the cache node. APG defaults are the APG node's
(``apg.patch.APGSettings``: η 0, r 15 scaled to the latent size, β −0.5).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ._validation import range_problems

PROMPTS_HELP = (
    "One prompt per line, sampled during training with CFG and with APG at the same seed (needs the clip and vae "
    "inputs). Start with the trigger word to see the LoRA take hold. Empty (default): no validation samples."
)


def validation_inputs() -> list[io.Input]:
    from ..apg.settings import MOMENTUM_LIMIT, MOMENTUM_REASON, APGSettings

    apg = APGSettings()
    return [
        io.String.Input(
            "validation_prompts",
            default="",
            multiline=True,
            placeholder="one prompt per line, e.g.\nk4s4, a portrait photo of a person in a park",
            tooltip=PROMPTS_HELP,
        ),
        io.Int.Input(
            "validation_every",
            default=0,
            min=0,
            max=100_000,
            tooltip="Sample the validation prompts every N steps; each grid appears in this node as it is made. "
            "Default 0 = once, at the end.",
        ),
        io.Int.Input(
            "validation_steps", default=20, min=1, max=200, tooltip="Sampler steps per validation image. Default 20."
        ),
        io.Float.Input(
            "validation_cfg",
            default=4.0,
            min=1.0,
            max=30.0,
            step=0.1,
            tooltip="Guidance scale w of the validation samples, CFG row and APG row alike. Default 4.0; 1.0 = "
            "unguided.",
        ),
        io.Float.Input(
            "apg_eta",
            default=apg.eta,
            min=-10.0,
            max=10.0,
            step=0.01,
            tooltip=f"APG row: weight of the guidance part parallel to the prediction (the part that "
            f"oversaturates). Default {apg.eta:g}, as the APG node.",
        ),
        io.Float.Input(
            "apg_norm_threshold",
            default=apg.norm_threshold,
            min=0.0,
            max=1000.0,
            step=0.1,
            tooltip=f"APG row: clamp of the guidance update's norm, scaled to the latent size as the APG node's "
            f"'scaled' mode does. Default {apg.norm_threshold:g}, as the APG node; 0 disables the clamp.",
        ),
        io.Float.Input(
            "apg_momentum",
            default=apg.momentum,
            min=-MOMENTUM_LIMIT,
            max=MOMENTUM_LIMIT,
            step=0.01,
            tooltip=f"APG row: momentum beta across sampler steps (negative = the paper's reverse momentum), reset "
            f"for every validation. Default {apg.momentum:g}, as the APG node. {MOMENTUM_REASON}",
        ),
    ]


VALIDATION_FIELDS = (
    "validation_every",
    "validation_steps",
    "validation_cfg",
    "apg_eta",
    "apg_norm_threshold",
    "apg_momentum",
)


def split_prompts(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def encode_prompts(clip, cache, prompts: list[str]) -> list[tuple]:
    """(prompt, cond, pooled) per prompt, encoded like the cache's captions; refuses a CLIP other than the cache's."""
    from .cache import clip_encoder

    if not prompts:
        return []
    if clip is None:
        raise ValueError(
            "validation_prompts need the trainer's clip input: connect the CLIP the cache was built with (or clear "
            "the prompts)"
        )
    encoder = clip_encoder(clip)
    if encoder.identity != cache.index.get("text_encoder_id"):
        raise ValueError(
            "clip: this is not the CLIP the cache was built with, so its prompt embeddings would not match the "
            "training captions; connect the same CLIP as the cache node's"
        )
    encoded = {p: encoder.encode(p) for p in prompts}
    with torch.inference_mode(False):  # ComfyUI encodes under inference mode; the trainer's tensors are plain ones
        return [(p, e.cond.float().cpu().clone(), e.pooled.float().cpu().clone()) for p, e in encoded.items()]


def guidance_problems(node: type[io.ComfyNode], validation_cfg: float, **apg: float) -> dict[str, str]:
    """The widgets' ranges, then ``apg.settings``' checks of the scale and the ``apg_*`` settings."""
    from ..apg.settings import check_apg, check_scale

    problems = range_problems(node, validation_cfg=validation_cfg, **apg)
    found = {f"apg_{k}": v for k, v in check_apg(**{k.removeprefix("apg_"): v for k, v in apg.items()}).items()}
    found["validation_cfg"] = check_scale(validation_cfg, "validation_cfg")
    return problems | {name: text for name, text in found.items() if text and name not in problems}


def row_labels(cfg) -> dict[str, str]:
    """Row label per guidance of the validation grid (``cfg``: the run's TrainConfig)."""
    from ..apg.settings import APGSettings

    apg = APGSettings(eta=cfg.apg_eta, norm_threshold=cfg.apg_norm_threshold, momentum=cfg.apg_momentum)
    return {"cfg": f"CFG w={cfg.validation_cfg:g}", "apg": apg.label(cfg.validation_cfg)}
