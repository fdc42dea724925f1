"""ComfyUI-facing node classes. Each module here lists its nodes in a module-level ``NODES``.

Modules are discovered, so a feature adds its node module without editing this file. A module
whose optional dependency is missing is skipped with a logged reason instead of breaking the pack.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

from comfy_api.latest import ComfyExtension, io

logger = logging.getLogger(__name__)


def discover_nodes() -> list[type[io.ComfyNode]]:
    found: list[type[io.ComfyNode]] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{__name__}.{info.name}")
        except ImportError:
            logger.warning("SD3.5 Tuner: node module %s not loaded", info.name, exc_info=True)
            continue
        found.extend(getattr(module, "NODES", ()))
    return found


class SD35TunerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return discover_nodes()
