from __future__ import annotations

import copy

import pytest
import torch

from tools import paths
from training.checkpoint import list_checkpoints
from training.config import TrainConfig
from training.data import TensorSource
from training.loop import DatasetTooSmallError, NonFiniteLossError, train
from training.loss import flow_matching_loss
from training.model import add_lora, load_transformer, lora_parameters, lora_target_modules

SD3 = paths.MODELS / "checkpoints" / paths.SD3_CHECKPOINT


@pytest.fixture(scope="module")
def base():
    return load_transformer(SD3)


def _with_lora(base, preset: str = "all_linear", rank: int = 8, alpha: float = 16, dropout: float = 0.0):
    model = copy.deepcopy(base)
    add_lora(model, rank=rank, alpha=alpha, targets=lora_target_modules(model, preset), dropout=dropout)
    return model


def _source(n: int = 4, seed: int = 0, size: int = 8) -> TensorSource:
    """Structured latents (a fixed pattern per sample), so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.linspace(-1.5, 1.5, size).view(1, 1, size) * torch.linspace(1, -1, 16).view(16, 1, 1)
    latents = [pattern.expand(16, size, size) + 0.1 * torch.randn(16, size, size, generator=g) for _ in range(n)]
    cond = [torch.randn(8, 4096, generator=g) for _ in range(n)]
    pooled = [torch.randn(2048, generator=g) for _ in range(n)]
    empty = (torch.zeros(1, 8, 4096), torch.zeros(1, 2048))
    return TensorSource(latents, cond, pooled, empty=empty)


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_loss_halves_with_fixed_noise_and_sigma(base):
    model = _with_lora(base)
    g = torch.Generator().manual_seed(1)
    x0, cond, pooled = (
        torch.randn(1, 16, 8, 8, generator=g),
        torch.randn(1, 8, 4096, generator=g),
        torch.randn(1, 2048),
    )
    noise, sigma = torch.randn(x0.shape, generator=g), torch.tensor([0.5])
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model.train()
    losses = []
    for _ in range(50):
        loss = flow_matching_loss(model, x0, cond, pooled, noise, sigma)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses


def test_first_step_gradients_reach_lora_b_only(base):
    model = _with_lora(base)
    src = _source(2)
    batch = next(src.batches(2, 0, 0))
    model.train()
    flow_matching_loss(
        model, batch.latents, batch.cond, batch.pooled, torch.randn_like(batch.latents), torch.tensor([0.4, 0.8])
    ).backward()
    # The last block's context queries feed nothing (its context output is dropped): no gradient there.
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_" in n and "1.attn.add_q_proj" not in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "lora_A" in n)  # B starts at zero


def _x0_error(model, src: TensorSource) -> float:
    """Mean squared error of the model's x0 estimate on the training latents (fixed noise and σ)."""
    g = torch.Generator().manual_seed(123)
    batch = next(src.batches(len(src), 0, 0))
    noise = torch.randn(batch.latents.shape, generator=g)
    total = 0.0
    with torch.no_grad():
        for s in (0.3, 0.6, 0.9):
            x_t = (1 - s) * batch.latents + s * noise
            v = model(x_t, batch.cond, batch.pooled, torch.full((len(src),), s * 1000)).sample
            total += ((x_t - s * v) - batch.latents).square().mean().item()
    return total / 3


def test_training_moves_predictions_toward_the_data(base):
    """Trained on the data, the model predicts it better than before and better than the same training on
    other (unstructured) latents, which learns only what any data teaches (e.g. shrinking toward zero)."""
    src = _source(4)
    g = torch.Generator().manual_seed(9)
    other = TensorSource([torch.randn(16, 8, 8, generator=g) for _ in range(len(src))], src.cond, src.pooled)
    cfg = TrainConfig(steps=60, batch_size=2, learning_rate=1e-2, rank=8, alpha=16, seed=3)
    model, control = _with_lora(base), _with_lora(base)
    before = _x0_error(model, src)
    result = train(model, src, cfg)
    train(control, other, cfg)
    after, unlearned = _x0_error(model, src), _x0_error(control, src)
    assert len(result.losses) == 60 and result.step == 60
    assert after < before and after < unlearned, (before, after, unlearned)


def test_resume_after_cancel_matches_an_uninterrupted_run(base, tmp_path):
    src = _source(4)
    cfg = TrainConfig(
        steps=20,
        batch_size=2,
        learning_rate=1e-3,
        rank=4,
        alpha=8,
        lora_dropout=0.1,
        caption_dropout=0.3,
        lr_scheduler="cosine",
        warmup_steps=3,
        max_grad_norm=0.5,
        seed=7,
        checkpoint_every=4,
        keep_checkpoints=2,
    )
    straight = _with_lora(base, rank=4, alpha=8, dropout=0.1)
    full = train(straight, src, cfg, work_dir=tmp_path / "straight")

    class Cancel(Exception):
        pass

    def cancel_at_10(info):
        if info.step == 10:
            raise Cancel

    first = _with_lora(base, rank=4, alpha=8, dropout=0.1)
    with pytest.raises(Cancel):
        train(first, src, cfg, work_dir=tmp_path / "split", on_step=cancel_at_10)
    kept = list_checkpoints(tmp_path / "split")
    assert [p.name for p in kept] == ["checkpoint-000008", "checkpoint-000010"]
    resumed = _with_lora(base, rank=4, alpha=8, dropout=0.1)  # a fresh process would start from scratch too
    second = train(resumed, src, cfg, work_dir=tmp_path / "split", resume=True)
    assert second.losses == pytest.approx(full.losses, rel=1e-6, abs=1e-7)
    want, got = _lora_state(straight), _lora_state(resumed)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    assert [p.name for p in list_checkpoints(tmp_path / "straight")] == ["checkpoint-000016", "checkpoint-000020"]


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_good_weights(base, tmp_path):
    src = _source(2)
    bad = TensorSource([t * float("inf") if i == 1 else t for i, t in enumerate(src.latents)], src.cond, src.pooled)
    model = _with_lora(base)
    cfg = TrainConfig(steps=6, batch_size=1, learning_rate=1e-3, seed=0, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError) as err:
        train(model, bad, cfg, work_dir=tmp_path)
    message = str(err.value)
    assert "became nan" in message or "became inf" in message
    assert "try a lower learning rate or max_grad_norm" in message and "last good checkpoint at" in message
    assert all(torch.isfinite(p).all() for p in lora_parameters(model))
    assert all(p.grad is None for p in lora_parameters(model))


def test_dataset_smaller_than_one_step_is_refused(base):
    with pytest.raises(DatasetTooSmallError, match="batch_size x grad_accum = 6"):
        train(_with_lora(base), _source(4), TrainConfig(steps=1, batch_size=2, grad_accum=3))


def test_runs_inside_inference_mode(base):
    model = _with_lora(base, preset="attention")
    with torch.inference_mode():
        result = train(model, _source(2), TrainConfig(steps=2, batch_size=1, learning_rate=1e-3))
    assert len(result.losses) == 2
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank", 0, "rank must be in 1-1024"),
        ("learning_rate", 0.0, "learning_rate must be in"),
        ("preset", "mlp", "preset must be one of"),
        ("max_grad_norm", -1.0, "max_grad_norm must be >= 0"),
    ],
)
def test_bad_settings_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_quantised_base_across_processes_is_refused(base):
    from types import SimpleNamespace

    two_processes = SimpleNamespace(num_processes=2, process_index=0)  # refused before any collective call
    cfg = TrainConfig(steps=1, batch_size=2, quantization="int8")
    with pytest.raises(ValueError, match="quantization with more than one process is not supported"):
        train(_with_lora(base), _source(2), cfg, accelerator=two_processes)
    with pytest.raises(ValueError, match="must divide evenly over 2 processes"):
        train(_with_lora(base), _source(4), TrainConfig(steps=1, batch_size=3), accelerator=two_processes)


def test_prior_preservation_data_is_learned_too(base):
    """DreamBooth-style class data: with it, the model also fits the class samples; without, it does not."""
    instance = _source(4, seed=0)
    g = torch.Generator().manual_seed(5)
    flat = [torch.full((16, 8, 8), -1.0) + 0.1 * torch.randn(16, 8, 8, generator=g) for _ in range(4)]
    prior = TensorSource(flat, [torch.randn(8, 4096, generator=g) for _ in range(4)], instance.pooled)
    cfg = TrainConfig(steps=30, batch_size=2, learning_rate=1e-2, rank=8, alpha=16, seed=3, prior_loss_weight=1.0)
    with_prior, without = _with_lora(base), _with_lora(base)
    train(with_prior, instance, cfg, prior=prior)
    train(without, instance, cfg)
    assert _x0_error(with_prior, prior) < 0.8 * _x0_error(without, prior)
