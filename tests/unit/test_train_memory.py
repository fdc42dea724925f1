"""The memory pre-flight: estimates from the config alone, warnings before loading, VRAM tiers."""

from __future__ import annotations

import torch

from bench.bench_scale import config
from training.memory import GiB, estimate, preflight, vram_tier

LARGE = config("large")


def test_bf16_large_warns_on_a_24_gb_card_and_int8_fits():
    level, message = preflight(estimate(LARGE, 1024, rank=16, base_dtype="bf16", validation=True), 24 * GiB)
    assert level in ("warn", "stop") and "quantization int8" in message
    level, _ = preflight(estimate(LARGE, 1024, rank=16, quantization="int8", validation=True), 24 * GiB)
    assert level == "ok"
    assert preflight(estimate(LARGE, 1024, rank=64), 8 * GiB)[0] == "stop"


def test_each_memory_option_lowers_the_estimate():
    none = estimate(LARGE, 1024, rank=64).total
    int8 = estimate(LARGE, 1024, rank=64, quantization="int8").total
    int4 = estimate(LARGE, 1024, rank=64, quantization="int4").total
    offload = estimate(LARGE, 1024, rank=64, quantization="int8", block_offload=True).total
    assert none > int8 > int4 > offload
    no_ckpt = estimate(LARGE, 1024, gradient_checkpointing=False).parts["activations"]
    assert no_ckpt > 5 * estimate(LARGE, 1024).parts["activations"]
    assert estimate(LARGE, 512).total < estimate(LARGE, 1024).total
    assert estimate(LARGE, 1024, rank=64).total > estimate(LARGE, 1024, rank=16).total


def test_weights_are_counted_from_the_real_architecture():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = SD3Transformer2DModel(**LARGE)
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    est = estimate(LARGE, 1024, base_dtype="bf16")
    assert abs(est.parts["base blocks"] + est.parts["base other"] - 2 * params) < 1e-6 * params
    assert 7.5e9 < params < 8.5e9  # SD3.5 Large: 8.1 B parameters


def test_vram_tiers_pick_cheaper_settings_for_smaller_cards_and_say_why():
    picks = {gb: vram_tier(LARGE, gb * GiB) for gb in (8, 12, 16, 24, 48)}
    assert picks[24][0]["quantization"] == "int8" and picks[24][0]["gradient_checkpointing"]
    assert picks[8][0]["block_offload"]
    assert picks[48][0]["quantization"] == "none"
    for gb, (choice, why) in picks.items():
        assert f"{gb} GB GPU" in why and choice["quantization"] in why
        assert estimate(LARGE, 1024, validation=True, **choice).total <= 0.85 * gb * GiB


def test_a_run_that_cannot_fit_stops_before_loading_saying_what_to_change(monkeypatch):
    import pytest

    from training import memory
    from training.config import TrainConfig

    monkeypatch.setattr(memory, "device_memory", lambda device: (12 * GiB, "a 12 GB GPU"))
    cfg = TrainConfig(steps=1, rank=64, base_dtype="bf16", quantization="none", gradient_checkpointing=True)
    with pytest.raises(MemoryError, match="more than the 12 GB on a 12 GB GPU.*quantization int8"):
        memory.check_run(LARGE, cfg, 1024, "cpu", validation=True)
    cfg = TrainConfig(steps=1, rank=16, quantization="int4", gradient_checkpointing=True)
    level, message = memory.check_run(LARGE, cfg, 1024, "cpu", validation=False)
    assert level in ("ok", "warn") and "12 GB" in message


def test_the_estimate_follows_the_block_count_of_the_config():
    """bench_estimate measures Large's block shape with fewer blocks: the estimator must count them."""
    two, four, six = (estimate({**LARGE, "num_layers": n}, 1024, device="cpu") for n in (2, 4, 6))
    added = four.parts["base blocks"] - two.parts["base blocks"]  # two full blocks (the last is pre-only)
    assert added > 0.4 * two.parts["base blocks"]
    assert six.parts["base blocks"] - four.parts["base blocks"] == added
    per_block = 2 * LARGE["num_attention_heads"] * 64 * (64**2 + 333) * 2  # checkpointed block inputs, bf16
    assert abs(four.parts["activations"] - two.parts["activations"] - 2 * per_block) < 1
