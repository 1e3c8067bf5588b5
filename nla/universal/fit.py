"""Least-squares linear maps between activation spaces (docs/design.md §9), fp32 on the CPU.

``Y ≈ X W + b`` is solved with centred inputs (the bias is then the mean offset, never
penalised) by LAPACK ``gelsy``: rank-revealing QR, so a rank-deficient ``X`` (fewer passages
than dimensions, or dead dimensions) gives the minimum-norm answer instead of garbage.
``gelsd`` is refused: its SVD path is known to crash on some inputs. The normal equations are
not used either: forming ``XᵀX`` squares the condition number, and activations are anisotropic
enough (a few dimensions 100× the rest) for that to lose most fp32 digits.

Ridge: ``ridge`` is relative (λ = ridge × the mean per-dimension energy of the centred X), so
one value means the same thing for a 32-wide tiny model and a 4096-wide one. It is applied
by appending ``sqrt(λ) I`` rows, which keeps the solve in the same rank-revealing driver.

Every fit reports :func:`nla.metrics.summarize` (``fve_nrm`` headline) on its training rows and
on held-out passages, with μ the normalised mean of the training targets (docs/design.md §6).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nla import metrics
from nla.errors import NLAError

DRIVERS = ("gelsy", "gelss", "gels")


@dataclass
class FitResult:
    """A fitted ``nn.Linear`` (fp32) and how well it fits."""

    layer: nn.Linear
    train: dict[str, float]
    heldout: dict[str, float] = field(default_factory=dict)
    rank: int | None = None
    seconds: float = 0.0

    def report(self) -> dict[str, Any]:
        return {"d_in": self.layer.in_features, "d_out": self.layer.out_features, "rank": self.rank,
                "seconds": round(self.seconds, 4), "train": self.train, "heldout": self.heldout}


def solve(x: torch.Tensor, y: torch.Tensor, *, ridge: float = 0.0, driver: str = "gelsy") -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """``(W [d_in, d_out], b [d_out], rank)`` minimising ``||x W + b − y||² + λ||W||²``."""
    if driver == "gelsd":
        raise NLAError("driver 'gelsd' is known to crash on some inputs; use gelsy (default) or gelss")
    if driver not in DRIVERS:
        raise NLAError(f"unknown least-squares driver {driver!r}; choose one of {', '.join(DRIVERS)}")
    if ridge < 0:
        raise NLAError(f"ridge must be ≥ 0, got {ridge}")
    x = torch.as_tensor(x).detach().float().cpu()
    y = torch.as_tensor(y).detach().float().cpu()
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise NLAError(f"least squares needs paired 2-D inputs, got {tuple(x.shape)} and {tuple(y.shape)}")
    if len(x) < 2:
        raise NLAError(f"least squares needs at least 2 paired rows, got {len(x)}")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise NLAError("least squares inputs contain NaN/inf")
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    if ridge > 0:
        lam = ridge * float((xc * xc).sum(0).mean())
        xc = torch.cat([xc, (lam**0.5) * torch.eye(x.shape[1])])
        yc = torch.cat([yc, torch.zeros(x.shape[1], y.shape[1])])
    # gels assumes full rank and has no rank output; the others report it.
    sol = torch.linalg.lstsq(xc, yc, driver=driver)
    w = sol.solution
    if not torch.isfinite(w).all():
        raise NLAError(f"least squares ({driver}) gave NaN/inf; try --ridge 1e-3 or driver gelsy")
    rank = int(sol.rank) if sol.rank is not None and sol.rank.numel() else None
    return w, my - mx @ w, rank


def to_linear(w: torch.Tensor, b: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(w.shape[0], w.shape[1], bias=True, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(w.T)
        layer.bias.copy_(b)
    return layer.eval()


def score(pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor) -> dict[str, float]:
    """The standard metric block (the one implementation in :mod:`nla.metrics`), or {} for < 2 rows."""
    if len(target) < 2:
        return {}
    return {k: float(v) for k, v in metrics.summarize(pred, target, mean).items()}


def fit_linear(x: torch.Tensor, y: torch.Tensor, x_heldout: torch.Tensor | None = None,
               y_heldout: torch.Tensor | None = None, *, ridge: float = 0.0, driver: str = "gelsy") -> FitResult:
    """Fit ``y ≈ layer(x)`` and score it on the training rows and (if given) held-out rows."""
    from nla.data.store import normalized_mean

    started = time.perf_counter()
    w, b, rank = solve(x, y, ridge=ridge, driver=driver)
    seconds = time.perf_counter() - started
    layer = to_linear(w, b)
    mean = normalized_mean(torch.as_tensor(y).float())
    with torch.no_grad():
        train = score(layer(torch.as_tensor(x).float()), torch.as_tensor(y).float(), mean)
        held: dict[str, float] = {}
        if x_heldout is not None and y_heldout is not None and len(x_heldout):
            held = score(layer(torch.as_tensor(x_heldout).float()), torch.as_tensor(y_heldout).float(), mean)
    return FitResult(layer, train, held, rank, seconds)


def identity_fit(d: int) -> FitResult:
    """The anchor's own map: its space is the shared space."""
    from nla.models.reconstructor import identity_head

    return FitResult(identity_head(d), {"fve_nrm": 1.0}, {"fve_nrm": 1.0}, d, 0.0)
