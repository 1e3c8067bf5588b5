"""RL rollout generation: batched (one ``generate`` call, KV cache) vs one sequence at a time.

Both sides run the same AV, vectors, seed and sampling settings in the same process; the ratio
is what to read (absolute times depend on the machine and its load). Also times one full GRPO
step and prints the share of each phase (generate / reward / update / AR).

    .venv/bin/python benchmarks/rl.py [--model tiny:llama] [--vectors 8] [--group 4] [--tokens 24]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from nla.bundle import NLA, LoraSettings
from nla.train.generation import SamplingSettings, TransformersBackend
from nla.train.rl import RLConfig, RLTrainer


def _time(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny:llama")
    ap.add_argument("--vectors", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        from nla.data.extract import ExtractConfig, extract

        data = Path(tmp) / "data"
        extract(ExtractConfig(out=str(data), model=args.model, docs=30, positions_per_doc=4, min_position=8,
                              seq_len=96, batch_size=8, device="cpu"))
        nla = NLA.initialize(dataset=str(data), lora=LoraSettings(r=8))
        bundle = Path(tmp) / "init"
        nla.save_pretrained(bundle)
        vecs = torch.randn(args.vectors, nla.meta.d_model, generator=torch.Generator().manual_seed(0))
        backend = TransformersBackend(nla.verbalizer)
        n_seq = args.vectors * args.group
        batched = SamplingSettings(max_new_tokens=args.tokens, batch_size=n_seq)
        single = SamplingSettings(max_new_tokens=args.tokens, batch_size=1)
        t_batched = _time(lambda: backend.generate(vecs, args.group, batched, seed=0), args.repeats)
        t_single = _time(lambda: backend.generate(vecs, args.group, single, seed=0), args.repeats)
        print(f"rollouts: {n_seq} sequences x <= {args.tokens} tokens on {args.model}, {args.threads} thread(s)")
        print(f"  sequential {t_single:.3f} s   batched {t_batched:.3f} s   speed-up {t_single / t_batched:.2f}x")

        cfg = RLConfig(nla=str(bundle), data=str(data), out=str(Path(tmp) / "run"), batch_size=args.vectors,
                       group_size=args.group, max_new_tokens=args.tokens, eval_rows=0, progress=False)
        trainer = RLTrainer(cfg)
        trainer.step(0)  # warm-up
        rec = trainer.step(1)
        phases = {k: rec[f"sec_{k}"] for k in ("generate", "reward", "update", "ar")}
        total = sum(phases.values())
        shares = "  ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in phases.items())
        print(f"one GRPO step ({n_seq} rollouts): {total:.3f} s   {shares}")


if __name__ == "__main__":
    main()
