"""The stages of `nla run`, each a thin call into the stage's own module.

Every stage's settings are its config dataclass filled from (in order) its defaults, the run's
shared settings (model, layer, corpus, seed, device) and the stage's YAML section; the resolved
dict is what the stage's fingerprint covers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nla.config import config_from_dict
from nla.errors import NLAError
from nla.pipeline import RunConfig, Stage


def _resolve(cls: type, base: dict[str, Any], section: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in base.items() if k in names}
    values.update(section)
    return config_from_dict(cls, values, where=where, devices=False)


def _settings(cfg: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    # Paths and display-only switches do not change results, so they stay out of fingerprints.
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in drop}


def make_stages(cfg: RunConfig) -> list[Stage]:
    from nla.data.extract import ExtractConfig, extract
    from nla.eval.suite import EvalConfig, run_eval
    from nla.label.runner import LabelConfig, label
    from nla.train.sft import SFTConfig, train_sft

    work = Path(cfg.work_dir)
    data_dir, label_dir, sft_dir = work / "data", work / "label", work / "sft"
    rl_dir, eval_dir = work / "rl", work / "eval"
    shared = {"model": cfg.model, "layer": cfg.layer, "corpus": cfg.corpus, "seed": cfg.seed, "device": cfg.device}

    ex = _resolve(ExtractConfig, {**shared, "out": str(data_dir)}, cfg.extract, "extract")
    docs = ex.docs or 352
    stages = [
        Stage("extract", _settings(ex, ("out", "device", "batch_size")), lambda: extract(ex), data_dir,
              estimate_s=docs * 0.3, estimate_mb=docs * ex.positions_per_doc * 2.6 / 1000 * 4 + 1),
    ]

    # The request cache lives outside the stage folders so answers already paid for survive a
    # --rebuild of the dataset.
    lab = _resolve(LabelConfig, {"teacher": cfg.teacher, "device": cfg.device, "data": str(data_dir),
                                 "cache": str(work / "label_cache.sqlite")}, cfg.label, "label")

    def run_label() -> None:
        # A run with failed rows raises (unless label.allow_partial): the stage is not stamped,
        # so the next `nla run` resumes it and asks the teacher again for exactly those rows.
        label_dir.mkdir(parents=True, exist_ok=True)
        summary = label(lab)
        label_stage.counts = {"todo": summary.todo, "labelled": summary.labelled, "cached": summary.cached,
                              "failed": summary.failed}

    label_stage = Stage("label", _settings(lab, ("data", "device", "progress", "cache", "concurrency",
                                                 "allow_partial")),
                        run_label, label_dir, estimate_s=docs * ex.positions_per_doc * 0.08, estimate_mb=1,
                        depends=["extract"], reset=lambda: clear_explanations(data_dir))
    stages.append(label_stage)

    # resume=True: an interrupted training stage continues from its last checkpoint.
    sft = _resolve(SFTConfig, {**shared, "data": str(data_dir), "out": str(sft_dir), "resume": True}, cfg.sft, "sft")
    stages.append(Stage("sft", _settings(sft, ("data", "out", "device", "resume", "progress")), lambda: train_sft(sft), sft_dir,
                        estimate_s=_sft_estimate(sft), estimate_mb=60, depends=["label"]))
    last_bundle = sft_dir
    if cfg.rl:
        from nla.train.rl import RLConfig, train_rl

        rl = _resolve(RLConfig, {**shared, "nla": str(sft_dir), "data": str(data_dir), "out": str(rl_dir),
                                 "resume": True}, cfg.rl_train, "rl")
        stages.append(Stage("rl", _settings(rl, ("nla", "data", "out", "device", "resume", "force", "progress")),
                            lambda: train_rl(rl), rl_dir,
                            estimate_s=_rl_estimate(rl), estimate_mb=60, depends=["sft"]))
        last_bundle = rl_dir
    ev = _resolve(EvalConfig, {**shared, "nla": str(last_bundle), "data": str(data_dir), "out": str(eval_dir)},
                  cfg.eval, "eval")
    stages.append(Stage("eval", _settings(ev, ("nla", "data", "out", "device", "progress")), lambda: run_eval(ev), eval_dir,
                        estimate_s=(ev.max_rows or 256) * 1.5 * (1 + ev.best_of), estimate_mb=5,
                        depends=["rl" if cfg.rl else "sft"]))
    return stages


def clear_explanations(data_dir: Path) -> None:
    """Labels made with other settings must go, or `nla label` would skip those rows as done."""
    import pyarrow as pa

    from nla.data.store import ActivationDataset

    if not data_dir.exists():
        return
    ds = ActivationDataset.open(data_dir)
    for shard, table in ds.iter_shards():
        i = table.column_names.index("explanation")
        ds.replace_shard(shard, table.set_column(i, "explanation", pa.nulls(table.num_rows, pa.string())))


def _sft_estimate(sft: Any) -> float:
    """Seconds, from the embedded default on 2 CPU cores (8-row steps: AV ~7.5 s, AR ~2.2 s)."""
    if sft.max_steps is None:
        return 1200.0
    ar_steps = sft.ar_max_steps if sft.ar_max_steps is not None else sft.max_steps
    scale = sft.batch_size * sft.grad_accum / 8
    return 60.0 + scale * (7.5 * sft.max_steps + 2.2 * ar_steps)


def _rl_estimate(rl: Any) -> float:
    """Seconds, from the embedded default on 2 CPU cores (~52 s per step of 16 rollouts)."""
    rollouts = rl.batch_size * rl.group_size
    return 60.0 + rl.steps * 52.0 * rollouts / 16 * rl.max_new_tokens / 112 + 2 * rl.eval_rows * 0.8


def summarize_run(cfg: RunConfig) -> dict[str, Any]:
    """Headline metrics, the report path and a few example explanations."""
    work = Path(cfg.work_dir)
    report = work / "eval"
    metrics_file = report / "metrics.json"
    if not metrics_file.exists():
        raise NLAError(f"{metrics_file}: eval finished without writing metrics.json")
    metrics = json.loads(metrics_file.read_text())
    headline = _headline(metrics)
    print("\n== result ==")
    for name, value in headline.items():
        print(f"  {name:<34} {value}")
    print(f"  report: {(report / 'index.html').resolve()}")
    samples_file = report / "samples.jsonl"
    if samples_file.exists() and cfg.examples:
        print("\nexample explanations (held-out vectors):")
        with samples_file.open() as fh:
            for i, line in enumerate(fh):
                if i >= cfg.examples:
                    break
                s = json.loads(line)
                context = str(s.get("context", ""))[-120:].replace("\n", " ")
                print(f"  context: …{context}")
                said = s.get("av_explanation")
                if said is None:
                    said = "(unparseable) " + str(s.get("av_raw", "")).strip()[:100]
                print(f"  AV says: {said}")
                fve = s.get("fve_nrm")
                if fve is not None:
                    print(f"  round-trip fve_nrm: {fve:.3f}")
                print()
    return {"metrics": metrics, "headline": headline}


def _headline(metrics: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}

    def pick(path: str) -> Any:
        node: Any = metrics
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    for label, path in [
        ("round trip fve_nrm (AV → AR)", "round_trip.fve_nrm"),
        ("round trip fve_meannorm", "round_trip.fve_meannorm"),
        ("round trip top-1 of 16", "round_trip.top1"),
        ("AR on teacher labels fve_nrm", "ar_alone.fve_nrm"),
        ("mean-direction baseline fve_nrm", "baselines.mean_direction.fve_nrm"),
        ("shuffled-activation baseline fve_nrm", "baselines.shuffled_activations.fve_nrm"),
        ("bag-of-words ridge on labels fve_nrm", "baselines.bow_ridge.on_teacher.fve_nrm"),
    ]:
        value = pick(path)
        if isinstance(value, dict):
            value = value.get("value", value.get("mean"))
        if isinstance(value, (int, float)):
            out[label] = f"{value:.3f}"
    return out
