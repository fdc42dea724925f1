"""Keep user-typed paths inside the folder they are meant for (ComfyUI's input or output)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath


def resolve_inside(base: str | os.PathLike[str], user_path: str, what: str = "path") -> Path:
    """``base / user_path`` resolved, or ValueError if it is absolute, uses ``..`` or a link that
    leaves ``base``. An empty ``user_path`` means ``base`` itself."""
    base = Path(base).resolve()
    text = user_path.strip()
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute() or PureWindowsPath(text).drive:
        raise ValueError(f"{what} '{user_path}' must be relative to {base}, not absolute")
    parts = PureWindowsPath(text).parts  # splits on both / and \
    if ".." in parts:
        raise ValueError(f"{what} '{user_path}' may not contain '..': it must stay inside {base}")
    resolved = (base / Path(*parts)).resolve() if parts else base
    if resolved != base and base not in resolved.parents:
        raise ValueError(f"{what} '{user_path}' resolves to {resolved}, outside {base}")
    return resolved


def is_inside(path: str | os.PathLike[str], bases: list[str | os.PathLike[str]]) -> bool:
    """Whether ``path`` (resolved) lies inside one of ``bases`` (resolved)."""
    p = Path(path).resolve()
    for base in bases:
        b = Path(base).resolve()
        if p == b or b in p.parents:
            return True
    return False
