"""The metrics of docs/design.md §6 — the one implementation used by training, eval and serving.

All maths runs in fp32 whatever the model dtype, with ``eps`` inside the square root so a
zero vector gives a finite answer instead of NaN.

With ``v̂ = sqrt(d) * v / ||v||``:

* ``mse_nrm(p, v) = (1/d) ||p̂ − v̂||² = 2 (1 − cos(p, v))``, range 0..4, orthogonal = 2
* ``fve_nrm = 1 − mean mse_nrm / B`` with ``B = mean (1/d) ||v̂ − μ||²`` (μ: training mean of v̂)
* ``fve_meannorm``: the same with μ replaced by ``sqrt(d) μ / ||μ||``
"""

from __future__ import annotations

import torch

EPS = 1e-12


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v / ||v||`` along the last axis (fp32), the same for any scale; 0 for a zero vector.

    Only the direction matters, so each row is first divided by its largest |entry| (a
    constant, so no gradient flows through it): a norm-1e-30 vector gets its direction, not
    ~1e-24 from an eps that dwarfs its squared norm, and a norm-1e30 vector does not overflow
    its squared norm to inf (which would give 0).
    """
    v = v.float()
    scale = v.detach().abs().amax(-1, keepdim=True)
    v = v / torch.where(scale > 0, scale, torch.ones_like(scale))
    return v / torch.sqrt((v * v).sum(-1, keepdim=True) + EPS)


def normalize(v: torch.Tensor) -> torch.Tensor:
    """``sqrt(d) * v / ||v||`` along the last axis (fp32); see :func:`unit` for tiny and huge norms."""
    return unit(v) * (v.shape[-1] ** 0.5)


def mse_nrm(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row normalised MSE (0 = same direction, 2 = orthogonal, 4 = opposite).

    Differentiable: this is also the AR training loss.
    """
    diff = normalize(pred) - normalize(target)
    return (diff * diff).mean(-1)


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity (fp32; 0 for a zero vector).

    Each vector is normalised on its own (eps inside each sqrt), so ``mse_nrm == 2 (1 − cos)``
    holds exactly and small vectors are not biased: an eps on the *product* of the squared
    norms would shrink the cosine of two 1e-2-norm vectors by 1e-4.
    """
    d = pred.shape[-1]
    return (normalize(pred) * normalize(target)).sum(-1) / d


def baseline_variance(target: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``B = mean_i (1/d) ||v̂_i − μ||²``: the error of predicting the unnormalised mean μ."""
    diff = normalize(target) - mean.float().to(target.device)
    return (diff * diff).mean(-1).mean()


def fve_nrm(
    pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, baseline: torch.Tensor | float | None = None
) -> float:
    """Fraction of variance explained, the headline metric (stricter than ``fve_meannorm``).

    ``baseline``: a known B (for example the dataset's); by default B is computed over the
    rows given, which needs several rows to mean anything.
    """
    b = baseline_variance(target, mean) if baseline is None else torch.as_tensor(baseline, dtype=torch.float32)
    return float(1.0 - mse_nrm(pred, target).mean() / (b + EPS))


def fve_meannorm(pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor) -> float:
    """FVE against the *normalised* mean direction (looser; the best constant scores 0)."""
    mean_dir = normalize(mean.float().to(target.device).unsqueeze(0)).squeeze(0)
    return fve_nrm(pred, target, mean_dir)


def per_row_fve(
    pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, baseline: torch.Tensor | float | None = None
) -> torch.Tensor:
    """``1 − mse_nrm_i / B`` per row (B over the rows given), for histograms and breakdowns.

    ``baseline``: a B computed over a larger reference set (the server passes B over all of a
    text's positions, so one position's FVE does not depend on which others were asked for).
    """
    b = baseline_variance(target, mean) if baseline is None else torch.as_tensor(baseline, dtype=torch.float32)
    return 1.0 - mse_nrm(pred, target) / (b.to(pred.device) + EPS)


def top1_retrieval(pred: torch.Tensor, target: torch.Tensor, n_candidates: int = 16, seed: int = 0) -> float:
    """How often the true vector is the nearest (by cosine) of N candidates to the prediction.

    Candidates are the true vector plus ``N − 1`` other rows drawn at random (seeded).
    Chance level is ``1 / N``.
    """
    if len(target) < 2:
        return float("nan")
    return float(retrieval_hits(pred, target, n_candidates, seed).float().mean())


def retrieval_hits(pred: torch.Tensor, target: torch.Tensor, n_candidates: int = 16, seed: int = 0) -> torch.Tensor:
    """Per row of :func:`top1_retrieval`: was the true vector the nearest of its N candidates?

    Per-row hits let eval bootstrap the top-1 rate without resampling the candidate pools.
    """
    n = len(target)
    k = min(n_candidates, n)
    gen = torch.Generator().manual_seed(seed)
    p, t = normalize(pred), normalize(target)
    hits = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        others = torch.randperm(n - 1, generator=gen)[: k - 1]
        others = others + (others >= i).long()
        cands = torch.cat([t[i : i + 1], t[others]])
        sims = (cands @ p[i]) / p.shape[-1]
        hits[i] = bool(torch.argmax(sims).item() == 0)
    return hits


def shuffled_gap(pred: torch.Tensor, target: torch.Tensor, seed: int = 0) -> float:
    """Mean ``mse_nrm`` against a shuffled target minus against the true one (> 0: specific)."""
    n = len(target)
    if n < 2:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, n, (n,), generator=gen)
    wrong = (torch.arange(n) + shift) % n
    return float(mse_nrm(pred, target[wrong]).mean() - mse_nrm(pred, target).mean())


def summarize(
    pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, baseline: torch.Tensor | float | None = None
) -> dict[str, float]:
    """The standard metric block for a set of reconstructions (``baseline``: a known B)."""
    return {
        "fve_nrm": fve_nrm(pred, target, mean, baseline),
        "fve_meannorm": fve_meannorm(pred, target, mean),
        "mse_nrm": float(mse_nrm(pred, target).mean()),
        "cosine": float(cosine(pred, target).mean()),
        "n": len(target),
    }
