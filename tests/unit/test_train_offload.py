"""Block offload and the automatic memory preset, on the CPU with a tiny SD3.5 model.

On a CPU the "device" is the CPU too, but the offloaded blocks still live in two placements: their home
tensors, and a fresh copy made for every forward pass (and every recomputation in the backward pass).
The tests watch each block while it computes to prove the copies are what it computes with, and that
the home tensors are back afterwards, and that training gives exactly the losses of no offload. (The
base comes from in-memory copies of the file's tensors: the file's memory map leaves them unaligned,
and the CPU's matmul kernels round differently on unaligned and aligned memory, by ~1e-7.)
"""

from __future__ import annotations

import pytest
import torch

from tools import paths
from training.config import TrainConfig
from training.data import TensorSource
from training.loading import InMemoryBase
from training.loop import train
from training.model import lora_parameters
from training.run import prepare_model, run_training

SD35 = paths.MODELS / "checkpoints" / paths.SD35_CHECKPOINT
STEPS = 3
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def base() -> InMemoryBase:
    from safetensors.torch import load_file

    tensors = load_file(str(SD35))
    return InMemoryBase(
        {k.removeprefix(PREFIX): v.clone() for k, v in tensors.items() if k.startswith(PREFIX)}, "SD35"
    )


def _source(n: int = 2) -> TensorSource:
    g = torch.Generator().manual_seed(0)
    return TensorSource(
        [torch.randn(16, 8, 8, generator=g) for _ in range(n)],
        [torch.randn(8, 4096, generator=g) for _ in range(n)],
        [torch.randn(2048, generator=g) for _ in range(n)],
        meta={"latent_channels": 16, "text_dim": 4096, "pooled_dim": 2048},
    )


def _frozen(block: torch.nn.Module) -> dict[str, torch.Tensor]:
    named = (*block.named_parameters(), *block.named_buffers())
    return {name: t for name, t in named if not t.requires_grad}


def _ptr(t: torch.Tensor) -> int:
    """Where a tensor's values are (a quanto tensor is a wrapper: its int8 data is inside)."""
    return t._data.data_ptr() if hasattr(t, "_data") else t.data_ptr()


class BlockWatch:
    """Hooks registered after the trainer's: what each block computes with, and what it holds after."""

    def __init__(self, model) -> None:
        self.blocks = list(model.transformer_blocks)
        self.home = [{n: _ptr(t) for n, t in _frozen(b).items()} for b in self.blocks]
        self.calls = [0] * len(self.blocks)
        self.copies_used = [True] * len(self.blocks)
        for i, block in enumerate(self.blocks):
            block.register_forward_pre_hook(lambda _m, _a, i=i: self.entered(i))
            block.register_forward_hook(lambda _m, _a, _o, i=i: self.left(i))

    def entered(self, i: int) -> None:
        self.calls[i] += 1
        now = _frozen(self.blocks[i])
        self.copies_used[i] &= all(_ptr(now[n]) != ptr for n, ptr in self.home[i].items())

    def left(self, i: int) -> None:
        assert {n: _ptr(t) for n, t in _frozen(self.blocks[i]).items()} == self.home[i]


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_block_offload_trains_the_same_losses_bringing_each_block_per_pass(base, quantization):
    cfg = TrainConfig(
        steps=STEPS, rank=4, alpha=4, learning_rate=1e-3, quantization=quantization, gradient_checkpointing=True
    )
    plain, _ = prepare_model(base, cfg, "cpu")
    expected = train(plain, _source(), cfg).losses
    model, _ = prepare_model(base, cfg.replace(block_offload=True), "cpu")
    lora = lora_parameters(model)
    watch = BlockWatch(model)
    assert all(_frozen(b) for b in watch.blocks)
    if quantization == "int8":
        assert "QBytesTensor" in type(model.transformer_blocks[0].attn.to_q.base_layer.weight).__name__
    losses = train(model, _source(), cfg).losses
    assert losses == expected  # exactly: the copies hold the same values
    assert watch.calls == [2 * STEPS] * len(watch.blocks)  # forward + recomputation in backward, every step
    assert all(watch.copies_used)
    after = lora_parameters(model)  # the same Parameters, trained in place (never moved or swapped)
    assert len(after) == len(lora) and all(a is b for a, b in zip(after, lora, strict=True))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = {n: p for n, p in plain.named_parameters() if p.requires_grad}
    assert all(torch.equal(p, reference[n]) for n, p in trained.items())


def test_block_offload_needs_gradient_checkpointing():
    with pytest.raises(ValueError, match="block_offload needs gradient_checkpointing on"):
        TrainConfig(block_offload=True, gradient_checkpointing=False)


def test_auto_memory_preset_picks_for_the_gpu_and_says_what_changed(monkeypatch):
    from bench.bench_scale import config
    from training import memory

    monkeypatch.setattr(memory, "device_memory", lambda device: (24 * memory.GiB, "a 24 GB GPU"))
    cfg = TrainConfig(rank=16, alpha=8, quantization="none", base_dtype="bf16", memory_preset="auto")
    chosen, why = memory.auto_settings(config("large"), cfg, 1024, "cuda", validation=True, samples=10)
    assert chosen.quantization == "int8" and chosen.gradient_checkpointing
    assert chosen.alpha / chosen.rank == cfg.alpha / cfg.rank  # the LoRA's strength scale stays as set
    assert why.startswith("memory_preset auto on a 24 GB GPU") and "quantization none -> int8" in why
    kept, _ = memory.auto_settings(config("large"), cfg, 1024, "cuda", validation=True, samples=10, rank=8)
    assert kept.rank == 8  # a continued LoRA keeps its rank
    small, _ = memory.auto_settings(config("large"), cfg, 1024, "cpu", validation=True, samples=10)
    assert small == cfg


def test_a_run_reports_its_memory_plan(tmp_path):
    cfg = TrainConfig(steps=1, rank=2, alpha=2, memory_preset="auto", save_dtype="fp32")
    out = run_training(SD35, _source(), cfg, tmp_path / "x.safetensors", tmp_path / "run")
    assert out.memory[0] == "memory_preset auto: no GPU (cpu), the settings are used as set"
    assert out.memory[1].startswith("memory: needs ~")
