"""apg.patch: the sampler hook on ComfyUI's argument dict, its no-op paths and per-run momentum."""

from __future__ import annotations

import pytest
import torch

from apg.guidance import apply_apg, cfg
from apg.patch import APGPatch, APGSettings
from apg.schedule import GuidanceWindow, scaled_norm_threshold
from apg.settings import check_apg

SIGMAS = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])


def hook_args(seed: int, scale: float = 5.0, sigma: float = 1.0, uncond: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    cond, unc, x = (torch.randn(1, 16, 8, 8, generator=g) for _ in range(3))
    return {
        "cond_denoised": cond,
        "uncond_denoised": unc if uncond else torch.zeros_like(cond),
        "input": x,
        "cond_scale": scale,
        "sigma": torch.tensor([sigma]),
        "input_uncond": [{"cross_attn": None}] if uncond else None,
        "model_options": {"transformer_options": {"sample_sigmas": SIGMAS}},
    }


def test_hook_returns_x_minus_apg_of_the_denoised_predictions():
    settings = APGSettings(eta=0.0, norm_threshold=2.0, threshold_mode="absolute", momentum=0.0)
    a = hook_args(0)
    got = APGPatch(settings).cfg_function(a)
    expected = a["input"] - apply_apg(a["cond_denoised"], a["uncond_denoised"], 5.0, eta=0.0, norm_threshold=2.0)
    assert torch.allclose(got, expected, atol=1e-6)


def test_scaled_threshold_uses_the_sample_size():
    settings = APGSettings(eta=0.0, norm_threshold=15.0, threshold_mode="scaled", momentum=0.0)
    a = hook_args(1)
    r = scaled_norm_threshold(15.0, 16 * 8 * 8)
    expected = a["input"] - apply_apg(a["cond_denoised"], a["uncond_denoised"], 5.0, norm_threshold=r)
    assert torch.allclose(APGPatch(settings).cfg_function(a), expected, atol=1e-6)


def test_unconditional_free_and_low_scale_are_plain_sampling(caplog):
    patch = APGPatch(APGSettings())
    a = hook_args(2, scale=1.0, uncond=False)  # cfg = 1: ComfyUI skipped the negative pass
    assert torch.equal(patch.guided(a), a["cond_denoised"])
    b = hook_args(3, scale=0.5)
    with caplog.at_level("WARNING"):
        assert torch.equal(patch.guided(b), cfg(b["cond_denoised"], b["uncond_denoised"], 0.5))
        patch.guided(b)
    assert sum("cfg=0.5" in r.message for r in caplog.records) == 1  # once per run
    assert patch.state.running is None  # no momentum was accumulated


def test_window_gives_plain_cfg_outside_and_keeps_momentum_for_inside():
    settings = APGSettings(momentum=-0.5, window=GuidanceWindow(0.5, 1.0, "steps"))
    patch = APGPatch(settings)
    early = hook_args(4, sigma=0.75)
    assert torch.equal(patch.guided(early), cfg(early["cond_denoised"], early["uncond_denoised"], 5.0))
    assert patch.state.running is None
    late = hook_args(5, sigma=0.5)
    assert not torch.allclose(patch.guided(late), cfg(late["cond_denoised"], late["uncond_denoised"], 5.0))
    assert patch.state.running is not None


def test_outer_sample_wrapper_resets_momentum_before_and_after_each_run_even_when_cancelled():
    patch = APGPatch(APGSettings(momentum=-0.5))
    first = hook_args(6)

    def sampling(args: dict) -> torch.Tensor:
        patch.cfg_function(hook_args(7))
        return patch.cfg_function(args)

    fresh = patch.outer_sample_wrapper(sampling, first)
    assert patch.state.running is None

    def cancelled() -> None:
        patch.cfg_function(hook_args(8))
        raise KeyboardInterrupt("cancelled by the user")

    with pytest.raises(KeyboardInterrupt):
        patch.outer_sample_wrapper(cancelled)
    assert patch.state.running is None
    patch.cfg_function(hook_args(9))  # stale state from a run that bypassed the wrapper...
    assert torch.equal(patch.outer_sample_wrapper(sampling, first), fresh)  # ...is gone at the next run


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("norm_threshold", {"norm_threshold": -1.0}),
        ("threshold_mode", {"threshold_mode": "relative"}),
        ("eta", {"eta": float("inf")}),
        ("momentum", {"momentum": float("nan")}),
        ("momentum", {"momentum": -1.5}),
    ],
)
def test_bad_settings_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        APGSettings(**kwargs)
    assert set(check_apg(**{k: v for k, v in kwargs.items()})) == {field}


def test_check_apg_lists_every_problem_and_nothing_for_good_settings():
    assert check_apg(eta=0.0, norm_threshold=15.0, momentum=-0.5, threshold_mode="scaled") == {}
    problems = check_apg(eta=float("nan"), norm_threshold=-1.0, momentum=1.0, threshold_mode="x")
    assert set(problems) == {"eta", "norm_threshold", "momentum", "threshold_mode"}


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cfg_is_refused_not_sampled(scale):
    with pytest.raises(ValueError, match="cfg must be a finite number"):
        APGPatch(APGSettings()).guided(hook_args(10, scale=scale))


def test_label_carries_the_settings():
    label = APGSettings(window=GuidanceWindow(0.2, 0.8, "sigma")).label(7.0)
    assert label == "APG w=7 eta=0 r=15 (scaled) beta=-0.5 window 0.2-0.8 (sigma)"


def test_model_option_copies_share_the_patch_so_the_run_reset_reaches_them():
    import copy

    patch = APGPatch(APGSettings())
    options = {"sampler_cfg_function": patch.cfg_function, "transformer_options": {}}
    cloned = copy.deepcopy(options)  # what ModelPatcher.clone() does to model_options
    assert cloned["sampler_cfg_function"].__self__ is patch
    assert copy.copy(patch) is patch
