"""Point an API prompt at the built-in tiny models (for tests and the demo job).

The bundled workflows name real SD3.5 files. Headless runs here swap them for the built-in ones.
TripleCLIPLoader cannot be fed the built-in CLIP-L three times: with three files ComfyUI always
builds CLIP-G and T5-XXL too (10 GB of uninitialised weights, NaN conditioning). It is replaced
by CLIPLoader(type=sd3) on the built-in CLIP-L, which gives the same CLIP output socket.
"""

from __future__ import annotations

from typing import Any

from . import paths
from .workflow_api import set_inputs


def point_at_builtin_models(
    prompt: dict[str, Any], size: int | None = None, sd35: bool = False, demo: bool = False
) -> dict[str, Any]:
    """Swap every model picker of ``prompt`` for a built-in model (in place; also returned).

    ``demo``: the pretrained demo base (``tools/demo_base.py``) and its VAE ``taesd3``, which draw
    pictures; otherwise the random tiny SD3 (or SD3.5 with ``sd35``) models, which only have shapes.
    """
    if demo:
        from .demo_samples import require_demo_models

        require_demo_models()
    ckpt = paths.DEMO_CHECKPOINT if demo else paths.SD35_CHECKPOINT if sd35 else paths.SD3_CHECKPOINT
    for node in prompt.values():
        if node["class_type"] in ("TripleCLIPLoader", "DualCLIPLoader"):
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": paths.CLIP_L, "type": "sd3"}
    set_inputs(prompt, "CheckpointLoaderSimple", ckpt_name=ckpt)
    set_inputs(prompt, "CLIPLoader", clip_name=paths.CLIP_L, type="sd3")
    set_inputs(prompt, "VAELoader", vae_name=paths.DEMO_VAE if demo else paths.SD3_VAE)
    if size:
        set_inputs(prompt, "EmptySD3LatentImage", width=size, height=size)
    for node in prompt.values():
        if node["class_type"].startswith("SD35Tuner") and "base_model" in node["inputs"]:
            node["inputs"]["base_model"] = ckpt
    return prompt
