"""`nla run`: end to end on a tiny model, skipping, resuming, invalidation, example configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nla.errors import NLAError
from nla.pipeline import load_run_config, plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def nla_run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "nla.cli", "run", *args], capture_output=True, text=True,
                          env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"nla run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def statuses(config: Path, work: Path) -> dict[str, str]:
    cfg = load_run_config(str(config), {"work_dir": str(work)})
    return {stage.name: status for stage, status, _ in plan(cfg)}


def variant(tmp_path: Path, name: str, **changes: dict) -> Path:
    data = yaml.safe_load(TINY.read_text())
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("run") / "work"
    proc = nla_run(str(TINY), "--work-dir", str(work))
    assert "== result ==" in proc.stdout
    assert "round trip fve_nrm" in proc.stdout
    assert "report:" in proc.stdout and "AV says:" in proc.stdout
    return work


def test_every_artifact_exists_and_the_bundle_loads(finished_run: Path) -> None:
    from nla.bundle import NLA
    from nla.data.store import ActivationDataset

    for rel in ["data/nla_meta.yaml", "data/part-00000.parquet", "sft/nla_meta.yaml", "sft/av", "sft/ar",
                "sft/metrics.jsonl", "eval/metrics.json", "eval/samples.jsonl", "eval/index.html",
                "run_config.yaml"]:
        assert (finished_run / rel).exists(), rel
    for stage in ["extract", "label", "sft", "eval"]:
        folder = {"extract": "data"}.get(stage, stage)
        assert (finished_run / folder / ".nla_stage.json").exists(), stage
    # The labels are the label stage's own table, read through it; the dataset holds none.
    ds = ActivationDataset.open(finished_run / "label")
    assert all(r["explanation"] for r in ds.rows())
    assert ds.labels is not None and ds.labels.meta["teacher"] == "lens:tiny:llama"
    assert ActivationDataset.open(finished_run / "data").table(["explanation"]).column("explanation").null_count == len(ds)
    nla = NLA.from_pretrained(finished_run / "sft")
    assert nla.reconstruct(["a test"]).shape == (1, nla.meta.d_model)
    metrics = json.loads((finished_run / "eval" / "metrics.json").read_text())
    assert metrics["baselines"]["mean_direction"]["fve_meannorm"] == pytest.approx(0.0, abs=1e-6)


def test_second_run_skips_every_stage(finished_run: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    proc = nla_run(str(TINY), "--work-dir", str(finished_run))
    for stage in ["extract", "label", "sft", "eval"]:
        assert f"  {stage:<8} skip" in proc.stdout
    after = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*") if p.is_file()}
    changed = [p for p in before if before[p] != after.get(p) and p.name != "run_config.yaml"]
    assert not changed, changed


def test_changed_setting_invalidates_exactly_the_downstream_stages(finished_run: Path, tmp_path: Path) -> None:
    assert statuses(TINY, finished_run) == {"extract": "done", "label": "done", "sft": "done", "eval": "done"}
    sft_changed = variant(tmp_path, "sft.yaml", sft={"lr": 1e-3})
    assert statuses(sft_changed, finished_run) == {"extract": "done", "label": "done", "sft": "stale", "eval": "stale"}
    eval_changed = variant(tmp_path, "eval.yaml", eval={"n_candidates": 4})
    assert statuses(eval_changed, finished_run) == {"extract": "done", "label": "done", "sft": "done", "eval": "stale"}
    label_changed = variant(tmp_path, "label.yaml", label={"max_retries": 2})
    assert statuses(label_changed, finished_run)["extract"] == "done"
    assert set(statuses(label_changed, finished_run).values()) == {"done", "stale"}
    extract_changed = variant(tmp_path, "extract.yaml", extract={"positions_per_doc": 3})
    assert set(statuses(extract_changed, finished_run).values()) == {"stale"}
    # A path or display-only setting changes nothing.
    cosmetic = variant(tmp_path, "cosmetic.yaml", sft={"progress": False}, eval={"progress": False})
    assert set(statuses(cosmetic, finished_run).values()) == {"done"}

    refused = nla_run(str(sft_changed), "--work-dir", str(finished_run), check=False)
    assert refused.returncode == 2
    err = refused.stderr.strip().splitlines()
    assert len(err) == 1 and "'sft'" in err[0] and "lr" in err[0] and "--rebuild" in err[0]


def test_rebuild_redoes_downstream_only(tmp_path: Path, finished_run: Path) -> None:
    import shutil

    work = tmp_path / "work"
    shutil.copytree(finished_run, work)
    data_stamp = (work / "data" / ".nla_stage.json").read_text()
    changed = variant(tmp_path, "eval.yaml", eval={"n_candidates": 4})
    proc = nla_run(str(changed), "--work-dir", str(work), "--rebuild")
    assert "== eval ==" in proc.stdout and "== sft ==" not in proc.stdout and "== extract ==" not in proc.stdout
    assert (work / "data" / ".nla_stage.json").read_text() == data_stamp
    assert statuses(changed, work) == {"extract": "done", "label": "done", "sft": "done", "eval": "done"}


def test_teacher_change_relabels_without_touching_the_dataset(tmp_path: Path, finished_run: Path) -> None:
    """Labels live in the label stage's own folder (docs/design.md §3), so redoing the stage
    needs nothing outside it: a rebuilt run with another teacher trains on that teacher's labels
    only, and the dataset's files stay byte for byte as extraction wrote them."""
    import shutil

    from nla.data.store import ActivationDataset
    from nla.label.prompt import parse_analysis

    work = tmp_path / "work"
    shutil.copytree(finished_run, work)
    dataset = {p.name: p.read_bytes() for p in (work / "data").iterdir() if p.is_file()}
    config = yaml.safe_load(TINY.read_text())
    config["teacher"] = "lens-long"
    changed = tmp_path / "long.yaml"
    changed.write_text(yaml.safe_dump(config))
    assert statuses(changed, work) == {"extract": "done", "label": "stale", "sft": "stale", "eval": "stale"}
    proc = nla_run(str(changed), "--work-dir", str(work), "--rebuild")
    assert "== label ==" in proc.stdout and "== extract ==" not in proc.stdout and "== result ==" in proc.stdout
    ds = ActivationDataset.open(work / "label")
    assert ds.labels is not None and ds.labels.meta["provider"] == "lens-long"
    # every row in the long style (10+ words a feature), none left over from the short one
    for r in ds.rows():
        features = parse_analysis(f"<analysis>\n{r['explanation']}\n</analysis>")
        assert features is not None and len(features[0].split()) >= 10, r["explanation"]
    assert {p.name: p.read_bytes() for p in (work / "data").iterdir() if p.is_file()} == dataset
    assert statuses(changed, work) == {"extract": "done", "label": "done", "sft": "done", "eval": "done"}


def test_killed_run_resumes_without_redoing_finished_stages(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-m", "nla.cli", "run", str(TINY), "--work-dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    # Kill once labeling is done and training has begun.
    while time.time() < deadline and not (work / "sft").exists():
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (work / "label" / ".nla_stage.json").exists()
    data_stamp = (work / "data" / ".nla_stage.json").read_text()
    done = nla_run(str(TINY), "--work-dir", str(work))
    assert "== extract ==" not in done.stdout and "== label ==" not in done.stdout
    assert "== result ==" in done.stdout
    assert (work / "data" / ".nla_stage.json").read_text() == data_stamp


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                          if p.name != "universal.yaml"))
def test_example_configs_validate(config: str, tmp_path: Path) -> None:
    cfg = load_run_config(str(ROOT / "configs" / config), {"work_dir": str(tmp_path / "w")})
    rows = plan(cfg)
    assert [s.name for s, _, _ in rows][:3] == ["extract", "label", "sft"]
    assert all(status == "run" for _, status, _ in rows)
    dry = nla_run(str(ROOT / "configs" / config), "--work-dir", str(tmp_path / "w"), "--dry-run")
    assert "total to do" in dry.stdout
    assert not (tmp_path / "w").exists()


def test_default_plan_is_the_embedded_model(tmp_path: Path) -> None:
    cfg = load_run_config(None, {"work_dir": str(tmp_path)})
    assert cfg.model == "default" and cfg.layer == 20 and cfg.teacher == "lens" and cfg.corpus == "builtin"
    assert [s.name for s, _, _ in plan(cfg)] == ["extract", "label", "sft", "eval"]


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    bad = variant(tmp_path, "bad.yaml", sft={"learning_rate": 1.0})
    with pytest.raises(NLAError, match="learning_rate"):
        plan(load_run_config(str(bad), {"work_dir": str(tmp_path)}))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    proc = nla_run(str(broken), "--dry-run", check=False)
    assert proc.returncode == 2 and "malformed YAML" in proc.stderr and proc.stderr.count("\n") == 1


def test_configs_default_yaml_is_the_builtin_default() -> None:
    """configs/default.yaml documents exactly what `nla run` does with no config."""
    import dataclasses

    from nla.pipeline import RunConfig

    documented = load_run_config(str(ROOT / "configs" / "default.yaml"))
    assert dataclasses.asdict(documented) == dataclasses.asdict(RunConfig())


def test_failed_labels_fail_the_run_and_the_next_run_retries_them(tmp_path: Path) -> None:
    """A teacher that answers HTTP 500 to everything, then recovers (the local fake server of
    nla/label/testing.py): the first `nla run` stops non-zero with the counts and stamps no
    stage after extract; the second labels every row and finishes. The API key in the
    base URL's user-info never reaches a file or the console."""
    from nla.label.testing import FAKE_MODEL, FakeTeacherServer, FaultPlan

    secret = "PIPE-SECRET-93f1"
    work = tmp_path / "work"
    with FakeTeacherServer(FaultPlan(p_500=1.0)) as server:
        host = server.url.removeprefix("http://")
        config = variant(tmp_path, "api.yaml",
                         label={"base_url": f"http://nla:{secret}@{host}/v1", "max_retries": 1, "backoff": 0.01,
                                "timeout": 5, "concurrency": 8, "progress": False},
                         sft={"max_steps": 2, "ar_max_steps": 2},
                         eval={"max_rows": 4, "best_of": 0, "probes": False, "bootstrap": 0, "max_new_tokens": 8})
        data = yaml.safe_load(config.read_text())
        data["teacher"] = f"openai:{FAKE_MODEL}"
        config.write_text(yaml.safe_dump(data))

        first = nla_run(str(config), "--work-dir", str(work), check=False)
        assert first.returncode == 2, first.stderr[-3000:]
        errors = [ln for ln in first.stderr.replace("\r", "\n").splitlines() if ln.startswith("nla ")]
        assert len(errors) == 1 and "160 of 160 rows could not be labelled (0 labelled" in errors[0], errors
        assert "HTTP 500" in errors[0] and "--allow-partial" in errors[0]
        assert (work / "data" / ".nla_stage.json").exists()
        assert not (work / "label" / ".nla_stage.json").exists() and not (work / "sft").exists()
        assert server.stats.statuses[500] == 2 * 160  # each row asked once and retried once

        server.plan.p_500 = 0.0  # the API recovers
        second = nla_run(str(config), "--work-dir", str(work))
    assert "== label ==" in second.stdout and "== extract ==" not in second.stdout
    assert "== result ==" in second.stdout
    stamp = json.loads((work / "label" / ".nla_stage.json").read_text())
    assert stamp["counts"] == {"todo": 160, "labelled": 160, "cached": 0, "failed": 0}
    from nla.data.store import ActivationDataset

    assert all(r["explanation"] for r in ActivationDataset.open(work / "label").rows())
    for path in work.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"the key leaked into {path}"
    assert secret not in first.stdout + first.stderr + second.stdout + second.stderr
