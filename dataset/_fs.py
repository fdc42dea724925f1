"""The pack's file-system helpers (``training/fs.py``: atomic writes, confinement, hashing) for ``dataset``.

Inside ComfyUI the pack is one package and the relative import works; as top-level packages (pytest,
``python -m training``) the absolute one does.
"""

try:
    from ..training import fs
except ImportError:
    from training import fs

__all__ = ["fs"]
