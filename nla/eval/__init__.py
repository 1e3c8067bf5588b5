"""Evaluation (`nla eval`): metrics, baselines, faithfulness probes and the HTML report."""

from nla.eval.suite import SCHEMA_VERSION, EvalConfig, EvalResult, evaluate, run_eval

__all__ = ["SCHEMA_VERSION", "EvalConfig", "EvalResult", "evaluate", "run_eval"]
