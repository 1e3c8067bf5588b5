"""`nla run`: the whole pipeline from one YAML file (extract → label → SFT → RL → eval).

Each stage writes into ``WORK/<stage>/`` and, when it finishes, a ``.nla_stage.json`` stamp with
the fingerprint of its settings *and of every stage upstream of it*. On the next run a stage
whose stamp matches is skipped; one with no stamp but some output was interrupted and resumes
(every stage resumes itself); one whose stamp does not match was made with other settings and
is refused with a message naming the changed setting, unless ``--rebuild`` is given, which
redoes it and everything downstream. A changed setting therefore invalidates exactly the
stages downstream of it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nla.config import check_device, config_from_dict, config_to_dict, opt
from nla.errors import NLAError
from nla.meta import read_yaml, redact_secrets, write_yaml

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
    # The section defaults size the embedded default to about 30 minutes on 2 CPU cores
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
        {"max_steps": 200, "ar_max_steps": 200, "lr": 1e-3, "ar_lr": 2e-3, "head_lr": 5e-3, "batch_size": 8,
         "max_length": 128, "eval_every": 0, "save_every": 50, "eval_rows": 128,
         "ar_adapt_steps": 150, "ar_adapt_rows": 384, "ar_adapt_lr": 2e-4},
        help="settings for `nla train sft`",
    )
    rl_train: dict[str, Any] = opt(
        # Sized for the embedded default on CPU: short lens explanations run ~37 tokens plus
        # tags, so 72 new tokens never cut a well-formed one. The low AR rate and the
        # contrastive term keep the gain from being hedging towards the mean
        # (docs/benchmarks.md, "RL").
        {"steps": 30, "batch_size": 4, "group_size": 4, "max_new_tokens": 72, "lr": 5e-4, "ar_lr": 5e-5,
         "reward": ["neg_mse", "contrastive"], "reward_weights": [1.0, 1.0], "eval_rows": 128, "save_every": 10},
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


def _fingerprint(settings: dict[str, Any], upstream: list[str]) -> str:
    blob = json.dumps({"settings": settings, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_stamp(output: Path) -> dict[str, Any] | None:
    path = output / STAMP
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_stamp(stage: Stage) -> None:
    stage.output.mkdir(parents=True, exist_ok=True)
    # Settings are redacted: a --base-url may carry an API key (the fingerprint is a hash).
    data = {"stage": stage.name, "fingerprint": stage.fingerprint, "settings": redact_secrets(stage.settings),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if stage.counts:
        data["counts"] = stage.counts
    if stage.wall_s:
        data["wall_s"] = round(stage.wall_s, 1)
    tmp = stage.output / (STAMP + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(stage.output / STAMP)


def _changed(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str | None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _changed(a, b, f"{prefix}{key}.")
            if inner:
                return inner
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            return f"{prefix}{key}: {a!r} → {b!r}"
    return None


def status_of(stage: Stage) -> tuple[str, str]:
    """('done' | 'stale' | 'resume' | 'run', reason)."""
    stamp = read_stamp(stage.output)
    if stamp is not None:
        if stamp.get("fingerprint") == stage.fingerprint:
            return "done", "outputs complete, settings unchanged"
        why = _changed(stamp.get("settings", {}), redact_secrets(stage.settings))
        return "stale", why or "an upstream stage changed"
    if stage.output.exists() and any(stage.output.iterdir()):
        return "resume", "interrupted earlier; continues where it stopped"
    return "run", ""


def load_run_config(path: str | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    data = read_yaml(path) if path else {}
    if "rl" in data and isinstance(data["rl"], dict):
        # `rl:` may be given as a section: it both enables the stage and holds its settings.
        data["rl_train"] = data.pop("rl")
        data["rl"] = True
    data.update(overrides or {})
    # Devices are checked when the run starts (run_pipeline), so a GPU plan can be read anywhere.
    return config_from_dict(RunConfig, data, where=path or "defaults", devices=False)


def build_stages(cfg: RunConfig) -> list[Stage]:
    from nla.stages import make_stages

    stages = make_stages(cfg)
    fingerprints: dict[str, str] = {}
    for stage in stages:
        upstream = [fingerprints[d] for d in stage.depends]
        stage.fingerprint = _fingerprint(stage.settings, upstream)
        fingerprints[stage.name] = stage.fingerprint
    return stages


def plan(cfg: RunConfig) -> list[tuple[Stage, str, str]]:
    stages = build_stages(cfg)
    rows = []
    invalid: set[str] = set()
    for stage in stages:
        status, why = status_of(stage)
        if status == "done" and any(d in invalid for d in stage.depends):
            status, why = "stale", "an upstream stage will be redone"
        if status in ("stale", "run", "resume"):
            invalid.add(stage.name)
        rows.append((stage, status, why))
    return rows


def print_plan(cfg: RunConfig, rows: list[tuple[Stage, str, str]]) -> None:
    print(f"nla run: work dir {cfg.work_dir}, model {cfg.model}, layer {cfg.layer}, corpus {cfg.corpus}, "
          f"teacher {cfg.teacher}")
    total_s = total_mb = 0.0
    for stage, status, why in rows:
        todo = status != "done"
        if todo:
            total_s += stage.estimate_s
            total_mb += stage.estimate_mb
        verb = {"done": "skip", "stale": "STALE", "resume": "resume", "run": "run"}[status]
        est = f"~{_fmt_time(stage.estimate_s)}, ~{stage.estimate_mb:,.0f} MB" if todo else ""
        print(f"  {stage.name:<8} {verb:<7} {est:<22} {why}")
    print(f"  total to do: ~{_fmt_time(total_s)}, ~{total_mb:,.0f} MB on disk")


def _fmt_time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_pipeline(cfg: RunConfig, *, dry_run: bool = False, rebuild: bool = False) -> dict[str, Any]:
    rows = plan(cfg)
    print_plan(cfg, rows)
    stale = [(s, why) for s, status, why in rows if status == "stale"]
    if dry_run:
        return {"plan": [(s.name, status) for s, status, _ in rows]}
    if stale and not rebuild:
        stage, why = stale[0]
        raise NLAError(
            f"stage {stage.name!r} in {stage.output} was made with other settings ({why}); "
            "pass --rebuild to redo it and the stages after it, or choose another work_dir"
        )
    # Devices are checked before anything is written (a plan may name a GPU this machine lacks).
    check_device(cfg.device, "device")
    for name in ("extract", "label", "sft", "rl_train", "eval"):
        section = getattr(cfg, name)
        if isinstance(section.get("device"), str):
            check_device(section["device"], f"{name}.device")
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    write_yaml(Path(cfg.work_dir) / "run_config.yaml", config_to_dict(cfg))
    for stage, status, _ in rows:
        if status == "done":
            continue
        if status == "stale":
            # Every stage writes only inside its own folder (labels included: docs/design.md §3),
            # so deleting the folder undoes all of it.
            shutil.rmtree(stage.output, ignore_errors=True)
        print(f"\n== {stage.name} ==", flush=True)
        started = time.perf_counter()
        stage.run()
        stage.wall_s = time.perf_counter() - started  # this invocation's (a resumed stage: its last part)
        write_stamp(stage)
    from nla.stages import summarize_run

    return summarize_run(cfg)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="the whole pipeline from one YAML (default: embedded SmolLM2-135M, offline)",
        description="extract → label → train AV/AR (SFT) → [RL] → eval, skipping finished stages and "
        "resuming interrupted ones. The layer is K = output of decoder block K (0-based).",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML file (see configs/); default: embedded default")
    p.add_argument("--work-dir", default=None, help="override work_dir")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, skips, size, time) and stop")
    p.add_argument("--rebuild", action="store_true", help="redo stages whose settings changed")

    def _run(args: Any) -> None:
        overrides = {"work_dir": args.work_dir} if args.work_dir else {}
        run_pipeline(load_run_config(args.config, overrides), dry_run=args.dry_run, rebuild=args.rebuild)

    p.set_defaults(func=_run)
