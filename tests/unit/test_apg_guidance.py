"""Properties of apg.guidance on random tensors (Algorithm 1 of Sadat et al., ICLR 2025).

``apply_apg`` fuses the paper's steps; the step-by-step Algorithm 1 below (clamp, project, combine) is
the reference it is checked against.
"""

from __future__ import annotations

import math

import pytest
import torch

from apg.guidance import MomentumState, apply_apg, cfg
from apg.settings import MOMENTUM_LIMIT


def sample_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def clamp_norm(delta: torch.Tensor, r: float) -> torch.Tensor:
    """Algorithm 1's rescaling: each sample times min(1, r / ||delta||) (r = 0: no clamp)."""
    if r == 0:
        return delta
    norm = torch.linalg.vector_norm(delta, dim=sample_dims(delta), keepdim=True)
    return delta * (r / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp_max(1.0)


def project(v: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel and orthogonal parts of ``v`` relative to ``onto``, per sample, in float64."""
    dims = sample_dims(v)
    v64, onto64 = v.double(), onto.double()
    energy = (onto64 * onto64).sum(dim=dims, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    parallel = (v64 * onto64).sum(dim=dims, keepdim=True) / energy * onto64
    return parallel, v64 - parallel


def apg_update(cond, uncond, eta=0.0, norm_threshold=0.0, state=None) -> torch.Tensor:
    """The paper's update Δ⊥ + η·Δ∥ after momentum and clamp, step by step."""
    delta = cond - uncond
    if state is not None:
        delta = state.update(delta)
    parallel, orthogonal = project(clamp_norm(delta, norm_threshold), cond)
    return orthogonal + eta * parallel


SHAPES = [(1, 16, 8, 8), (3, 16, 12, 20), (2, 4, 5, 3, 7), (4, 33)]


def pair(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(shape, generator=g, dtype=dtype)
    uncond = cond + 0.7 * torch.randn(shape, generator=g, dtype=dtype) + 0.3
    return cond, uncond


def per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).double()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.5, 4.0, 12.0])
@pytest.mark.parametrize("seed", range(3))
def test_eta1_no_clamp_no_momentum_is_cfg(shape, scale, seed):
    cond, uncond = pair(shape, seed)
    out = apply_apg(cond, uncond, scale, eta=1.0, norm_threshold=0.0, state=None)
    assert out.dtype == cond.dtype and out.shape == cond.shape
    assert torch.allclose(out, cfg(cond, uncond, scale), rtol=0, atol=1e-6 * max(1.0, scale))
    zero_beta = apply_apg(cond, uncond, scale, eta=1.0, norm_threshold=0.0, state=MomentumState(0.0))
    assert torch.allclose(zero_beta, out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_eta0_update_is_orthogonal_to_cond(shape, seed):
    cond, uncond = pair(shape, seed)
    update = per_sample(apg_update(cond, uncond, eta=0.0, norm_threshold=0.0))
    c = per_sample(cond)
    cosine = (update * c).sum(1) / (update.norm(dim=1) * c.norm(dim=1))
    assert cosine.abs().max() <= 1e-6
    # and through the public result: D - D_cond is the (w-1)-scaled update
    out = per_sample(apply_apg(cond.double(), uncond.double(), 5.0, eta=0.0))
    moved = out - c
    cosine_out = (moved * c).sum(1) / (moved.norm(dim=1) * c.norm(dim=1))
    assert cosine_out.abs().max() <= 1e-6
    # the update really lost something: Δ had a parallel part
    delta = per_sample(cond - uncond)
    assert ((delta * c).sum(1) / (delta.norm(dim=1) * c.norm(dim=1))).abs().min() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0, 2.0])
def test_projection_parts_sum_and_eta_weights_parallel(eta):
    cond, uncond = pair((2, 16, 6, 6), 7)
    par, orth = project(cond - uncond, cond)
    assert torch.allclose(par + orth, (cond - uncond).double(), atol=1e-12)
    assert torch.allclose(apg_update(cond, uncond, eta=eta), orth + eta * par, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("r", [0.01, 0.5, 3.0, 15.0, 1e4])
def test_clamped_delta_norm_never_exceeds_r(shape, r):
    cond, uncond = pair(shape, 11)
    delta = (cond - uncond) * torch.logspace(-3, 3, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    clamped = clamp_norm(delta, r)
    norms = per_sample(clamped).norm(dim=1)
    assert (norms <= r * (1 + 1e-6)).all()
    original = per_sample(delta).norm(dim=1)
    # samples already inside the ball are untouched; the others land on its surface, same direction
    inside = original <= r
    assert torch.allclose(per_sample(clamped)[inside], per_sample(delta)[inside])
    assert torch.allclose(norms[~inside], torch.full_like(norms[~inside], r), rtol=1e-5)
    # η = 1: the whole guidance update is the clamped Δ, so its norm is bounded too
    update = apg_update(cond + delta, cond, eta=1.0, norm_threshold=r)
    assert (per_sample(update).norm(dim=1) <= r * (1 + 1e-6)).all()


def test_clamp_of_zero_delta_is_zero():
    zero = torch.zeros(2, 4, 3, 3)
    assert torch.equal(apply_apg(zero, zero, 5.0, eta=1.0, norm_threshold=5.0), zero)


def test_momentum_matches_hand_computed_three_steps():
    state = MomentumState(-0.5)
    d1 = torch.tensor([[1.0, 2.0]])
    d2 = torch.tensor([[3.0, -1.0]])
    d3 = torch.tensor([[0.0, 4.0]])
    assert torch.equal(state.update(d1), torch.tensor([[1.0, 2.0]]))  # m1 = d1
    assert torch.equal(state.update(d2), torch.tensor([[2.5, -2.0]]))  # m2 = d2 - 0.5 m1
    assert torch.equal(state.update(d3), torch.tensor([[-1.25, 5.0]]))  # m3 = d3 - 0.5 m2


def test_momentum_drives_apg_in_order_momentum_then_clamp():
    cond, uncond = pair((2, 4, 5, 5), 3)
    cond2, uncond2 = pair((2, 4, 5, 5), 4)
    state = MomentumState(-0.75)
    apply_apg(cond, uncond, 3.0, eta=1.0, norm_threshold=0.0, state=state)
    out = apply_apg(cond2, uncond2, 3.0, eta=1.0, norm_threshold=0.0, state=state)
    m = (cond2 - uncond2) - 0.75 * (cond - uncond)
    assert torch.allclose(out, cond2 + 2.0 * m, atol=1e-5)
    # with a clamp, the clamp applies to the momentum sum, not to each step's Δ
    state = MomentumState(-0.75)
    apply_apg(cond, uncond, 3.0, eta=1.0, norm_threshold=1.0, state=state)
    out = apply_apg(cond2, uncond2, 3.0, eta=1.0, norm_threshold=1.0, state=state)
    assert torch.allclose(out, cond2 + 2.0 * clamp_norm(m, 1.0), atol=1e-5)


def test_momentum_reset_between_runs_gives_the_fresh_result():
    steps = [pair((1, 16, 4, 4), s) for s in range(4)]

    def run(state: MomentumState) -> list[torch.Tensor]:
        return [apply_apg(c, u, 4.0, eta=0.0, norm_threshold=2.0, state=state) for c, u in steps]

    fresh = run(MomentumState(-0.5))
    state = MomentumState(-0.5)
    run(state)
    leaked = run(state)
    assert not torch.allclose(leaked[0], fresh[0])  # without a reset the previous run leaks in
    state.reset()
    assert all(torch.equal(a, b) for a, b in zip(run(state), fresh, strict=True))


@pytest.mark.parametrize(
    "second",
    [(2, 16, 4, 4), (1, 16, 6, 4), (1, 4, 4, 4)],
    ids=["batch", "resolution", "channels"],
)
def test_momentum_resets_itself_on_shape_change(second):
    state = MomentumState(-0.5)
    state.update(torch.ones(1, 16, 4, 4))
    delta = torch.randn(second)
    assert torch.equal(state.update(delta), delta)  # no crash, no stale buffer


def test_momentum_resets_on_dtype_change_and_beta_zero_keeps_nothing():
    state = MomentumState(-0.5)
    state.update(torch.ones(1, 3))
    delta = torch.full((1, 3), 2.0, dtype=torch.float64)
    assert torch.equal(state.update(delta), delta)
    off = MomentumState(0.0)
    d = torch.randn(1, 3)
    assert off.update(d) is d and off.running is None
    with pytest.raises(ValueError, match="momentum"):
        MomentumState(float("nan"))


@pytest.mark.parametrize("beta", [-1.5, -1.0, 1.0, 2.0])
def test_momentum_outside_the_bounded_range_is_refused(beta):
    with pytest.raises(ValueError, match="momentum must be between"):
        MomentumState(beta)


def test_what_the_limit_prevents_and_what_it_guarantees():
    """|β| > 1 with the clamp off blows up within a sampling run; |β| <= the limit stays bounded."""
    g = torch.Generator().manual_seed(0)
    deltas = [torch.rand(1, 16, 8, 8, generator=g) * 2 - 1 for _ in range(40)]
    biggest = max(float(d.abs().max()) for d in deltas)

    def run(beta: float) -> float:
        running = None
        peak = 0.0
        for delta in deltas:  # m <- delta + beta * m, as MomentumState.update
            running = delta if running is None else delta + beta * running
            peak = max(peak, float(running.abs().max()))
        return peak

    assert run(-1.5) > 1e5 * biggest  # the divergence the limit is for: |beta|^t growth
    for beta in (-MOMENTUM_LIMIT, -0.75, -0.5, 0.5, MOMENTUM_LIMIT):
        state = MomentumState(beta)
        peak = max(float(state.update(delta).abs().max()) for delta in deltas)
        assert peak <= biggest / (1 - abs(beta)) * (1 + 1e-6)
        assert math.isclose(peak, run(beta), rel_tol=1e-6)


def test_half_precision_inputs_keep_their_dtype_and_match_float64_reference():
    cond, uncond = pair((1, 16, 8, 8), 5)
    out16 = apply_apg(cond.half(), uncond.half(), 5.0, eta=0.0, norm_threshold=10.0)
    ref = apply_apg(cond.half().double(), uncond.half().double(), 5.0, eta=0.0, norm_threshold=10.0)
    assert out16.dtype == torch.float16
    assert torch.allclose(out16.double(), ref, atol=1e-2)


def test_zero_cond_has_no_parallel_part():
    cond = torch.zeros(1, 4, 2, 2)
    uncond = torch.randn(1, 4, 2, 2)
    out = apply_apg(cond, uncond, 3.0, eta=0.0)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, 2.0 * (cond - uncond))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        apply_apg(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 3), 3.0)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0, 2.0])
@pytest.mark.parametrize("r", [0.0, 2.0, 1e5])
@pytest.mark.parametrize("beta", [0.0, -0.5])
def test_apply_apg_is_cond_plus_scaled_update(eta, r, beta):
    states = MomentumState(beta), MomentumState(beta)
    for step in range(3):
        cond, uncond = pair((2, 16, 6, 5), 20 + step)
        expected = cond.double() + 5.0 * apg_update(cond, uncond, eta=eta, norm_threshold=r, state=states[0])
        got = apply_apg(cond, uncond, 6.0, eta=eta, norm_threshold=r, state=states[1])
        assert torch.allclose(got, expected.float(), rtol=0, atol=1e-5)
