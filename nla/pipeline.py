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
from pathlib import Path
from typing import Any

from nla.config import check_device, config_from_dict, config_to_dict
from nla.errors import NLAError
from nla.meta import read_yaml, redact_secrets, write_yaml
from nla.stages import STAMP, RunConfig, Stage, make_stages, summarize_run


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
