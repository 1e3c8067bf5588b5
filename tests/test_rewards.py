"""nla.train.rewards: the reward callables, their combination and GRPO advantages."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nla import metrics
from nla.errors import NLAError
from nla.train.rewards import (
    INVALID_REWARD,
    _wrong_rows,
    contrastive,
    group_advantages,
    length_penalty,
    neg_log_mse,
    neg_mse,
    resolve_reward,
    score_rollouts,
)


def _batch(n_groups: int = 3, g: int = 2, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vecs = torch.randn(n_groups, d, generator=gen).repeat_interleave(g, 0)
    recon = vecs + 0.3 * torch.randn(vecs.shape, generator=gen)
    return vecs, recon


def test_neg_mse_is_minus_the_shared_metric() -> None:
    vecs, recon = _batch()
    got = neg_mse(vecs, ["x"] * len(vecs), recon)
    assert got == pytest.approx((-metrics.mse_nrm(recon, vecs)).tolist(), abs=1e-6)
    # Perfect reconstruction scores 0, an orthogonal one −2.
    assert neg_mse(vecs[:1], ["x"], vecs[:1] * 5)[0] == pytest.approx(0.0, abs=1e-5)
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert neg_mse(a, ["x"], b)[0] == pytest.approx(-2.0, abs=1e-5)


def test_neg_log_mse_orders_like_neg_mse_and_stays_finite() -> None:
    vecs, recon = _batch()
    lin, log = neg_mse(vecs, [None] * len(vecs), recon), neg_log_mse(vecs, [None] * len(vecs), recon)
    assert sorted(range(len(lin)), key=lin.__getitem__) == sorted(range(len(log)), key=log.__getitem__)
    assert all(math.isfinite(x) for x in neg_log_mse(vecs, ["x"] * len(vecs), vecs.clone()))


def test_contrastive_rewards_specific_reconstructions() -> None:
    vecs, _ = _batch(n_groups=4, g=3)
    groups = [i // 3 for i in range(len(vecs))]
    specific = contrastive(vecs, ["x"] * len(vecs), vecs.clone(), groups=groups, group_size=3)
    assert min(specific) > 0.5  # right vector: mse 0, wrong one: ~2
    generic = torch.ones_like(vecs)  # the same reading for every vector carries nothing specific
    mean_generic = sum(contrastive(vecs, ["x"] * len(vecs), generic, groups=groups)) / len(vecs)
    assert mean_generic < min(specific)
    with pytest.raises(NLAError, match="at least 2 different vectors"):
        contrastive(vecs[:3], ["x"] * 3, vecs[:3], groups=[0, 0, 0])


@given(n=st.integers(2, 12), g=st.integers(1, 4), seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_wrong_rows_never_pick_the_own_group(n: int, g: int, seed: int) -> None:
    groups = [i // g for i in range(n * g)]
    wrong = _wrong_rows(groups, seed)
    assert all(groups[w] != groups[i] for i, w in enumerate(wrong))


def test_length_penalty_uses_token_counts() -> None:
    vecs, recon = _batch(n_groups=1, g=3)
    pen = length_penalty(0.1, free_tokens=2)
    assert pen(vecs, ["a", "b", "c"], recon, lengths=[1, 2, 7]) == pytest.approx([0.0, 0.0, -0.5])
    assert pen(vecs, ["a b c d", None, "x"], recon) == pytest.approx([-0.2, 0.0, 0.0])


def test_score_rollouts_sums_weights_and_floors_invalid() -> None:
    vecs, recon = _batch(n_groups=2, g=2)
    expl = ["a", None, "c", "d"]
    base = neg_mse(vecs, expl, recon)
    total = score_rollouts([(neg_mse, 2.0), (length_penalty(1.0), 1.0)], vecs, expl, recon,
                           invalid=[False, True, False, True], lengths=[1, 1, 3, 1])
    assert total[0] == pytest.approx(2 * base[0] - 1.0, abs=1e-5)
    assert total[2] == pytest.approx(2 * base[2] - 3.0, abs=1e-5)
    assert total[1] == total[3] == INVALID_REWARD
    # No floor: the invalid rows keep their computed reward.
    free = score_rollouts([(neg_mse, 1.0)], vecs, expl, recon, invalid=[True] * 4, invalid_reward=None)
    assert free == pytest.approx(base, abs=1e-6)


def test_score_rollouts_rejects_bad_reward_output() -> None:
    vecs, recon = _batch(n_groups=1, g=2)

    def short(*_a: object, **_k: object) -> list[float]:
        return [0.0]

    def nan(*_a: object, **_k: object) -> list[float]:
        return [0.0, float("nan")]

    with pytest.raises(NLAError, match="returned 1 values for 2 rollouts"):
        score_rollouts([(short, 1.0)], vecs, ["a", "b"], recon)
    with pytest.raises(NLAError, match="returned nan for rollout 1"):
        score_rollouts([(nan, 1.0)], vecs, ["a", "b"], recon)


def test_resolve_reward_names_and_module_paths() -> None:
    assert resolve_reward("neg_mse") is neg_mse
    assert resolve_reward("nla.train.rewards:contrastive") is contrastive
    assert resolve_reward(neg_log_mse) is neg_log_mse
    with pytest.raises(NLAError, match="unknown reward 'mse'"):
        resolve_reward("mse")
    with pytest.raises(NLAError, match="cannot import module 'no_such_mod'"):
        resolve_reward("no_such_mod:f")
    with pytest.raises(NLAError, match="has no callable 'nope'"):
        resolve_reward("nla.train.rewards:nope")


@given(st.lists(st.floats(-5, 5), min_size=8, max_size=8), st.sampled_from([2, 4, 8]))
@settings(max_examples=50, deadline=None)
def test_group_advantages_are_centred_per_group(values: list[float], g: int) -> None:
    adv = group_advantages(torch.tensor(values), g).view(-1, g)
    assert torch.allclose(adv.sum(-1), torch.zeros(adv.shape[0]), atol=1e-3)
    raw = torch.tensor(values).view(-1, g)
    spread = raw.max(-1).values - raw.min(-1).values
    assert torch.all(adv[spread == 0] == 0)  # a group with one score carries no preference
    # Near-equal scores (float noise) carry next to none: |A| <= spread / eps, eps = 1e-4.
    assert torch.all(adv.abs().max(-1).values <= spread / 1e-4 + 1e-6)


def test_group_advantages_checks_group_size() -> None:
    assert group_advantages(torch.tensor([1.0, 3.0]), 2, normalize_std=False).tolist() == [-1.0, 1.0]
    with pytest.raises(NLAError, match="do not split into groups of 4"):
        group_advantages(torch.zeros(6), 4)
