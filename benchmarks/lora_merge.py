"""AV generation with LoRA adapters merged into the weights vs left as adapters.

    .venv/bin/python benchmarks/lora_merge.py [--nla runs/default/sft] [--data runs/default/data]
        [--vectors 32] [--max-new-tokens 64] [--rounds 2]

`nla eval` merges a LoRA bundle's adapters when it loads it (``NLA.merge_adapters``): an
unmerged adapter adds two small matmuls to every adapted linear layer on every generated token.
This loads the bundle twice, verbalizes the same ``--vectors`` rows of the ``eval`` split
greedily with each (alternating, best of ``--rounds``), and prints both wall times, the
ratio, and how many rows decode to identical tokens (merging changes float rounding only).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from nla.bundle import NLA
from nla.data.store import ActivationDataset


def timed(nla: NLA, vectors: torch.Tensor, max_new_tokens: int, batch_size: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    outs = nla.verbalize(vectors, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return time.perf_counter() - start, [o[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nla", default="runs/default/sft", help="a bundle with LoRA adapters")
    ap.add_argument("--data", default="runs/default/data", help="its activation dataset")
    ap.add_argument("--vectors", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    vectors = ActivationDataset.open(args.data).vectors("eval")[: args.vectors]
    adapters = NLA.from_pretrained(args.nla, device="cpu")
    if adapters.meta.av_format != "peft":
        raise SystemExit(f"{args.nla}: the AV has no LoRA adapter to merge (format {adapters.meta.av_format})")
    merged = NLA.from_pretrained(args.nla, device="cpu")
    merged.merge_adapters()

    best = {"adapters": float("inf"), "merged": float("inf")}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.rounds):
        for name, nla in (("adapters", adapters), ("merged", merged)):
            seconds, tokens[name] = timed(nla, vectors, args.max_new_tokens, args.batch_size)
            best[name] = min(best[name], seconds)
    same = sum(a == b for a, b in zip(tokens["adapters"], tokens["merged"], strict=True))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.nla}: {len(vectors)} vectors x <= {args.max_new_tokens} tokens, batch {args.batch_size}, "
          f"best of {args.rounds}")
    print(f"  LoRA as adapters: {best['adapters']:.1f} s")
    print(f"  LoRA merged:      {best['merged']:.1f} s")
    print(f"  speed-up: {best['adapters'] / best['merged']:.2f}x; identical greedy outputs: {same}/{len(vectors)}")


if __name__ == "__main__":
    main()
