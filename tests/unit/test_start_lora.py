"""Starting a run from an existing LoRA: its targets, rank and weights carry over exactly, bad ones are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.test_lora_metadata import _source
from tools import paths
from training.config import TrainConfig
from training.export import lora_state_dict
from training.run import prepare_model, run_training
from training.start_lora import StartLora

SD35 = paths.MODELS / "checkpoints" / paths.SD35_CHECKPOINT


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, torch.Tensor]:
    """A LoRA of rank 4 with alpha 2 (scale 0.5 folded into lora_B), as the trainer writes it."""
    tmp = tmp_path_factory.mktemp("start")
    cfg = TrainConfig(
        steps=2, batch_size=1, learning_rate=5e-3, rank=4, alpha=2, preset="attention", save_dtype="fp32"
    )
    out = run_training(SD35, _source(), cfg, tmp / "first.safetensors", tmp / "run")
    return load_file(str(out.lora_path))


def test_a_started_adapter_exports_the_same_lora_whatever_the_new_alpha(trained):
    start = StartLora.from_state_dict(trained, "first.safetensors")
    cfg = TrainConfig(steps=1, rank=32, alpha=8.0, preset="all_linear", save_dtype="fp32")  # rank/preset: the LoRA's
    transformer, spec = prepare_model(SD35, cfg, start=start)
    assert spec.rank == 4 and set(spec.targets) == {
        k.removeprefix("transformer.")[: -len(".lora_A.weight")] for k in trained if k.endswith("lora_A.weight")
    }
    again = lora_state_dict(transformer, spec)
    assert again.keys() == trained.keys()
    for key, tensor in trained.items():
        torch.testing.assert_close(again[key], tensor, rtol=1e-6, atol=0)


def test_an_alpha_tensor_scales_lora_b_as_comfyui_reads_it(trained):
    key = next(k for k in trained if k.endswith("lora_A.weight"))
    module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
    state = {key: trained[key], key.replace("lora_A", "lora_B"): trained[key.replace("lora_A", "lora_B")]}
    with_alpha = {**state, f"transformer.{module}.alpha": torch.tensor(8.0)}  # rank 4: scale 2
    plain, scaled = (StartLora.from_state_dict(s, "x").weights[module][1] for s in (state, with_alpha))
    torch.testing.assert_close(scaled, 2 * plain)


def test_a_run_started_from_a_lora_continues_it(tmp_path, trained):
    start = StartLora.from_state_dict(trained, "first.safetensors")
    cfg = TrainConfig(steps=1, batch_size=1, learning_rate=1e-7, rank=4, alpha=2, save_dtype="fp32")
    out = run_training(SD35, _source(), cfg, tmp_path / "second.safetensors", tmp_path / "run", start=start)
    second = load_file(str(out.lora_path))
    fresh = run_training(SD35, _source(), cfg, tmp_path / "fresh.safetensors", tmp_path / "run2")
    fresh_state = load_file(str(fresh.lora_path))
    b = next(k for k in trained if k.endswith("lora_B.weight"))
    assert (second[b] - trained[b]).abs().max() < 1e-4 * trained[b].abs().max()  # one step at lr 1e-7
    assert (fresh_state[b] - trained[b]).abs().max() > 0.1 * trained[b].abs().max()


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight": torch.zeros(384, 4)}, "not in diffusers"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128)}, "no lora_A/lora_B pair"),
        (
            {
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 128),
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 4),
                "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(8, 128),
                "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(128, 8),
            },
            "mixes LoRA ranks",
        ),
        ({}, "holds no tensors"),
    ],
)
def test_a_lora_that_cannot_be_continued_is_refused_naming_it(state, message):
    with pytest.raises(ValueError, match=message):
        StartLora.from_state_dict(state, "other.safetensors")


def test_a_lora_for_another_model_is_refused_before_training(tmp_path):
    state = {
        "transformer.transformer_blocks.9.attn.to_q.lora_A.weight": torch.zeros(4, 128),
        "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": torch.zeros(128, 4),
    }
    start = StartLora.from_state_dict(state, "big.safetensors")
    with pytest.raises(ValueError, match="big.safetensors targets transformer_blocks.9.attn.to_q"):
        run_training(SD35, _source(), TrainConfig(steps=1), tmp_path / "x.safetensors", tmp_path / "run", start=start)
    assert not (tmp_path / "x.safetensors").exists()
