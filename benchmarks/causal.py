"""Causal block throughput: rows of one document sharing one prefix forward, against one
prefix forward per row, same run.

    python benchmarks/causal.py [--model tiny:llama|default] [--docs 6] [--positions 20]
                                [--seq-len 256] [--rounds 3]

Both paths run :func:`nla.eval.causal.causal_faithfulness` — what ``nla eval`` runs for its
causal block, with the shuffled control and three claims per explanation, so eight variants
per row — over every row of a freshly extracted dataset (``--positions`` rows per document,
as the default recipe samples them) with an untrained bundle and random reconstructions:

* **shared** — one forward over each document up to its last sampled row, its KV cache cut
  back to each row's prefix (the default);
* **per row** — ``share_prefix=False``: each row runs its own prefix forward (the path before).

Rounds alternate the two paths so a noisy (shared) machine slows both alike; the figure is
the median rows/second over ``--rounds``. Prints the ratio shared / per row and the largest
difference between the two paths' per-row KLs (float rounding only).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nla.bundle import NLA
from nla.data.extract import ExtractConfig, extract
from nla.data.store import ActivationDataset
from nla.eval.causal import CausalRows, causal_faithfulness


def run(nla: NLA, contexts: list[str], vectors: torch.Tensor, recon: torch.Tensor, mean: torch.Tensor,
        texts: list[str], share: bool) -> tuple[float, CausalRows]:
    """Seconds for the causal block over all rows, and its per-row results."""
    shuffled = torch.roll(torch.arange(len(vectors)), 1)
    start = time.perf_counter()
    _, rows = causal_faithfulness(nla, contexts, vectors, recon, mean, texts, shuffled=shuffled, share_prefix=share)
    return time.perf_counter() - start, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--positions", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        extract(ExtractConfig(out=str(data), model=args.model, docs=args.docs, positions_per_doc=args.positions,
                              min_position=8, seq_len=args.seq_len, device="cpu", split="eval=1"))
        ds = ActivationDataset.open(data)
        rows, vectors = ds.rows("eval"), ds.vectors("eval").float()
        nla = NLA.initialize(dataset=data, device="cpu")
        contexts = [r["context"] for r in rows]
        recon = torch.randn(vectors.shape, generator=torch.Generator().manual_seed(1))
        texts = ["Python code. A function call. Documentation text."] * len(rows)
        mean = ds.mean_vector()
        run(nla, contexts[:2], vectors[:2], recon[:2], mean, texts[:2], True)  # warm-up
        shared, per_row = [], []
        for _ in range(args.rounds):
            t, a = run(nla, contexts, vectors, recon, mean, texts, True)
            shared.append(len(rows) / t)
            t, b = run(nla, contexts, vectors, recon, mean, texts, False)
            per_row.append(len(rows) / t)
    diff = max((abs(x - y) / max(abs(y), 1e-9) for x, y in zip(a.kl_recon + a.kl_mean, b.kl_recon + b.kl_mean)
                if x is not None and y is not None), default=0.0)
    s, p = statistics.median(shared), statistics.median(per_row)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch threads {torch.get_num_threads()}, cuda={torch.cuda.is_available()}")
    print(f"model {args.model}, {len(rows)} rows of {args.docs} documents (seq_len {args.seq_len}), "
          f"rounds {args.rounds}; largest relative KL difference {diff:.1e}")
    print(f"shared prefix: {s:.2f} rows/s")
    print(f"per row: {p:.2f} rows/s")
    print(f"ratio shared/per row: {s / p:.2f}x")


if __name__ == "__main__":
    main()
