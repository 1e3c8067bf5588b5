"""Baselines measured in the same run as the NLA, so every number has a floor next to it.

* **mean direction** — predict the training mean μ for every row. Because predictions are
  normalised, this is the best constant: ``fve_meannorm`` is 0 by construction (the suite
  checks it) and ``fve_nrm`` is negative — the floor a reconstruction must clear.
* **shuffled activations** — the AV's explanation of *another* row's vector, reconstructed
  and scored against this row's vector: what the pipeline gets from explanations that are
  fluent but about the wrong thing. Built in :mod:`nla.eval.suite` from the round trip itself.
* **bag-of-words ridge** (:class:`BowRidge`) — a text-only linear map from word counts of an
  explanation to the vector, fit on the ``ar_sft`` split's teacher labels: how much the LM
  reconstructor adds over reading the words alone.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

import torch

from nla import metrics

_TOKEN = re.compile(r"[a-z0-9']+")
LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def bag_of_words(text: str) -> Counter[str]:
    return Counter(_TOKEN.findall(text.lower()))


def mean_direction(mean: torch.Tensor, n: int) -> torch.Tensor:
    """The constant prediction μ for ``n`` rows."""
    return mean.float().unsqueeze(0).expand(n, -1).clone()


def _holdout(key: str) -> bool:
    """A stable 1-in-5 holdout by document (a row-level split would leak between positions)."""
    return hashlib.sha256(key.encode()).digest()[0] % 5 == 0


@dataclass
class BowRidge:
    """Ridge regression from ``log1p`` word counts (+ bias) to the normalised vector."""

    vocab: dict[str, int]
    weight: torch.Tensor  # [len(vocab) + 1, d]; the last row is the bias
    lam: float
    train_rows: int

    def features(self, texts: list[str]) -> torch.Tensor:
        x = torch.zeros((len(texts), len(self.vocab) + 1), dtype=torch.float64)
        x[:, -1] = 1.0
        for i, t in enumerate(texts):
            for w, c in bag_of_words(t).items():
                j = self.vocab.get(w)
                if j is not None:
                    x[i, j] = torch.log1p(torch.tensor(float(c), dtype=torch.float64))
        return x

    def predict(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros((0, self.weight.shape[1]))
        return (self.features(texts) @ self.weight).float()

    @staticmethod
    def _solve(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
        reg = torch.eye(x.shape[1], dtype=x.dtype) * lam
        reg[-1, -1] = 1e-8  # the bias is not shrunk: the mean direction is free
        return torch.linalg.solve(x.T @ x + reg, x.T @ y)

    @classmethod
    def fit(cls, texts: list[str], vectors: torch.Tensor, groups: list[str], max_vocab: int = 4096) -> BowRidge:
        """Fit on ``texts`` → ``vectors``; λ chosen on a by-document holdout, then refit on all."""
        df: Counter[str] = Counter()
        for t in texts:
            df.update(set(bag_of_words(t)))
        # Words seen in one document only cannot generalise; they would just memorise rows.
        words = [w for w, c in df.most_common(max_vocab) if c >= 2] or [w for w, _ in df.most_common(max_vocab)]
        model = cls({w: i for i, w in enumerate(words)}, torch.zeros(0), 0.0, len(texts))
        x = model.features(texts)
        y = metrics.normalize(vectors).double()
        held = torch.tensor([_holdout(g) for g in groups])
        best = LAMBDAS[len(LAMBDAS) // 2]
        if 0 < int(held.sum()) < len(texts):
            scores = {}
            for lam in LAMBDAS:
                w = cls._solve(x[~held], y[~held], lam)
                scores[lam] = float(metrics.mse_nrm((x[held] @ w).float(), vectors[held]).mean())
            best = min(scores, key=lambda k: scores[k])
        model.weight = cls._solve(x, y, best)
        model.lam = best
        return model
