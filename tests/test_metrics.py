"""nla.metrics: property tests for the definitions of docs/design.md §6."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from nla import metrics

SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def matrices(draw: st.DrawFn, min_rows: int = 1) -> torch.Tensor:
    n = draw(st.integers(min_rows, 12))
    d = draw(st.integers(2, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(1e-2, 1e3))
    offset = draw(st.floats(-3.0, 3.0))
    g = torch.Generator().manual_seed(seed)
    # An offset makes the rows anisotropic (a shared mean direction), as real layers are.
    x = (torch.randn(n, d, generator=g) + offset) * scale
    assume(bool((x.norm(dim=-1) > 1e-3 * scale).all()))
    return x


@SETTINGS
@given(matrices())
def test_identical_gives_zero_mse_and_fve_one(v: torch.Tensor) -> None:
    mse = metrics.mse_nrm(v, v)
    assert torch.allclose(mse, torch.zeros_like(mse), atol=1e-5)
    mean = metrics.normalize(v).mean(0)
    assume(float(metrics.baseline_variance(v, mean)) > 1e-3)
    assert metrics.fve_nrm(v, v, mean) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(metrics.cosine(v, v), torch.ones(len(v)), rtol=1e-5, atol=1e-5)


@SETTINGS
@given(st.integers(2, 64), st.integers(0, 10_000), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_orthogonal_gives_two(d: int, seed: int, a: float, b: float) -> None:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    p, t = (q[:, 0] * a).float(), (q[:, 1] * b).float()
    assert float(metrics.mse_nrm(p, t)) == pytest.approx(2.0, abs=1e-4)
    assert float(metrics.mse_nrm(p, -p)) == pytest.approx(4.0, abs=1e-4)


@SETTINGS
@given(matrices(), matrices(), st.floats(1e-3, 1e4), st.floats(1e-3, 1e4))
def test_scale_invariance_and_cosine_identity(p: torch.Tensor, t: torch.Tensor, a: float, b: float) -> None:
    n, d = min(len(p), len(t)), min(p.shape[1], t.shape[1])
    p, t = p[:n, :d], t[:n, :d]
    assume(bool((p.norm(dim=-1) > 0.1).all() and (t.norm(dim=-1) > 0.1).all()))
    base = metrics.mse_nrm(p, t)
    torch.testing.assert_close(metrics.mse_nrm(p * a, t * b), base, rtol=1e-4, atol=1e-4)
    # mse_nrm = 2 (1 - cos): the two definitions of DESIGN §6 agree.
    torch.testing.assert_close(base, 2 * (1 - metrics.cosine(p, t)), rtol=1e-4, atol=1e-4)
    assert bool(((base >= -1e-6) & (base <= 4 + 1e-5)).all())


@SETTINGS
@given(matrices(min_rows=2))
def test_mean_direction_baseline(v: torch.Tensor) -> None:
    mu = metrics.normalize(v).mean(0)  # the training mean of v̂
    d = v.shape[1]
    assume(float(mu.norm()) > 1e-2)
    b = float(metrics.baseline_variance(v, mu))
    mean_dir = math.sqrt(d) * mu / mu.norm()
    b_prime = float(((metrics.normalize(v) - mean_dir) ** 2).mean(-1).mean())
    assume(b > 1e-3 and b_prime - b > 1e-3)  # rows not all one direction
    pred = mean_dir.expand_as(v)
    assert metrics.fve_meannorm(pred, v, mu) == pytest.approx(0.0, abs=1e-6)
    fve = metrics.fve_nrm(pred, v, mu)
    assert fve == pytest.approx(1 - b_prime / b, rel=1e-4, abs=1e-5)
    assert fve < 0  # no constant prediction clears the headline baseline


def test_mean_direction_exact_example() -> None:
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mu = metrics.normalize(v).mean(0)
    pred = (math.sqrt(2) * mu / mu.norm()).expand_as(v)
    assert metrics.fve_meannorm(pred, v, mu) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fve_nrm(pred, v, mu) < 0


@given(matrices())
@settings(max_examples=15, deadline=None)
def test_fp32_for_bf16_inputs(v: torch.Tensor) -> None:
    p = v.to(torch.bfloat16)
    out = metrics.mse_nrm(p, p.flip(0))
    assert out.dtype == torch.float32
    assert metrics.cosine(p, p).dtype == torch.float32
    assert metrics.normalize(p).dtype == torch.float32
    ref = metrics.mse_nrm(p.float(), p.float().flip(0))
    torch.testing.assert_close(out, ref)


def test_zero_vector_is_finite() -> None:
    z = torch.zeros(2, 8)
    x = torch.randn(2, 8)
    for value in (metrics.mse_nrm(z, x), metrics.mse_nrm(z, z), metrics.cosine(z, x), metrics.normalize(z)):
        assert bool(torch.isfinite(value).all())
    assert float(metrics.mse_nrm(z, x).mean()) == pytest.approx(1.0)  # ||v̂||² / d = 1


def test_mse_is_differentiable() -> None:
    p = torch.randn(3, 8, requires_grad=True)
    metrics.mse_nrm(p, torch.randn(3, 8)).mean().backward()
    assert p.grad is not None and bool(torch.isfinite(p.grad).all())


def test_top1_retrieval_and_shuffled_gap() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, 32, generator=g)
    assert metrics.top1_retrieval(t, t, n_candidates=16) == 1.0
    noise = torch.randn(40, 32, generator=g)
    chance = metrics.top1_retrieval(noise, t, n_candidates=16)
    assert chance < 0.5  # near 1/16 for unrelated predictions
    assert metrics.shuffled_gap(t, t) > 1.0
    assert abs(metrics.shuffled_gap(noise, t)) < 0.5
    assert math.isnan(metrics.top1_retrieval(t[:1], t[:1]))


def test_summarize_and_per_row() -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.randn(10, 16, generator=g) + 1.0
    mu = metrics.normalize(t).mean(0)
    s = metrics.summarize(t, t, mu)
    assert s["fve_nrm"] == pytest.approx(1.0, abs=1e-5) and s["n"] == 10
    per = metrics.per_row_fve(t, t, mu)
    torch.testing.assert_close(per, torch.ones(10), rtol=1e-5, atol=1e-5)
    noise = torch.randn(10, 16, generator=g)
    assert float(metrics.per_row_fve(noise, t, mu).mean()) == pytest.approx(metrics.fve_nrm(noise, t, mu), abs=1e-5)
