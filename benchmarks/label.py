"""Labeling throughput against a local teacher with a fixed latency.

With every request taking L seconds and C requests in flight, no client can beat C/L requests
per second. This runs `nla label` (cache commits, parsing, shard writes and all) against the
fake teacher server (a separate process, answering after exactly L s) and prints the achieved
rate as a fraction of C/L; the same ratio for a bare httpx loop with the same concurrency,
measured in the same run, shows how much of any gap is the client machine itself.

    .venv/bin/python benchmarks/label.py --latency 0.2 --concurrency 32 --rows 1600
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_dataset(path: Path, rows: int) -> None:
    """A text-only dataset (random vectors): the benchmark measures the client, not a model."""
    from nla.data.store import ActivationDataset, make_table, shard_name, write_table
    from nla.meta import DatasetMeta, write_yaml

    path.mkdir(parents=True)
    per_shard = 256
    rng = np.random.default_rng(0)
    for s, start in enumerate(range(0, rows, per_shard)):
        n = min(per_shard, rows - start)
        cols = {
            "doc_id": [f"doc{(start + i) // 4}" for i in range(n)],
            "position": [i % 4 for i in range(n)],
            "context": [f"Passage number {start + i}: the quick brown fox jumps over dog {start + i}" for i in range(n)],
            "split": ["av_sft"] * n,
        }
        write_table(path / shard_name(s), make_table(cols, rng.standard_normal((n, 8)).astype(np.float32), 8))
    meta = DatasetMeta(base_model="none", layer_index=0, d_model=8, n_layers=1, corpus="bench",
                       sampling={}, split_fractions={"av_sft": 1.0})
    write_yaml(path / "nla_meta.yaml", meta.to_dict())
    ActivationDataset.open(path).finalize_stats()


async def bare_client(url: str, n: int, concurrency: int) -> float:
    """Requests/s of a plain httpx loop: no cache, no parsing, no dataset."""
    import httpx

    from nla.label.prompt import build_messages

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                body = {"model": "fake-teacher", "messages": build_messages(f"bare request {i}")}
                (await client.post(f"{url}/v1/chat/completions", json=body)).raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - start)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per request (L)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (C)")
    parser.add_argument("--rows", type=int, default=1600, help="rows to label")
    args = parser.parse_args()

    import httpx  # noqa: F401 — imported before the clock starts: a one-time cost, not throughput

    from nla.label.runner import LabelConfig, label

    server = subprocess.Popen(
        [sys.executable, "-m", "nla.label.testing", str(args.latency)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = server.stdout.readline() if server.stdout else ""
        match = re.search(r"(http://[\d.:]+)/v1", line)
        if not match:
            raise SystemExit(f"fake server did not start: {line!r}")
        url = match.group(1)
        ideal = args.concurrency / args.latency
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            make_dataset(data, args.rows)
            os.environ.setdefault("OPENAI_API_KEY", "sk-benchmark-not-a-real-key")
            cfg = LabelConfig(data=str(data), teacher="openai:fake-teacher", base_url=f"{url}/v1",
                              concurrency=args.concurrency, progress=False, timeout=30)
            start, cpu0 = time.perf_counter(), _cpu()
            summary = label(cfg)
            elapsed, cpu = time.perf_counter() - start, _cpu() - cpu0
            assert summary.labelled == args.rows, summary
        rate = summary.requests / elapsed
        bare = asyncio.run(bare_client(url, args.rows, args.concurrency))
    finally:
        server.terminate()
        server.wait()
    print(f"machine: {os.cpu_count()} CPU cores; L = {args.latency} s, C = {args.concurrency}, "
          f"{args.rows} rows; ideal C/L = {ideal:.1f} req/s")
    print(f"bare httpx loop : {bare:7.1f} req/s  ratio {bare / ideal:.2f}")
    print(f"nla label       : {rate:7.1f} req/s  ratio {rate / ideal:.2f}  (target >= 0.80)")
    per = cpu / max(summary.requests, 1)
    print(f"nla label client CPU: {per * 1e3:.2f} ms per request, so one event-loop core "
          f"caps it near {1 / per:.0f} req/s; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
