"""Serving throughput: micro-batching against one-model-call-per-request, measured in the same run.

    python benchmarks/serve.py [--nla RUN | --model tiny:llama] [--requests 96] [--concurrency 32]
                               [--max-new-tokens 16] [--endpoint verbalize|explain|reconstruct] [--rounds 2]

Two real uvicorn servers on loopback ports serve the same loaded bundle, one after the other:

* **batched** — ``nla serve`` as shipped: requests arriving within ``--max-wait-ms`` of each
  other (or while the model is busy) share one ``generate`` / reconstruct call;
* **unbatched** — ``nla serve --no-batching``: every request is its own model call (model calls
  are serialised in both cases: one model thread).

Each is loaded by ``--concurrency`` clients sending ``--requests`` requests in total (greedy,
fixed ``--max-new-tokens``); the figure is requests per second, the median over ``--rounds``
interleaved rounds after a warm-up. A third line, **sequential**, sends the same requests one at
a time to the batched server (what a single notebook user sees). Prints batched / unbatched.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from typing import Any

import torch

from nla.bundle import NLA
from nla.serve import AsyncClient, ServeConfig, create_app, running_server


async def _load(url: str, payloads: list[Any], endpoint: str, concurrency: int, max_new_tokens: int) -> float:
    """Requests per second with ``concurrency`` requests in flight at any time."""
    sem = asyncio.Semaphore(concurrency)
    async with AsyncClient(url, timeout=600) as c:

        async def one(p: Any) -> None:
            async with sem:
                if endpoint == "verbalize":
                    await c.verbalize(p, max_new_tokens=max_new_tokens)
                elif endpoint == "explain":
                    await c.explain(p, positions=[-1], max_new_tokens=max_new_tokens)
                else:
                    await c.reconstruct([p])

        start = time.perf_counter()
        await asyncio.gather(*(one(p) for p in payloads))
        return len(payloads) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nla", default=None, help="bundle folder (default: an untrained bundle of --model)")
    ap.add_argument("--model", default="tiny:llama", help="base model for the untrained bundle")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-batch-rows", type=int, default=64)
    ap.add_argument("--endpoint", default="verbalize", choices=["verbalize", "explain", "reconstruct"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--torch-threads", type=int, default=0, help="torch threads in the model thread (0: default)")
    args = ap.parse_args()

    nla = NLA.from_pretrained(args.nla, device=args.device) if args.nla else NLA.initialize(args.model,
                                                                                          device=args.device)
    d = nla.meta.d_model
    gen = torch.Generator().manual_seed(0)
    if args.endpoint == "verbalize":
        payloads: list[Any] = [torch.randn(1, d, generator=gen).tolist() for _ in range(args.requests)]
    elif args.endpoint == "explain":
        payloads = [f"Request number {i} asks about the weather in town." for i in range(args.requests)]
    else:
        payloads = [f"an explanation about topic {i} and its details" for i in range(args.requests)]
    limits = dict(max_new_tokens=max(args.max_new_tokens, 1), max_batch_rows=args.max_batch_rows,
                  max_wait_ms=args.max_wait_ms, timeout_s=600.0, torch_threads=args.torch_threads)

    results: dict[str, list[float]] = {"batched": [], "unbatched": [], "sequential": []}
    with running_server(create_app(nla, ServeConfig(batching=True, **limits))) as batched:  # type: ignore[arg-type]
        # Warm-up: first calls pay for allocator growth and lazy initialisation.
        asyncio.run(_load(batched, payloads[: min(8, len(payloads))], args.endpoint, 8, args.max_new_tokens))
        for _ in range(args.rounds):
            results["batched"].append(
                asyncio.run(_load(batched, payloads, args.endpoint, args.concurrency, args.max_new_tokens)))
            results["sequential"].append(
                asyncio.run(_load(batched, payloads[: max(args.requests // 4, 4)], args.endpoint, 1,
                                  args.max_new_tokens)))
            with running_server(create_app(nla, ServeConfig(batching=False, **limits))) as unbatched:  # type: ignore[arg-type]
                results["unbatched"].append(
                    asyncio.run(_load(unbatched, payloads, args.endpoint, args.concurrency, args.max_new_tokens)))

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {nla.device}")
    print(f"torch threads in the model thread: {args.torch_threads or torch.get_num_threads()}")
    print(f"bundle: {nla.meta.base_model} d={d}; endpoint /v1/{args.endpoint}; {args.requests} requests, "
          f"concurrency {args.concurrency}, max_new_tokens {args.max_new_tokens}, rounds {args.rounds}")
    for name in ("batched", "unbatched", "sequential"):
        runs = ", ".join(f"{x:.2f}" for x in results[name])
        print(f"{name:>10}: {med[name]:8.2f} req/s   (rounds: {runs})")
    print(f"ratio batched/unbatched: {med['batched'] / med['unbatched']:.2f}x")
    print(f"ratio batched/sequential: {med['batched'] / med['sequential']:.2f}x")


if __name__ == "__main__":
    main()
