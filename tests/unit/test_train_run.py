from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tools import paths
from training.config import TrainConfig
from training.data import TensorSource
from training.run import check_compatible, run_training

SD35 = paths.MODELS / "checkpoints" / paths.SD35_CHECKPOINT


def _source(n: int = 3, text_dim: int = 4096, channels: int = 16) -> TensorSource:
    g = torch.Generator().manual_seed(0)
    prompts = [("a prompt", torch.randn(1, 8, text_dim, generator=g), torch.randn(1, 2048, generator=g))]
    return TensorSource(
        [torch.randn(channels, 8, 8, generator=g) for _ in range(n)],
        [torch.randn(8, text_dim, generator=g) for _ in range(n)],
        [torch.randn(2048, generator=g) for _ in range(n)],
        prompts=prompts,
        meta={"latent_channels": channels, "text_dim": text_dim, "pooled_dim": 2048},
    )


def test_a_run_inside_inference_mode_writes_the_lora_and_validation_images(tmp_path):
    cfg = TrainConfig(
        steps=3, batch_size=1, learning_rate=1e-3, rank=2, alpha=4, validation_steps=2, save_dtype="fp32"
    )
    decoded = []

    def decode(latents: torch.Tensor) -> torch.Tensor:  # a stand-in VAE: the first 3 channels as colours
        decoded.append(latents.shape)
        return torch.sigmoid(latents[:, :3]).permute(0, 2, 3, 1)

    with torch.inference_mode():  # how ComfyUI calls every node
        out = run_training(SD35, _source(), cfg, tmp_path / "loras" / "x.safetensors", tmp_path / "run", decode=decode)
    assert out.lora_path.is_file() and len(out.losses) == 3
    assert decoded == [torch.Size([1, 16, 8, 8])] * 2  # CFG and APG, once at the end
    assert sorted(p.name for p in (tmp_path / "run" / "validation").iterdir()) == [
        "step000003_apg_00.png",
        "step000003_cfg_00.png",
    ]
    assert not torch.equal(out.decoded["cfg"], out.decoded["apg"])
    with safe_open(str(out.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["sd35_tuner.dataset_size"] == "3" and json.loads(meta["sd35_tuner.config"])["rank"] == 2


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"latent_channels": 4}, "latents of width 4 but the base model takes 16"),
        ({"text_dim": 2048}, "text embeddings of width 2048"),
    ],
)
def test_cache_of_another_family_is_refused(meta, message):
    class Config:
        in_channels, joint_attention_dim, pooled_projection_dim = 16, 4096, 2048

    with pytest.raises(ValueError, match=message):
        check_compatible(meta, Config)


def test_mismatched_cache_fails_before_writing(tmp_path):
    cfg = TrainConfig(steps=1, batch_size=1, learning_rate=1e-3, rank=2)
    with pytest.raises(ValueError, match="another model family"):
        run_training(SD35, _source(channels=4), cfg, tmp_path / "x.safetensors", tmp_path / "run")
    assert not (tmp_path / "x.safetensors").exists()


def test_loss_chart_draws_the_curve():
    from training.report import loss_chart

    chart = loss_chart([2.0 - 0.01 * i for i in range(100)], width=320, height=160)
    assert chart.shape == (160, 320, 3) and chart.dtype.name == "uint8"
    curve = (chart[..., 2] > 120) & (chart[..., 0] < 60)  # the dark-blue moving average
    ys, xs = curve.nonzero()
    assert xs.min() < 80 and xs.max() > 280  # spans the plot
    assert ys[xs.argmin()] < ys[xs.argmax()]  # falling loss: left end higher on screen (smaller y)
    assert loss_chart([]).shape == (256, 512, 3)


def test_validation_reports_each_evaluation_and_a_cancel_there_keeps_the_step_for_resume(tmp_path):
    cfg = TrainConfig(
        steps=4, batch_size=1, learning_rate=1e-3, rank=2, alpha=4, validation_every=2, validation_steps=2
    )
    calls, resumed = [], False

    class Cancel(Exception):
        pass

    def on_validation(step: int, done: int, total: int) -> None:
        calls.append((step, done, total))
        if step == 4 and done == 1 and not resumed:
            raise Cancel

    lora, work = tmp_path / "x.safetensors", tmp_path / "run"
    with pytest.raises(Cancel):
        run_training(SD35, _source(), cfg, lora, work, on_validation=on_validation)
    # CFG and APG, 2 sampler steps each: 4 evaluations per validation, announced with 0 first
    assert calls == [(2, i, 4) for i in range(5)] + [(4, 0, 4), (4, 1, 4)]
    assert not lora.exists() and (work / "checkpoint-000004").is_dir()  # the cancelled run's last step is kept
    calls.clear()
    resumed = True
    out = run_training(SD35, _source(), cfg, lora, work, resume=True, on_validation=on_validation)
    assert out.resumed_from == work / "checkpoint-000004" and not out.damaged
    assert len(out.losses) == 4 and lora.is_file()
    assert calls == [(4, i, 4) for i in range(5)]  # the interrupted final samples are made after all
