"""An `nla eval` report as a Hugging Face ``model-index`` block (the model-card metrics format).

Built with ``huggingface_hub``'s own :class:`EvalResult` and turned into the YAML structure by
its own :func:`eval_results_to_model_index`, then parsed back with
:func:`model_index_to_eval_results`: a block the hub cannot read fails here, not on upload.
`nla bench` writes one per NLA; `nla publish` puts it in the model card.
"""

from __future__ import annotations

from typing import Any

from nla.errors import NLAError
from nla.eval.report import lookup

# (task type, task name, [(metric type, dotted path in metrics.json, metric name)]).
TASKS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("nla-round-trip", "Activation round trip (AV → AR)", [
        ("fve_nrm", "round_trip.fve_nrm", "Round-trip FVE (fve_nrm, headline)"),
        ("fve_meannorm", "round_trip.fve_meannorm", "Round-trip FVE against the mean direction (fve_meannorm)"),
        ("mse_nrm", "round_trip.mse_nrm", "Round-trip normalised MSE"),
        ("cosine", "round_trip.cosine", "Round-trip cosine"),
        ("top1_retrieval", "round_trip.top1", "Top-1 retrieval among N candidates"),
        ("shuffled_gap", "round_trip.shuffled_gap", "Correct-vs-shuffled gap"),
        ("best_of_k_fve_nrm", "round_trip.best_of_k.fve_nrm", "Best-of-k round-trip FVE (oracle pick)"),
    ]),
    ("nla-reconstruction", "Reconstruction from teacher explanations (AR alone)", [
        ("fve_nrm", "ar_alone.fve_nrm", "AR-alone FVE (fve_nrm)"),
        ("top1_retrieval", "ar_alone.top1", "AR-alone top-1 retrieval"),
    ]),
    ("nla-causal-faithfulness", "Causal faithfulness (reconstruction patched at layer K)", [
        ("kl_fraction_recovered", "causal.fraction_recovered", "Fraction of next-token KL recovered vs mean ablation"),
        ("kl_reconstruction", "causal.kl.reconstruction", "KL(clean ‖ reconstruction patched), nats"),
    ]),
]


def eval_results(m: dict[str, Any], dataset_name: str, dataset_type: str, revision: str | None = None) -> list[Any]:
    """One :class:`huggingface_hub.EvalResult` per metric the report has (missing ones are left out)."""
    from huggingface_hub import EvalResult

    split = lookup(m, "dataset.split")
    out = []
    for task_type, task_name, rows in TASKS:
        for metric_type, path, metric_name in rows:
            value = lookup(m, path)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            out.append(EvalResult(
                task_type=task_type, task_name=task_name, dataset_type=dataset_type, dataset_name=dataset_name,
                dataset_split=split if isinstance(split, str) else None, dataset_revision=revision,
                metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 6),
                verified=False,
            ))
    return out


def model_index(name: str, m: dict[str, Any], dataset_name: str, dataset_type: str,
                revision: str | None = None) -> list[dict[str, Any]]:
    """The ``model-index`` list for one NLA, checked by parsing it back with huggingface_hub."""
    from huggingface_hub.repocard_data import (
        eval_results_to_model_index,
        model_index_to_eval_results,
    )

    results = eval_results(m, dataset_name, dataset_type, revision)
    if not results:
        raise NLAError(f"report for {name} has no metrics to put in a model-index (round_trip.fve_nrm missing?)")
    block: list[dict[str, Any]] = eval_results_to_model_index(name, results)
    parsed_name, parsed = model_index_to_eval_results(block)
    if parsed_name != name or len(parsed) != len(results):  # pragma: no cover - huggingface_hub contract
        raise NLAError(f"model-index for {name} does not parse back ({len(parsed)} of {len(results)} results)")
    return block
