"""A CPU run over the graph's MODEL weights makes no quantised copy of them (``memory.keep_graph_weights``).

On a GPU quantisation shrinks the trainer's copy of the base in VRAM; on the CPU, training over a MODEL
input, the trainer shares the MODEL's tensors in RAM, so an int8/int4 copy would only add memory next to
them. The run must then train exactly as with quantization "none", say why, and not count the shared base
against the free RAM; everywhere else (a file, a GPU, weights that would be converted or are quantised)
the setting stays as set.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_train_offload import SD35, _source, base  # noqa: F401  (base is a fixture: the tiny SD3.5 in memory)
from training import memory
from training.config import TrainConfig
from training.loading import InMemoryBase, read_config
from training.run import run_training


@pytest.fixture(scope="module")
def bf16_base(base) -> InMemoryBase:  # noqa: F811
    return InMemoryBase({k: v.to(torch.bfloat16) for k, v in base.state.items()}, "SD35 (bf16 MODEL)")


def _cfg(quantization: str) -> TrainConfig:
    return TrainConfig(steps=2, rank=4, alpha=4, learning_rate=1e-3, base_dtype="bf16", quantization=quantization)


def test_a_cpu_run_over_the_models_weights_trains_as_without_quantisation_and_says_why(bf16_base, tmp_path):
    asked = run_training(bf16_base, _source(), _cfg("int8"), tmp_path / "int8.safetensors", tmp_path / "a")
    plain = run_training(bf16_base, _source(), _cfg("none"), tmp_path / "none.safetensors", tmp_path / "b")
    assert asked.memory[0].startswith("quantization int8 not applied: this run trains on the CPU over the MODEL")
    assert "base (the MODEL's, already here) 0.0" in asked.memory[-1]
    assert "base blocks" not in asked.memory[-1]
    assert asked.losses == plain.losses
    got, want = load_file(str(asked.lora_path)), load_file(str(plain.lora_path))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_quantisation_stays_as_set_off_the_cpu_for_a_file_or_weights_it_would_not_share(base, bf16_base):  # noqa: F811
    cfg = _cfg("int8")
    assert memory.keep_graph_weights(bf16_base, cfg, "cuda") == (cfg, None)  # a GPU: the copy goes to VRAM
    assert memory.keep_graph_weights(SD35, cfg, "cpu") == (cfg, None)  # a file: nothing held to share
    assert memory.keep_graph_weights(base, cfg, "cpu") == (cfg, None)  # fp32 weights, bf16 run: converted copies
    fp8 = InMemoryBase(bf16_base.state, "fp8 MODEL", {"_quantization_metadata": '{"format_version": "1.0"}'})
    assert memory.keep_graph_weights(fp8, cfg, "cpu") == (cfg, None)
    none = _cfg("none")
    assert memory.keep_graph_weights(bf16_base, none, "cpu") == (none, None)


def test_the_estimate_leaves_out_a_base_the_graph_already_holds(bf16_base):
    config = read_config(bf16_base)
    own = memory.estimate(config, 256, device="cpu")
    shared = memory.estimate(config, 256, device="cpu", shared_base=True)
    base_bytes = own.parts["base blocks"] + own.parts["base other"]
    assert base_bytes > 0 and shared.total == pytest.approx(own.total - base_bytes)
