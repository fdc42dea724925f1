"""Use ComfyUI's modules as a library outside its server (model building, benchmarks).

ComfyUI parses its command line when ``comfy.cli_args`` is first imported, and model management then
looks for CUDA unless ``--cpu`` was given. ``import_comfy()`` puts the ComfyUI source on ``sys.path``
and lets that first parse see ``--cpu`` (whatever this process's own arguments are).
"""

from __future__ import annotations

import sys

from . import paths


def import_comfy(*options: str) -> None:
    """Make ``import comfy.*`` work in this process, on the CPU, with ComfyUI's command-line ``options``
    (e.g. ``--bf16-unet``) as the first import parses them. Idempotent."""
    if str(paths.COMFYUI) not in sys.path:
        sys.path.insert(0, str(paths.COMFYUI))
    if "comfy.cli_args" in sys.modules:
        return
    argv, sys.argv = sys.argv, [sys.argv[0], "--cpu", *options]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = argv
