"""`nla eval --nla RUN --data D --out REPORT` and `nla eval compare REPORT_A REPORT_B`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from nla.config import add_config_args, claim_output, resolve_config

# What `nla eval` writes into --out (nla/eval/suite.py, nla/eval/report.py).
EVAL_OWNED = ("eval_config.yaml", "cache", "metrics.json", "samples.jsonl", "index.html", "plots", "tensorboard")


def cmd_eval(args: argparse.Namespace) -> int:
    from nla.eval.report import fmt
    from nla.eval.suite import EvalConfig, run_eval

    if getattr(args, "eval_command", None) == "compare":
        return cmd_compare(args)
    cfg = resolve_config(EvalConfig, args, section="eval")
    out = Path(cfg.out) if cfg.out else None
    if out is not None:
        # The shared output guard: a report folder (eval's own, resumable from its cache) is
        # fine; a dataset never; any other non-empty folder only with --force.
        claim_output(out, command="eval", force=bool(getattr(args, "force", False)), resume=True, owned=EVAL_OWNED)
    fresh = out is not None and not out.exists()
    try:
        result = run_eval(cfg)
    except BaseException:
        # A report folder this run created holds nothing usable after a failure (bad input, a
        # damaged shard): remove it, so nothing half-made is left behind.
        if fresh and out is not None and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise
    m = result.metrics
    rt = m["round_trip"]
    print(f"{cfg.out}: {m['dataset']['rows_evaluated']} rows, round-trip fve_nrm={fmt(rt.get('fve_nrm'))} "
          f"top-1={fmt(rt.get('top1'))}, AR-alone fve_nrm={fmt(m['ar_alone'].get('fve_nrm'))}, "
          f"mean-direction fve_nrm={fmt(m['baselines']['mean_direction'].get('fve_nrm'))} "
          f"({m['timing_s']['total']:.1f} s); open {cfg.out}/index.html")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from nla.eval.report import compare_table, load_metrics

    a, b = load_metrics(args.report_a), load_metrics(args.report_b)
    print(compare_table(a, b, args.report_a, args.report_b))
    return 0


def register(sub: Any) -> None:
    from nla.eval.suite import EvalConfig

    p = sub.add_parser(
        "eval",
        help="evaluate a bundle on a dataset split: metrics.json, samples.jsonl, index.html",
        description="Evaluate an NLA bundle: AR alone, round trip, baselines, faithfulness probes, "
        "explanation quality, breakdowns; writes REPORT/metrics.json, samples.jsonl and index.html. "
        "The dataset's layer K (output of decoder block K, 0-based = hidden_states[K+1]) must be the bundle's. "
        "`nla eval compare A B` prints two reports side by side.",
    )
    add_config_args(p, EvalConfig)
    p.add_argument("--force", action="store_true", help="write the report into a non-empty folder that is not a "
                   "report (replaces only eval's own files)")
    p.set_defaults(func=cmd_eval)
    inner = p.add_subparsers(dest="eval_command", metavar="compare")
    c = inner.add_parser("compare", help="print the headline numbers of two reports side by side")
    c.add_argument("report_a", help="report folder (or its metrics.json)")
    c.add_argument("report_b", help="report folder (or its metrics.json)")
    c.set_defaults(func=cmd_eval)
