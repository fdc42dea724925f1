"""When and how strongly APG acts: a σ window and a resolution-independent norm threshold.

Neither is in the paper. The window lets APG act only over part of a run (plain CFG elsewhere), which
users of σ-scheduled guiders ask for. The threshold scaling exists because the paper's ``r`` bounds an
un-normalised L2 norm over C×H×W: r = 15 was tuned for SDXL latents (4×128×128 at 1024²), so the same
r is a different per-element bound for SD3's 16-channel latents or another resolution. Scaling r by
√(elements / reference elements) keeps the per-element bound fixed, so one r works across both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "REFERENCE_ELEMENTS",
    "THRESHOLD_MODES",
    "WINDOW_UNITS",
    "GuidanceWindow",
    "scaled_norm_threshold",
    "step_progress",
]

REFERENCE_ELEMENTS = 4 * 128 * 128
"""Latent elements per sample of SDXL at 1024², the setting the paper's r = 15 was tuned on."""

WINDOW_UNITS = ("steps", "sigma")
THRESHOLD_MODES = ("absolute", "scaled")


def scaled_norm_threshold(norm_threshold: float, elements: int, reference_elements: int = REFERENCE_ELEMENTS) -> float:
    """``r · √(elements / reference_elements)``: the threshold for a sample of ``elements`` latent values."""
    if elements <= 0 or reference_elements <= 0:
        raise ValueError(f"element counts must be positive, got {elements} and {reference_elements}")
    return norm_threshold * math.sqrt(elements / reference_elements)


def step_progress(sigma: float, sample_sigmas: Sequence[float]) -> float:
    """Fraction of the run done when the model is evaluated at ``sigma``: step index / number of steps.

    The step is the schedule entry nearest to ``sigma``, so a sampler's intermediate evaluations count
    with the step they belong to. A schedule of one step (or none) reports 0.
    """
    steps = len(sample_sigmas) - 1
    if steps <= 0:
        return 0.0
    index = min(range(steps), key=lambda i: abs(float(sample_sigmas[i]) - sigma))
    return index / steps


@dataclass(frozen=True)
class GuidanceWindow:
    """The part of a sampling run where APG acts, as progress fractions: 0 = first step, 1 = the end.

    ``unit="steps"``: progress is the step index over the number of steps of the run.
    ``unit="sigma"``: the bounds are mapped to σ through the model's own schedule (ComfyUI's
    ``percent_to_sigma``, as in KSamplerAdvanced-style start/end percents), and APG acts while
    ``σ(end) < σ ≤ σ(start)``. The default (0, 1) covers the whole run.
    """

    start: float = 0.0
    end: float = 1.0
    unit: str = "steps"

    def __post_init__(self) -> None:
        if self.unit not in WINDOW_UNITS:
            raise ValueError(f"window unit must be one of {WINDOW_UNITS}, got {self.unit!r}")
        for name, value in (("window_start", self.start), ("window_end", self.end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1 (a fraction of the run), got {value}")
        if self.start > self.end:
            raise ValueError(
                f"window_start ({self.start}) is after window_end ({self.end}): APG would never act. "
                "Set window_start <= window_end (0 and 1 cover the whole run)."
            )

    @property
    def whole_run(self) -> bool:
        return self.start <= 0.0 and self.end >= 1.0

    def active(
        self,
        sigma: float,
        sample_sigmas: Sequence[float] | None = None,
        percent_to_sigma: Callable[[float], float] | None = None,
    ) -> bool:
        """Whether APG acts at ``sigma``; without the run's schedule (or σ map) the window cannot be placed and APG acts."""
        if self.whole_run:
            return True
        if self.unit == "steps":
            if sample_sigmas is None:
                return True
            progress = step_progress(sigma, sample_sigmas)
            return self.start <= progress and (progress < self.end or self.end >= 1.0)
        if percent_to_sigma is None:
            return True
        upper = float(percent_to_sigma(self.start))
        lower = float(percent_to_sigma(self.end))
        return lower < sigma <= upper * (1.0 + 1e-5) + 1e-7
