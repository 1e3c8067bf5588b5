"""Least-squares fit for enc/dec maps: gelsy (what `nla universal fit-enc` uses) vs the naive
normal equations (solve XᵀX W = XᵀY) and vs gelss (SVD), on anisotropic activation-like data.

Prints time and held-out fve_nrm for each, and the ratios against gelsy measured in this run.
The normal equations square the condition number; with a few dimensions 100× the rest (as in
real residual streams) fp32 loses most digits there.

    .venv/bin/python benchmarks/universal.py [--rows 4000] [--d-in 640] [--d-out 576] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from nla import metrics
from nla.data.store import normalized_mean
from nla.universal.fit import solve


def data(rows: int, d_in: int, d_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -3, d_in)  # anisotropic: singular values over three decades
    scales[:4] = 100.0  # a few massive dimensions, like residual-stream outliers
    x = torch.randn(rows, d_in, generator=gen) * scales + 5.0
    w = torch.randn(d_in, d_out, generator=gen) / d_in**0.5
    y = x @ w + 0.01 * torch.randn(rows, d_out, generator=gen)
    return x, y


def normal_equations(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    w = torch.linalg.solve(xc.T @ xc, xc.T @ yc)
    return w, my - mx @ w


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--d-in", type=int, default=640)
    ap.add_argument("--d-out", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    x, y = data(args.rows, args.d_in, args.d_out)
    n = int(0.8 * len(x))
    mean = normalized_mean(y[:n])
    methods = {
        "gelsy": lambda: solve(x[:n], y[:n], driver="gelsy")[:2],
        "gelss": lambda: solve(x[:n], y[:n], driver="gelss")[:2],
        "normal-eq": lambda: normal_equations(x[:n], y[:n]),
    }
    results = {}
    for name, fn in methods.items():
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            w, b = fn()
            times.append(time.perf_counter() - t)
        fve = metrics.fve_nrm(x[n:] @ w + b, y[n:], mean)
        results[name] = (min(times), fve)
    base_t, _ = results["gelsy"]
    print(f"rows={args.rows} d_in={args.d_in} d_out={args.d_out} torch threads={torch.get_num_threads()}")
    for name, (t, fve) in results.items():
        print(f"{name:<10} {t * 1000:9.1f} ms   time/gelsy {t / base_t:5.2f}x   held-out fve_nrm {fve:.6f}")


if __name__ == "__main__":
    main()
