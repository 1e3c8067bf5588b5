"""Rewards for RL of the verbalizer (docs/design.md §8): plain callables, TRL style.

A reward is any callable ``f(vectors, explanations, reconstructions, **ctx) -> list[float]``:

* ``vectors``: ``[N, d]`` the activation each rollout was sampled for (each vector repeated G
  times, group-major: rows ``g*G .. g*G+G-1`` share vector ``g``);
* ``explanations``: the parsed explanation of each rollout, ``None`` when unparseable;
* ``reconstructions``: ``[N, d]`` the current AR's reading of each explanation;
* ``ctx``: ``raw`` (decoded answers), ``token_ids``, ``lengths`` (answer tokens), ``truncated``,
  ``groups`` (group index per rollout), ``group_size``, ``step``, ``mean_vector``, ``seed``.
  Rewards take ``**ctx`` and ignore what they do not use, so new context never breaks them.

:func:`score_rollouts` sums weighted rewards and then gives ``invalid_reward`` (−2 by default)
to unparseable or truncated answers: without that floor, a policy can learn that an empty or
runaway answer reconstructs to "about the mean" and scores better than a committed guess.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from nla import metrics
from nla.errors import NLAError

RewardFn = Callable[..., list[float]]

INVALID_REWARD = -2.0


def neg_mse(vectors: torch.Tensor, explanations: Sequence[str | None], reconstructions: torch.Tensor,
            **ctx: Any) -> list[float]:
    """``−mse_nrm(reconstruction, vector)``: 0 is perfect, −2 orthogonal (the default reward)."""
    return [-float(x) for x in metrics.mse_nrm(reconstructions, vectors)]


def neg_log_mse(vectors: torch.Tensor, explanations: Sequence[str | None], reconstructions: torch.Tensor,
                **ctx: Any) -> list[float]:
    """``−log mse_nrm``: keeps a gradient signal once rollouts are already close (mse ≪ 1)."""
    # The floor keeps a perfect reconstruction finite instead of +inf.
    return [-math.log(max(float(x), 1e-6)) for x in metrics.mse_nrm(reconstructions, vectors)]


def _wrong_rows(groups: Sequence[int], seed: int) -> list[int]:
    """For each rollout, a row of a *different* group (rows of one group share their vector)."""
    ids = sorted(set(groups))
    if len(ids) < 2:
        raise NLAError("contrastive reward needs at least 2 different vectors per batch (raise --batch-size)")
    gen = torch.Generator().manual_seed(seed)
    # A random non-identity shift of the group ids is a derangement: no group maps to itself.
    shift = int(torch.randint(1, len(ids), (1,), generator=gen))
    first_row = {g: groups.index(g) for g in ids}
    pos = {g: i for i, g in enumerate(ids)}
    return [first_row[ids[(pos[g] + shift) % len(ids)]] for g in groups]


def contrastive(vectors: torch.Tensor, explanations: Sequence[str | None], reconstructions: torch.Tensor,
                **ctx: Any) -> list[float]:
    """``score(correct) − score(wrong)`` with ``score = −mse_nrm`` and the wrong vector another group's.

    Rewards what is *specific* to the vector: an explanation that reconstructs every vector
    equally well (a generic one) scores 0.
    """
    groups = list(ctx.get("groups") or range(len(vectors)))
    wrong = vectors[_wrong_rows(groups, int(ctx.get("seed", 0)) + int(ctx.get("step", 0)))]
    right = metrics.mse_nrm(reconstructions, vectors)
    other = metrics.mse_nrm(reconstructions, wrong)
    return [float(o - r) for o, r in zip(other, right)]


def length_penalty(per_token: float = 0.01, free_tokens: int = 0) -> RewardFn:
    """A reward of ``−per_token × max(0, answer tokens − free_tokens)`` (add it to another)."""

    def penalty(vectors: torch.Tensor, explanations: Sequence[str | None], reconstructions: torch.Tensor,
                **ctx: Any) -> list[float]:
        lengths = ctx.get("lengths")
        if lengths is None:  # called outside the trainer: count words
            lengths = [len((e or "").split()) for e in explanations]
        return [-per_token * max(0, int(n) - free_tokens) for n in lengths]

    return penalty


BUILTIN: dict[str, RewardFn] = {
    "neg_mse": neg_mse,
    "neg_log_mse": neg_log_mse,
    "contrastive": contrastive,
}


def resolve_reward(spec: str | RewardFn) -> RewardFn:
    """A built-in name (``neg_mse``, ``neg_log_mse``, ``contrastive``) or ``module:function``."""
    if callable(spec):
        return spec
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise NLAError(f"unknown reward {spec!r}: use one of {', '.join(BUILTIN)} or module:function")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NLAError(f"reward {spec!r}: cannot import module {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise NLAError(f"reward {spec!r}: {module_name} has no callable {attr!r}")
    return fn  # type: ignore[no-any-return]


def score_rollouts(
    rewards: Sequence[tuple[RewardFn, float]],
    vectors: torch.Tensor,
    explanations: Sequence[str | None],
    reconstructions: torch.Tensor,
    *,
    invalid: Sequence[bool] | None = None,
    invalid_reward: float | None = INVALID_REWARD,
    **ctx: Any,
) -> list[float]:
    """Weighted sum of the rewards; ``invalid_reward`` for rows flagged invalid (None: no floor).

    A reward returning the wrong count or a NaN/inf is an error naming the reward: a silent
    NaN advantage would turn the whole group's gradient into NaN.
    """
    n = len(explanations)
    total = [0.0] * n
    for fn, weight in rewards:
        values = list(fn(vectors, explanations, reconstructions, **ctx))
        name = getattr(fn, "__name__", repr(fn))
        if len(values) != n:
            raise NLAError(f"reward {name} returned {len(values)} values for {n} rollouts")
        for i, v in enumerate(values):
            v = float(v)
            if not math.isfinite(v):
                raise NLAError(f"reward {name} returned {v} for rollout {i}")
            total[i] += weight * v
    if invalid_reward is not None and invalid is not None:
        total = [invalid_reward if bad else t for t, bad in zip(total, invalid)]
    return total


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, divided by the group's std (optional).

    A group whose rollouts all score the same gets zero advantage: it carries no preference.
    """
    if rewards.numel() % group_size:
        raise NLAError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(-1, keepdim=True)
    if normalize_std and group_size > 1:
        centred = centred / (r.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)
