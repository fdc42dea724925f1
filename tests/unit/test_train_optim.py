from __future__ import annotations

import importlib.util

import pytest
import torch

from training.config import TrainConfig
from training.optim import BF16AdamW, make_optimizer, make_scheduler


def _fit(optimizer_cls, steps: int = 30) -> torch.Tensor:
    """A small least-squares problem; returns the weights after ``steps`` steps."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randn(64, 2, generator=g)
    w = torch.nn.Parameter(torch.zeros(8, 2))
    opt = optimizer_cls([w])
    for _ in range(steps):
        loss = (x @ w - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return w.detach()


def test_bf16_state_adamw_keeps_bf16_moments_and_tracks_torch_adamw():
    ours = _fit(lambda p: BF16AdamW(p, lr=1e-2, weight_decay=1e-2))
    ref = _fit(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2))
    assert float((ours - ref).norm() / ref.norm()) < 2e-2
    w = torch.nn.Parameter(torch.ones(3))
    opt = BF16AdamW([w], lr=1e-3)
    w.grad = torch.ones(3)
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.bfloat16 and opt.state[w]["exp_avg_sq"].dtype == torch.bfloat16


def test_lowmem_choice_on_cpu_is_bf16_adamw():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer(params, TrainConfig(optimizer="adamw_lowmem")), BF16AdamW)
    assert type(make_optimizer(params, TrainConfig(optimizer="adamw"))) is torch.optim.AdamW


@pytest.mark.parametrize(
    ("name", "package", "pip_name"),
    [("prodigy", "prodigyopt", "prodigyopt"), ("stableadamw", "optimi", "torch-optimi")],
)
def test_optional_optimizers_are_used_when_installed_and_named_when_not(name, package, pip_name):
    params = [torch.nn.Parameter(torch.zeros(2))]
    if importlib.util.find_spec(package) is None:
        with pytest.raises(ValueError, match=f"pip install {pip_name}"):
            make_optimizer(params, TrainConfig(optimizer=name))
    else:
        assert type(make_optimizer(params, TrainConfig(optimizer=name))).__module__.startswith(package)


def test_cosine_schedule_with_warmup():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make_scheduler(opt, TrainConfig(steps=100, lr_scheduler="cosine", warmup_steps=10, learning_rate=1e-3))
    lrs = []
    for _ in range(100):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0 and lrs[10] == pytest.approx(1e-3) and lrs[99] < 1e-5
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11], strict=True))


def test_constant_schedule_with_warmup():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = make_scheduler(opt, TrainConfig(steps=20, warmup_steps=4, learning_rate=1e-3))
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3]) and lrs[-1] == pytest.approx(1e-3)
