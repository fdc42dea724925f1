"""APG's settings and the one place they are checked.

Every check names the field and says what is allowed, so nodes can show the message on the right
widget (``check_apg`` returns the problems instead of raising; ``APGSettings`` raises the first).

Momentum is limited to |β| < 1. The running update ``m ← Δ + β·m`` is a first-order filter: for
|β| < 1 it stays below ``max|Δ| / (1 − |β|)`` whatever the clamp, while for |β| > 1 it grows like
|β|ᵗ (at β = −1.5 without the norm clamp a 40-step sample reached |x| ≈ 3.5·10⁵); at |β| = 1 it is a
running sum that grows with the number of steps. The paper's recommended range, −1 < β ≤ 0, is inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .schedule import THRESHOLD_MODES, GuidanceWindow, scaled_norm_threshold

__all__ = [
    "MOMENTUM_LIMIT",
    "MOMENTUM_REASON",
    "APGSettings",
    "check_apg",
    "check_momentum",
    "check_scale",
]

MOMENTUM_LIMIT = 0.99
"""|β| must not exceed this (see the module docstring)."""

MOMENTUM_REASON = (
    "Limited to -0.99...0.99 because with |momentum| >= 1 the running update m <- delta + momentum*m grows "
    "without bound (momentum -1.5 without the norm clamp reaches |x| ~ 3.5e5 in 40 steps), while below 1 "
    "it stays under max|delta| / (1 - |momentum|)."
)
"""The reason, in one sentence, for tooltips."""


def _finite(value: object) -> bool:
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def check_scale(scale: float, name: str = "cfg") -> str | None:
    """The problem with a guidance scale ``w``, or None: it must be a finite number."""
    if not _finite(scale):
        return f"{name} must be a finite number, got {scale!r}"
    return None


def check_momentum(momentum: float) -> str | None:
    """The problem with APG's momentum β, or None: finite and within ±MOMENTUM_LIMIT."""
    if not _finite(momentum):
        return f"APG momentum must be a finite number, got {momentum!r}"
    if abs(momentum) > MOMENTUM_LIMIT:
        return (
            f"APG momentum must be between -{MOMENTUM_LIMIT} and {MOMENTUM_LIMIT}, got {momentum:g}: at |momentum| >= 1 "
            "the running update grows without bound. The paper uses -0.5 to -0.75; 0 disables momentum."
        )
    return None


def check_apg(
    eta: float | None = None,
    norm_threshold: float | None = None,
    momentum: float | None = None,
    threshold_mode: str | None = None,
) -> dict[str, str]:
    """``{field: problem}`` for every given APG setting that is not allowed (empty when all are fine)."""
    problems: dict[str, str] = {}
    if eta is not None and not _finite(eta):
        problems["eta"] = f"APG eta must be a finite number, got {eta!r}"
    if norm_threshold is not None and (not _finite(norm_threshold) or norm_threshold < 0):
        problems["norm_threshold"] = (
            f"APG norm_threshold must be a finite number >= 0 (0 disables the clamp), got {norm_threshold!r}"
        )
    if momentum is not None and (problem := check_momentum(momentum)):
        problems["momentum"] = problem
    if threshold_mode is not None and threshold_mode not in THRESHOLD_MODES:
        problems["threshold_mode"] = f"APG threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}"
    return problems


@dataclass(frozen=True)
class APGSettings:
    """APG's knobs. ``threshold_mode="scaled"`` reads ``norm_threshold`` at the reference latent size
    (see :mod:`apg.schedule`) and rescales it to the actual one."""

    eta: float = 0.0
    norm_threshold: float = 15.0
    threshold_mode: str = "scaled"
    momentum: float = -0.5
    window: GuidanceWindow = field(default_factory=GuidanceWindow)

    def __post_init__(self) -> None:
        problems = check_apg(self.eta, self.norm_threshold, self.momentum, self.threshold_mode)
        if problems:
            raise ValueError("; ".join(problems.values()))

    def threshold_for(self, sample) -> float:
        """The L2 bound for one sample shaped like ``sample`` (a tensor without the batch dim)."""
        if self.threshold_mode == "absolute" or self.norm_threshold == 0:
            return self.norm_threshold
        return scaled_norm_threshold(self.norm_threshold, sample.numel())

    def label(self, scale: float | None = None) -> str:
        """A short description of the settings, for image captions and logs."""
        parts = ["APG"]
        if scale is not None:
            parts.append(f"w={scale:g}")
        r = f"r={self.norm_threshold:g}" + (" (scaled)" if self.threshold_mode == "scaled" else "")
        parts += [f"eta={self.eta:g}", r, f"beta={self.momentum:g}"]
        if not self.window.whole_run:
            parts.append(f"window {self.window.start:g}-{self.window.end:g} ({self.window.unit})")
        return " ".join(parts)
