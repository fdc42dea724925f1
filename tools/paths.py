"""Where the dev/test environment lives (built by scripts/setup_env.sh, outside git)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "example_workflows"  # the bundled workflows (ComfyUI serves them as templates)
HOME = Path(os.environ.get("SD35_TUNER_HOME", Path.home() / ".cache" / "sd35-tuner"))
VENV = HOME / "venv"
COMFYUI = HOME / "comfyui"
MODELS = HOME / "models"

# File names of the built-in tiny models, relative to their ComfyUI model folder.
SD3_CHECKPOINT = "sd3_tiny.safetensors"  # checkpoints/: MMDiT (2 blocks) + full-size random SD3 VAE
SD35_CHECKPOINT = "sd35_tiny.safetensors"  # checkpoints/: SD3.5-style MMDiT (qk rms-norm, dual attention)
SD3_VAE = "sd3_vae_random.safetensors"  # vae/
CLIP_L = "clip_l_random.safetensors"  # text_encoders/
# The demo world (tools/demo_vae.py, tools/demo_base.py): a constructed TAESD3 and a pretrained base.
TAESD3_ENCODER = "taesd3_encoder.safetensors"  # vae_approx/
TAESD3_DECODER = "taesd3_decoder.safetensors"  # vae_approx/ (VAELoader lists the pair as "taesd3")
DEMO_VAE = "taesd3"
DEMO_CHECKPOINT = "sd35_demo.safetensors"  # checkpoints/: pretrained tiny SD3.5 + the demo VAE inside
