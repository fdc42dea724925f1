"""A cheap numeric sanity check of loaded weights: a mis-read file shows up as absurd magnitudes.

A trained (or sensibly initialised) SD3 Linear weight has an RMS around 0.005-0.5. An fp8 weight whose
per-tensor scale was dropped sits at ~50-100 (values spread up to the fp8 maximum, 448); a scale
applied twice lands near 1e-6. Checking the RMS of a contiguous sample of each weight (so a memory-
mapped tensor stays mostly untouched) catches both, and NaN/inf, before hours are spent training.
"""

from __future__ import annotations

import torch

RMS_BAND = (1e-5, 10.0)
SAMPLE = 1 << 16


def weight_problem(name: str, weight: torch.Tensor) -> str | None:
    """A sentence saying what is wrong with this Linear weight, or None when it looks sane."""
    sample = weight.detach().reshape(-1)[:SAMPLE].float()
    if not torch.isfinite(sample).all():
        return f"{name} contains NaN or inf"
    rms = float(sample.square().mean().sqrt())
    lo, hi = RMS_BAND
    if not lo <= rms <= hi:
        return f"{name} has RMS {rms:.3g}, outside the sane band {lo:g}..{hi:g}"
    return None


def explain(file: str, problems: list[str]) -> str:
    return (
        f"{file} loaded to implausible weights ({problems[0]}; {len(problems)} layer(s) affected). The file "
        "may be quantised in a way that was not recognised (e.g. fp8 without its scales) or damaged; "
        "training on it would be wasted"
    )
