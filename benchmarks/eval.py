"""Eval throughput: the suite's batched round trip against one-vector-at-a-time, same run.

    python benchmarks/eval.py [--model tiny:llama|default] [--vectors 64] [--batch-size 32]
                              [--max-new-tokens 32] [--rounds 3]

Both paths run the code ``nla eval`` runs for its round trip — AV generation through
:func:`nla.eval.suite.generate_cached` (no cache) and :meth:`NLA.reconstruct` — over the same
vectors of a freshly extracted dataset with an untrained bundle:

* **batched** — ``--batch-size`` sequences per generation call and per AR forward (the default);
* **sequential** — batch size 1, the way a naive loop over ``NLA.round_trip`` would run.

Rounds alternate the two paths so a noisy (shared) machine slows both alike; the figure is
the median vectors/second over ``--rounds``. Prints the ratio batched / sequential.
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
from nla.eval.suite import EvalConfig, answer_text, generate_cached


def round_trip(nla: NLA, vectors: torch.Tensor, batch_size: int, max_new_tokens: int) -> float:
    """Seconds for one round trip of all vectors at this batch size."""
    cfg = EvalConfig(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
    keys = [str(i) for i in range(len(vectors))]
    start = time.perf_counter()
    answers = generate_cached(nla, vectors, keys, n=1, sample=False, cfg=cfg, cache_dir=None,
                              fingerprint="bench", desc="bench")
    nla.reconstruct([answer_text(a[0]) for a in answers], batch_size=batch_size)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--vectors", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        docs = max(8, args.vectors // 4 + 4)
        extract(ExtractConfig(out=str(data), model=args.model, docs=docs, positions_per_doc=4,
                              min_position=8, seq_len=256, device="cpu", split="eval=1"))
        vectors = ActivationDataset.open(data).vectors("eval")[: args.vectors]
        nla = NLA.initialize(dataset=data, device="cpu")
        round_trip(nla, vectors[:2], 2, 4)  # warm-up: first-call allocations, kernels
        batched, sequential = [], []
        for _ in range(args.rounds):
            batched.append(len(vectors) / round_trip(nla, vectors, args.batch_size, args.max_new_tokens))
            sequential.append(len(vectors) / round_trip(nla, vectors, 1, args.max_new_tokens))
    b, s = statistics.median(batched), statistics.median(sequential)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch threads {torch.get_num_threads()}, cuda={torch.cuda.is_available()}")
    print(f"model {args.model}, {len(vectors)} vectors, {args.max_new_tokens} new tokens, rounds {args.rounds}")
    print(f"batched (batch {args.batch_size}): {b:.2f} vectors/s")
    print(f"sequential (batch 1): {s:.2f} vectors/s")
    print(f"ratio batched/sequential: {b / s:.2f}x")


if __name__ == "__main__":
    main()
