"""Where the dev/test environment lives (built by scripts/setup_env.sh, outside git).

A *ComfyUI home* is a folder holding ``comfyui/`` (ComfyUI's source) and ``venv/`` (the Python
that runs it), plus an optional ``stubs/`` put on the server's ``PYTHONPATH``. The env home itself
is the home of the oldest ComfyUI we support (0.3.75; its venv also runs pytest and ruff); setup
adds one home per newer ComfyUI, e.g. ``comfyui-0.33.0/``. ``SD35_TUNER_COMFY_HOME`` picks the
home that servers started by the tests and tools use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "example_workflows"  # the bundled workflows (ComfyUI serves them as templates)
HOME = Path(os.environ.get("SD35_TUNER_HOME", Path.home() / ".cache" / "sd35-tuner"))
VENV = HOME / "venv"
MODELS = HOME / "models"
COMFYUI = HOME / "comfyui"  # the ComfyUI the dev venv imports as a library (tools/comfy_import.py)
COMFY_HOME = Path(os.environ.get("SD35_TUNER_COMFY_HOME") or HOME)  # the one servers run

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


def comfyui_version(comfyui: Path = COMFY_HOME / "comfyui") -> tuple[int, ...]:
    """The version of the ComfyUI source at ``comfyui`` (its ``comfyui_version.py``), e.g. (0, 3, 75)."""
    text = (comfyui / "comfyui_version.py").read_text()
    match = re.search(r"""__version__\s*=\s*["']([0-9.]+)""", text)
    if not match:
        raise ValueError(f"{comfyui / 'comfyui_version.py'} names no version")
    return tuple(int(part) for part in match.group(1).split("."))


def comfy_homes() -> list[Path]:
    """Every ComfyUI home setup built, oldest first: the env home, then the newest (see ``newest-comfyui``)."""
    record = HOME / "newest-comfyui"
    newest = record.read_text().strip() if record.is_file() else ""
    return [HOME, *([Path(newest)] if newest else [])]
