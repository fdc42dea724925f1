"""apg.schedule: the σ / step window and the resolution-independent norm threshold."""

from __future__ import annotations

import math

import pytest

from apg.schedule import REFERENCE_ELEMENTS, GuidanceWindow, scaled_norm_threshold, step_progress

SIGMAS = [1.0, 0.9, 0.75, 0.5, 0.25, 0.0]  # 5 steps


def test_scaled_threshold_keeps_the_per_element_bound():
    assert scaled_norm_threshold(15.0, REFERENCE_ELEMENTS) == pytest.approx(15.0)
    sd3_1024 = 16 * 128 * 128
    assert scaled_norm_threshold(15.0, sd3_1024) == pytest.approx(30.0)
    assert scaled_norm_threshold(15.0, 16 * 64 * 64) == pytest.approx(15.0)
    for elements in (64, 4096, 16 * 96 * 80):
        assert scaled_norm_threshold(7.0, elements) / math.sqrt(elements) == pytest.approx(
            7.0 / math.sqrt(REFERENCE_ELEMENTS)
        )
    with pytest.raises(ValueError):
        scaled_norm_threshold(1.0, 0)


def test_step_progress_counts_steps_and_rounds_substeps_to_the_nearest():
    assert [step_progress(s, SIGMAS) for s in SIGMAS[:-1]] == [0.0, 0.2, 0.4, 0.6, 0.8]
    assert step_progress(0.52, SIGMAS) == 0.6
    assert step_progress(1.0, [1.0, 0.0]) == 0.0
    assert step_progress(0.3, [0.3]) == 0.0


def test_whole_run_window_is_always_active():
    window = GuidanceWindow()
    assert window.whole_run
    assert all(window.active(s, SIGMAS) for s in SIGMAS[:-1])
    assert window.active(0.5)  # no schedule known: still active


def test_step_window_selects_the_middle_steps():
    window = GuidanceWindow(0.2, 0.6, "steps")
    assert [window.active(s, SIGMAS) for s in SIGMAS[:-1]] == [False, True, True, False, False]
    tail = GuidanceWindow(0.6, 1.0, "steps")
    assert [tail.active(s, SIGMAS) for s in SIGMAS[:-1]] == [False, False, False, True, True]
    empty = GuidanceWindow(0.4, 0.4, "steps")
    assert not any(empty.active(s, SIGMAS) for s in SIGMAS[:-1])


def test_sigma_window_uses_the_model_schedule():
    def percent_to_sigma(p: float) -> float:  # a flow model without shift: σ = 1 - p
        return 1.0 if p <= 0 else 0.0 if p >= 1 else 1.0 - p

    window = GuidanceWindow(0.0, 0.5, "sigma")
    assert [window.active(s, SIGMAS, percent_to_sigma) for s in SIGMAS[:-1]] == [True, True, True, False, False]
    late = GuidanceWindow(0.5, 1.0, "sigma")
    assert [late.active(s, SIGMAS, percent_to_sigma) for s in SIGMAS[:-1]] == [False, False, False, True, True]


@pytest.mark.parametrize(
    ("start", "end", "unit", "match"),
    [
        (0.7, 0.3, "steps", "window_start .* after window_end"),
        (-0.1, 0.5, "steps", "window_start must be between 0 and 1"),
        (0.0, 1.5, "sigma", "window_end must be between 0 and 1"),
        (0.0, 1.0, "percent", "window unit"),
    ],
)
def test_bad_windows_are_refused_with_the_field_name(start, end, unit, match):
    with pytest.raises(ValueError, match=match):
        GuidanceWindow(start, end, unit)
