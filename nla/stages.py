"""The stages of `nla run`: its config (``RunConfig``), each stage a thin call into the stage's own
module, and the printed result. ``nla/pipeline.py`` runs them (it imports this module; this one
never imports it back).

Every stage's settings are its config dataclass filled from (in order) its defaults, the run's
shared settings (model, layer, corpus, seed, device) and the stage's YAML section; the resolved
dict is what the stage's fingerprint covers.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla.config import config_from_dict, opt
from nla.errors import NLAError
from nla.meta import dig

STAMP = ".nla_stage.json"


@dataclass
class RunConfig:
    """Top-level settings of `nla run` (each stage also reads its own section of the YAML)."""

    work_dir: str = opt("runs/default", help="where every stage writes its output")
    model: str = opt("default", help="base model: 'default' (SmolLM2-135M), hub id, local path or tiny:<arch>")
    layer: int | None = opt(20, help="layer K = output of decoder block K (0-based); null: (2*n_layers)//3")
    corpus: str = opt("builtin", help="'builtin', a text/JSONL/Parquet file, a folder, or hf:NAME")
    teacher: str = opt("lens", help="labeling teacher: lens | openai:<model> | anthropic:<model> | hf:<model>")
    rl: bool = opt(False, help="run the RL stage after SFT")
    device: str = opt("auto", help="cpu, cuda, auto")
    seed: int = opt(0, help="seed for every stage")
    examples: int = opt(3, help="example explanations printed at the end")
    # The section defaults size the embedded default to about 35 minutes on 2 quiet CPU cores (34.5 measured)
    # (configs/default.yaml is the commented copy of these values).
    extract: dict[str, Any] = opt(
        # 20 positions per document: rows cost almost nothing beyond the document's forward pass
        # (extraction and the lens teacher run each document once), and the AV needs many.
        # next_tokens: the model's top-3 guesses stored per row, so the lens teacher runs no
        # forward pass of its own (it used to cost more than extraction).
        {"docs": 352, "positions_per_doc": 20, "seq_len": 256, "next_tokens": 3,
         "split": "av_sft=0.4,ar_sft=0.25,rl=0.2,eval=0.15"},
        help="settings for `nla extract` (see nla extract --help)",
    )
    # 64 rows ≈ 3 documents per lens forward pass: fewer documents split across batches.
    label: dict[str, Any] = opt({"batch_size": 64}, help="settings for `nla label`")
    sft: dict[str, Any] = opt(
        # ar_adapt: the AR then reads the AV's own answers (nla/train/adapt.py; docs/benchmarks.md).
        {"max_steps": 200, "ar_max_steps": 300, "lr": 1e-3, "ar_lr": 2e-3, "head_lr": 5e-3, "batch_size": 8,
         "max_length": 128, "eval_every": 0, "save_every": 50, "eval_rows": 64,
         "ar_adapt_steps": 150, "ar_adapt_rows": 384, "ar_adapt_lr": 5e-4},
        help="settings for `nla train sft`",
    )
    rl_train: dict[str, Any] = opt(
        # Sized for the embedded default on CPU: short lens explanations run ~37 tokens plus
        # tags, so 72 new tokens never cut a well-formed one. The low AR rate and the
        # contrastive term keep the gain from being hedging towards the mean
        # (docs/benchmarks.md, "RL").
        # No KL penalty: at 0.01 it cost a reference forward per step and held the policy back
        # (40 steps without it: +0.065 over SFT on `rl`, 30 steps with it: +0.044).
        {"steps": 40, "batch_size": 4, "group_size": 4, "max_new_tokens": 72, "lr": 5e-4, "ar_lr": 5e-5,
         "kl_coef": 0.0, "reward": ["neg_mse", "contrastive"], "reward_weights": [1.0, 1.0], "eval_rows": 64,
         "save_every": 10},
        help="settings for `nla train rl` when rl is true (an `rl:` section in the YAML replaces them)",
    )
    eval: dict[str, Any] = opt(
        # best-of-k samples k more answers per vector: off on CPU, where generation dominates.
        {"max_rows": 256, "best_of": 0, "max_new_tokens": 72},
        help="settings for `nla eval`",
    )


@dataclass
class Stage:
    name: str
    settings: dict[str, Any]
    run: Callable[[], Any]
    output: Path
    estimate_s: float = 0.0
    estimate_mb: float = 0.0
    depends: list[str] = field(default_factory=list)
    fingerprint: str = ""
    counts: dict[str, int] = field(default_factory=dict)  # rows done / failed, recorded in the stamp
    wall_s: float = 0.0  # seconds the stage ran, recorded in the stamp and printed with the result




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
              # --next-tokens runs the blocks after K too (30 of 30 instead of 21 on the default)
              estimate_s=docs * (0.43 if ex.next_tokens else 0.3), estimate_mb=docs * ex.positions_per_doc * 2.6 / 1000 * 4 + 1),
    ]

    # The labels table is the label stage's own folder (docs/design.md §3, "Labels"): redoing the
    # stage deletes that folder and nothing else, and the dataset is never rewritten. Later stages
    # read the dataset through it (`--data WORK/label` joins the table as `explanation`). The
    # request cache lives outside the stage folders so answers already paid for survive a
    # --rebuild of either.
    lab = _resolve(LabelConfig, {"teacher": cfg.teacher, "device": cfg.device, "data": str(data_dir),
                                 "out": str(label_dir), "cache": str(work / "label_cache.sqlite")},
                   cfg.label, "label")

    def run_label() -> None:
        # A run with failed rows raises (unless label.allow_partial): the stage is not stamped,
        # so the next `nla run` resumes it and asks the teacher again for exactly those rows.
        label_dir.mkdir(parents=True, exist_ok=True)
        summary = label(lab)
        label_stage.counts = {"todo": summary.todo, "labelled": summary.labelled, "cached": summary.cached,
                              "failed": summary.failed}

    label_stage = Stage("label", _settings(lab, ("data", "out", "force", "device", "progress", "cache",
                                                 "concurrency", "allow_partial")),
                        run_label, label_dir, estimate_mb=1,
                        # The lens teacher reads stored next tokens without a forward pass.
                        estimate_s=docs * ex.positions_per_doc * (0.005 if ex.next_tokens and cfg.teacher == "lens" else 0.08),
                        depends=["extract"])
    stages.append(label_stage)

    # resume=True: an interrupted training stage continues from its last checkpoint.
    sft = _resolve(SFTConfig, {**shared, "data": str(label_dir), "out": str(sft_dir), "resume": True}, cfg.sft, "sft")
    stages.append(Stage("sft", _settings(sft, ("data", "out", "device", "resume", "force", "progress")), lambda: train_sft(sft), sft_dir,
                        estimate_s=_sft_estimate(sft), estimate_mb=60, depends=["label"]))
    # The SFT bundle is always evaluated: with RL it is the baseline RL must beat, on the same
    # rows with the same settings.
    ev = _resolve(EvalConfig, {**shared, "nla": str(sft_dir), "data": str(label_dir), "out": str(eval_dir)},
                  cfg.eval, "eval")
    eval_estimate = (ev.max_rows or 256) * 1.0 * (1 + ev.best_of)
    stages.append(Stage("eval", _settings(ev, ("nla", "data", "out", "device", "progress")), lambda: run_eval(ev), eval_dir,
                        estimate_s=eval_estimate, estimate_mb=5, depends=["sft"]))
    if cfg.rl:
        from nla.train.rl import RLConfig, train_rl

        rl = _resolve(RLConfig, {**shared, "nla": str(sft_dir), "data": str(label_dir), "out": str(rl_dir),
                                 "resume": True}, cfg.rl_train, "rl")
        stages.append(Stage("rl", _settings(rl, ("nla", "data", "out", "device", "resume", "force", "progress")),
                            lambda: train_rl(rl), rl_dir,
                            estimate_s=_rl_estimate(rl), estimate_mb=60, depends=["sft"]))
        ev_rl = dataclasses.replace(ev, nla=str(rl_dir), out=str(work / "eval_rl"))
        stages.append(Stage("eval_rl", _settings(ev_rl, ("nla", "data", "out", "device", "progress")),
                            lambda: run_eval(ev_rl), work / "eval_rl", estimate_s=eval_estimate, estimate_mb=5,
                            depends=["rl"]))
    return stages


def _sft_estimate(sft: Any) -> float:
    """Seconds, from the embedded default on 2 CPU cores (8-row steps with short lens labels:
    AV ~4.1 s, AR ~1.6 s; docs/benchmarks.md, "Main job")."""
    if sft.max_steps is None:
        return 1200.0
    ar_steps = sft.ar_max_steps if sft.ar_max_steps is not None else sft.max_steps
    scale = sft.batch_size * sft.grad_accum / 8
    # ar_adapt: the AV's greedy answers (~0.7 s a row) and its AR steps.
    adapt = 0.7 * sft.ar_adapt_rows + 1.6 * scale * sft.ar_adapt_steps if sft.ar_adapt_steps else 0.0
    return 90.0 + scale * (4.1 * sft.max_steps + 1.6 * ar_steps) + adapt


def _rl_estimate(rl: Any) -> float:
    """Seconds, from the embedded default on 2 CPU cores (~52 s per step of 16 rollouts)."""
    rollouts = rl.batch_size * rl.group_size
    return 60.0 + rl.steps * 52.0 * rollouts / 16 * rl.max_new_tokens / 112 + 2 * rl.eval_rows * 0.8


STAGES = ("extract", "label", "sft", "eval", "rl", "eval_rl")


def summarize_run(cfg: RunConfig) -> dict[str, Any]:
    """Headline metrics with their baselines (SFT, and RL beside it when it ran), the time each
    stage took, the report path and a few example explanations."""
    work = Path(cfg.work_dir)
    reports = {"SFT": work / "eval"}
    if cfg.rl:
        reports["RL"] = work / "eval_rl"
    loaded: dict[str, dict[str, Any]] = {}
    for name, report in reports.items():
        metrics_file = report / "metrics.json"
        if not metrics_file.exists():
            raise NLAError(f"{metrics_file}: eval finished without writing metrics.json")
        loaded[name] = json.loads(metrics_file.read_text())
    headlines = {name: _headline(m) for name, m in loaded.items()}
    print("\n== result ==")
    names = list(headlines)
    print(f"  {'':<42}" + "".join(f"{n:>24}" for n in names))
    for label in headlines[names[0]]:
        print(f"  {label:<42}" + "".join(f"{headlines[n].get(label, '—'):>24}" for n in names))
    if "RL" in loaded:
        hedging = ((loaded["RL"].get("extra") or {}).get("hedging"))
        summary = work / "rl" / "rl_summary.json"
        if summary.exists():
            hedging = json.loads(summary.read_text()).get("hedging", hedging)
        print(f"  RL hedging flag (rl_summary.json): {hedging}")
    times = []
    for stage in STAGES:
        stamp_file = work / ("data" if stage == "extract" else stage) / STAMP
        stamp = json.loads(stamp_file.read_text()) if stamp_file.exists() else None
        if stamp and stamp.get("wall_s") is not None:
            times.append(f"{stage} {float(stamp['wall_s']) / 60:.1f} min")
    if times:
        print("  stage wall time: " + ", ".join(times))
    for name, report in reports.items():
        print(f"  {name} report: {(report / 'index.html').resolve()}")
    samples_file = reports[names[-1]] / "samples.jsonl"
    if samples_file.exists() and cfg.examples:
        print(f"\nexample explanations ({names[-1]} bundle, held-out vectors):")
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
                print("  AV says: " + str(said).replace("\n", "\n           "))
                fve = s.get("fve_nrm")
                if fve is not None:
                    print(f"  round-trip fve_nrm: {fve:.3f}")
                print()
    return {"metrics": loaded[names[-1]], "headline": headlines[names[-1]],
            "by_bundle": {n: {"metrics": loaded[n], "headline": headlines[n]} for n in names}}


def _headline(metrics: dict[str, Any]) -> dict[str, str]:
    """The figures a reader needs to tell whether the NLA reads the vector, each with its
    baseline (and 95 % interval where the report has one)."""
    out: dict[str, str] = {}

    def pick(path: str) -> Any:
        return dig(metrics, path)

    def fmt(path: str, ci: str | None = None) -> str | None:
        value = pick(path)
        if isinstance(value, dict):
            value = value.get("value", value.get("mean"))
        if not isinstance(value, (int, float)):
            return None
        text = f"{value:.3f}"
        interval = pick(ci) if ci else None
        if isinstance(interval, list) and len(interval) == 2 and all(isinstance(x, (int, float)) for x in interval):
            text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
        return text

    rows = [
        ("round trip fve_nrm (AV → AR) [95% CI]", "round_trip.fve_nrm", "round_trip.ci95.fve_nrm"),
        ("mean-direction baseline fve_nrm [95% CI]", "baselines.mean_direction.fve_nrm",
         "baselines.mean_direction.ci95.fve_nrm"),
        ("round trip minus mean-direction [paired CI]", "round_trip.vs_mean_direction.delta_fve_nrm",
         "round_trip.vs_mean_direction.ci95"),
        ("round trip top-1 of 16 (chance 0.062)", "round_trip.top1", "round_trip.ci95.top1"),
        ("correct-vs-shuffled gap (mse_nrm)", "round_trip.shuffled_gap", None),
        ("AR on teacher labels fve_nrm", "ar_alone.fve_nrm", None),
        ("round trip fve_meannorm", "round_trip.fve_meannorm", None),
        ("shuffled-activation baseline fve_nrm", "baselines.shuffled_activations.fve_nrm", None),
        ("bag-of-words ridge on labels fve_nrm", "baselines.bow_ridge.on_teacher.fve_nrm", None),
        ("probe: word shuffle Δfve_nrm", "probes.word_shuffle.delta_fve_nrm", None),
        ("probe: drop most informative claim Δ", "probes.claim_ablation.most_informative_delta_fve_nrm", None),
        ("causal: next-token KL recovered", "causal.fraction_recovered", None),
    ]
    for label, path, ci in rows:
        text = fmt(path, ci)
        if text is not None:
            out[label] = text
    return out
