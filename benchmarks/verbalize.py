"""Batched verbalization vs one-at-a-time generation on the embedded default (SmolLM2-135M).

    .venv/bin/python benchmarks/verbalize.py [--vectors 64] [--max-new-tokens 32] [--batch-size 64]

An untrained ``NLA.initialize('default')`` bundle (fp32, greedy) verbalizes real block-K
activations of the built-in corpus twice: one ``generate`` call per vector (the baseline) and
batches of ``--batch-size`` vectors in one left-padded ``generate`` each. Prints both wall
times, the speed-up, and how many rows decode to identical tokens. Where a row differs, it
reports the first differing step and the top-2 logit margin of the single-row run there, so
float noise (a near-tie flipped by a different matmul blocking) can be told from a bug.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from nla.bundle import NLA
from nla.data.corpus import builtin_documents


def activations(nla: NLA, n: int) -> torch.Tensor:
    """``n`` block-K states from corpus documents, a few positions per document, past position 8."""
    rows: list[torch.Tensor] = []
    for doc in builtin_documents():
        ids = nla.tokenizer.encode(doc.text, add_special_tokens=True)[:96]
        if len(ids) < 24:
            continue
        _, states = nla.base_states(nla.tokenizer.decode(ids, skip_special_tokens=True))
        rows.extend(states[8::17][:4])
        if len(rows) >= n:
            break
    return torch.stack(rows[:n]).float()


def first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


@torch.no_grad()
def margin_at(nla: NLA, vector: torch.Tensor, tokens: list[int], step: int) -> float:
    """Top-1 minus top-2 logit of the single-row run at generation step ``step``."""
    v = nla.verbalizer
    ids = torch.tensor([v.prompt_ids() + tokens[:step]])
    with v.injector(vector):
        logits = nla.av_model(input_ids=ids).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    nla = NLA.initialize("default", device="cpu")
    vecs = activations(nla, args.vectors)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"model {nla.meta.base_model}, layer {nla.meta.layer_index}, {len(vecs)} vectors, "
          f"{args.max_new_tokens} new tokens, greedy, fp32, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")

    nla.verbalize(vecs[:2], **gen)  # warm-up: first-call allocations are not the comparison

    start = time.perf_counter()
    singles = [nla.verbalize(v, **gen)[0][0] for v in vecs]
    t_single = time.perf_counter() - start

    start = time.perf_counter()
    batched = [row[0] for row in nla.verbalize(vecs, batch_size=args.batch_size, **gen)]
    t_batched = time.perf_counter() - start

    same = [a.token_ids == b.token_ids for a, b in zip(singles, batched)]
    print(f"one at a time: {t_single:8.2f} s  ({t_single / len(vecs):.3f} s/vector)")
    print(f"batched ({args.batch_size:>3}):  {t_batched:8.2f} s  ({t_batched / len(vecs):.3f} s/vector)")
    print(f"speed-up: {t_single / t_batched:.2f}x")
    print(f"identical greedy outputs: {sum(same)}/{len(same)}")
    for i, ok in enumerate(same):
        if ok:
            continue
        a, b = singles[i].token_ids, batched[i].token_ids
        step = first_difference(a, b)
        print(f"  row {i}: differs at step {step}; single-row top-2 margin there "
              f"{margin_at(nla, vecs[i], a, step):.2e}")
    print("sample:", repr(batched[0].raw[:120]))


if __name__ == "__main__":
    main()
