"""Extraction speed: our early-exit path against two baselines measured in the same run.

    python benchmarks/extract.py [--model default] [--layer 20] [--docs 64] [--seq-len 512]
                                 [--batch-size 8] [--rounds 3]

All three methods run over exactly the same padded batches (the ones ``nla extract`` builds:
documents tokenized, sorted by length, batched), interleaved round by round so a noisy machine
slows all three alike; each figure is the median of ``--rounds`` timed passes after a warm-up.

* **ours** — :class:`nla.models.forward.BlockOutput` + :func:`block_states`, the code ``nla
  extract`` runs: a hook on block K raises, so later blocks, the final norm and the LM head
  never run.
* **floor** — a copy of the model truncated to blocks 0..K (:func:`truncate_blocks`), called
  as a bare backbone forward: the least work that yields block K's output. Target: ours/floor
  ≤ 1.10.
* **full** — the common approach: a full forward with ``output_hidden_states=True``, reading
  ``hidden_states[K + 1]``. Target: full/ours ≈ n_layers / (K + 1) (more with the LM head).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from nla.data.corpus import load_corpus
from nla.models.forward import BlockOutput, block_states, pad_batch
from nla.models.layers import default_layer, num_layers, truncate_blocks
from nla.models.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--layer", type=int, default=None, help="layer K (default (2*n_layers)//3)")
    ap.add_argument("--corpus", default="builtin")
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    model, tok = load_model(args.model, device=device)
    n_layers = num_layers(model.config)
    layer = default_layer(n_layers) if args.layer is None else args.layer
    trunk = truncate_blocks(copy.deepcopy(model), layer)
    backbone: Any = trunk.base_model  # the decoder stack without the LM head, whatever its name

    docs = load_corpus(args.corpus, max_docs=args.docs)
    seqs = [tok(d.text, truncation=True, max_length=args.seq_len)["input_ids"] for d in docs]
    seqs.sort(key=len)  # as nla extract does within a shard
    batches = [seqs[i : i + args.batch_size] for i in range(0, len(seqs), args.batch_size)]
    pad_id = tok.pad_token_id
    padded = []
    for b in batches:
        ids, mask = pad_batch(b, pad_id)
        padded.append((ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp(min=0).to(device)))
    n_tokens = sum(len(s) for s in seqs)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    runner = BlockOutput(model, layer)

    def ours(which: range) -> None:
        with runner:
            for i in which:
                block_states(runner, batches[i], pad_id, device)

    @torch.no_grad()
    def floor(which: range) -> None:
        for i in which:
            ids, mask, pos = padded[i]
            backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)

    @torch.no_grad()
    def full(which: range) -> None:
        for i in which:
            ids, mask, pos = padded[i]
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                        output_hidden_states=True)
            out.hidden_states[layer + 1].float().cpu()

    # Sanity: the three methods read the same vectors (first batch, right padding).
    with runner:
        got = block_states(runner, batches[0], pad_id, device)
    with torch.no_grad():
        ids, mask, pos = padded[0]
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                    output_hidden_states=True).hidden_states[layer + 1].float().cpu()
    for i, s in enumerate(batches[0]):
        err = float((got[i] - ref[i, : len(s)]).norm() / ref[i, : len(s)].norm())
        assert err < 1e-4, f"ours differs from hidden_states[K+1] (rel err {err:.2e})"

    methods: dict[str, Callable[[range], None]] = {"ours": ours, "floor": floor, "full": full}
    times: dict[str, list[float]] = {name: [] for name in methods}
    every = range(len(batches))
    for fn in methods.values():  # warm-up (lazy init, allocator) on the longest batch
        fn(range(len(batches) - 1, len(batches)))
        sync()
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn(every)
            sync()
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}/{args.rounds} {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    med = {name: statistics.median(t) for name, t in times.items()}

    print(f"model {args.model}: {n_layers} blocks, d={model.config.hidden_size}, layer K={layer}")
    print(f"{len(seqs)} docs, {n_tokens} tokens, {len(batches)} batches of ≤{args.batch_size}, "
          f"seq-len ≤{args.seq_len}, device {device}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    for name in methods:
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:6s} median {med[name]:7.2f} s  ({n_tokens / med[name]:8,.0f} tok/s)  runs: {runs}")
    print(f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after the timed rounds")
    print(f"ours / floor = {med['ours'] / med['floor']:.3f}   (target ≤ 1.10)")
    print(f"full / ours  = {med['full'] / med['ours']:.3f}   (n_layers/(K+1) = {n_layers / (layer + 1):.3f}; "
          "the full forward also runs the final norm and LM head)")


if __name__ == "__main__":
    main()
