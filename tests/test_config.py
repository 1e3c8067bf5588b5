"""The config contract (nla/config.py): types coerced at the boundary, unknown keys and bad
ranges are one-line errors naming the field, and every command spells shared flags alike."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from nla.cli import COMMANDS, build_parser
from nla.config import coerce, config_from_dict, resolve_config
from nla.errors import NLAError
from nla.label.runner import LabelConfig
from nla.pipeline import load_run_config
from nla.train.rl import RLConfig

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def nla(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nla.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# ---------------------------------------------------------------- coercion
@pytest.mark.parametrize(("value", "tp", "want"), [
    ("1e-4", float, 1e-4), (3, float, 3.0), ("7", int, 7), (True, bool, True), (None, int | None, None),
    (["1", 2.5], list[float], [1.0, 2.5]), ("a", str, "a"),
])
def test_coerce_accepts_and_converts(value: Any, tp: Any, want: Any) -> None:
    got = coerce(value, tp, "x")
    assert got == want and type(got) is type(want)


@pytest.mark.parametrize(("value", "tp", "message"), [
    ("ten", int, "steps: expected an integer, got 'ten'"),
    (True, int, "expected an integer, got True"),
    ("false", bool, "expected true or false, got 'false'"),
    ("fast", float, "expected a number, got 'fast'"),
    (3, str, "expected a string, got 3"),
    ("a", list[str], "expected a list"),
    (None, int, "expected an integer, got null"),
])
def test_coerce_rejects_with_the_field_name(value: Any, tp: Any, message: str) -> None:
    with pytest.raises(NLAError, match="^steps: " + message.removeprefix("steps: ")):
        coerce(value, tp, "steps")


# ---------------------------------------------------------------- YAML and flags, end to end
def test_yaml_1e_4_is_a_float_and_trains_with_that_lr(tiny_dataset: Path, tmp_path: Path) -> None:
    """YAML 1.1 reads `1e-4` as a string; the config contract makes it the float 0.0001, and the
    optimizer really runs at it (the lr logged at step 1; min_lr_ratio 1 keeps the schedule constant)."""
    import shutil

    from nla.data.store import ActivationDataset
    from nla.label.prompt import format_explanation
    from nla.train.loop import read_metrics

    data = Path(shutil.copytree(tiny_dataset, tmp_path / "data"))
    ds = ActivationDataset.open(data)
    for shard, table in ds.iter_shards():
        texts = [format_explanation([f"Feature of {c[-20:]!r}.", "Second feature."]) for c in
                 table.column("context").to_pylist()]
        i = table.column_names.index("explanation")
        ds.replace_shard(shard, table.set_column(i, "explanation", pa.array(texts, pa.string())))
    assert yaml.safe_load("lr: 1e-4")["lr"] == "1e-4"  # the YAML quirk this guards against
    cfg = tmp_path / "sft.yaml"
    cfg.write_text("sft:\n  lr: 1e-4\n  max_steps: 1\n  warmup_ratio: 0\n  min_lr_ratio: 1\n  batch_size: 4\n  eval_every: 0\n"
                   "  save_every: 0\n  eval_rows: 4\n  max_length: 64\n")
    out = tmp_path / "run"
    proc = nla("train", "ar", "--config", str(cfg), "--data", str(data), "--out", str(out), "--device", "cpu",
               "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["lr"] == 0.0001 and isinstance(saved["lr"], float)
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if "lr" in r]
    assert lrs and lrs[0] == pytest.approx(1e-4)


def test_steps_ten_stops_with_the_field_named(tmp_path: Path) -> None:
    cfg = tmp_path / "rl.yaml"
    cfg.write_text("rl:\n  steps: ten\n")
    err = one_line_error(nla("train", "rl", "--config", str(cfg), "--nla", "x", "--data", "y", "--out",
                             str(tmp_path / "o")), "steps: expected an integer, got 'ten'")
    assert str(cfg) in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("command", "yaml_text", "needle"), [
    (["extract", "--out", "O"], "max_stepz: 3\n", "unknown setting 'max_stepz'"),
    (["label", "--data", "D"], "label:\n  concurrencyy: 3\n", "unknown setting 'concurrencyy'"),
    (["train", "rl", "--nla", "N", "--data", "D", "--out", "O"], "rl_train:\n  stepz: 3\n", "unknown setting 'stepz'"),
    (["train", "sft", "--data", "D", "--out", "O"], "max_stepz: 3\n", "unknown setting 'max_stepz'"),
    (["eval", "--nla", "N", "--data", "D", "--out", "O"], "eval:\n  max_rowz: 3\n", "unknown setting 'max_rowz'"),
    (["serve", "--nla", "N"], "serve:\n  portt: 3\n", "unknown setting 'portt'"),
])
def test_unknown_keys_are_errors_in_every_config_file(command: list[str], yaml_text: str, needle: str,
                                                      tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    one_line_error(nla(*[str(tmp_path / a) if a in "ODN" else a for a in command], "--config", str(cfg)), needle)


@pytest.mark.parametrize(("args", "needle"), [
    (["extract", "--out", "O", "--docs", "-3"], "--docs: must be at least 1, got -3"),
    (["extract", "--out", "O", "--docs", "0"], "--docs: must be at least 1, got 0"),
    (["extract", "--out", "O", "--seq-len", "0"], "--seq-len: must be at least 1"),
    (["train", "sft", "--data", "D", "--out", "O", "--lr", "-1"], "--lr: must be greater than 0"),
    (["train", "sft", "--data", "D", "--out", "O", "--lr", "nan"], "--lr: must be a finite number"),
    (["train", "sft", "--data", "D", "--out", "O", "--lora-r", "0"], "--lora-r: must be at least 1"),
    (["serve", "--nla", "N", "--port", "70000"], "--port: must be at most 65535"),
    (["serve", "--nla", "N", "--max-n", "0"], "--max-n: must be at least 1"),
    (["serve", "--nla", "N", "--timeout-s", "-1"], "--timeout-s: must be greater than 0"),
    (["serve", "--nla", "N", "--dtype", "float8"], "--dtype: expected one of"),
    (["label", "--data", "D", "--timeout", "0"], "--timeout: must be greater than 0"),
    (["eval", "--nla", "N", "--data", "D", "--out", "O", "--top-p", "1.5"], "--top-p: must be at most 1"),
    (["serve"], "nla is required (give --nla)"),
    (["serve", "--nla", "N", "--allowed-hosts", "a*b"], "--allowed-hosts: 'a*b': a wildcard is"),
    (["serve", "--nla", "N", "--default-new-tokens", "500"], "--default-new-tokens 500 is above --max-new-tokens"),
])
def test_ranges_are_checked_for_flags(args: list[str], needle: str, tmp_path: Path) -> None:
    one_line_error(nla(*[str(tmp_path / a) if a in "ODN" else a for a in args]), needle)
    assert not (tmp_path / "O").exists()


def test_yaml_bool_must_be_a_bool_and_ranges_apply_to_yaml(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text('rl: "false"\n')
    with pytest.raises(NLAError, match="rl: expected true or false, got 'false'"):
        load_run_config(str(run))
    run.write_text("extract:\n  docs: -3\n")
    from nla.pipeline import plan

    with pytest.raises(NLAError, match="extract: docs: must be at least 1, got -3"):
        plan(load_run_config(str(run), {"work_dir": str(tmp_path / "w")}))
    paths = {"nla": "n", "data": "d", "out": "o"}  # required settings of RLConfig
    with pytest.raises(NLAError, match="lr: must be greater than 0"):
        config_from_dict(RLConfig, {**paths, "lr": "-1e-4"})
    assert config_from_dict(RLConfig, {**paths, "lr": "1e-4", "reward_weights": ["1", 2]}).reward_weights == [1.0, 2.0]


def test_rl_section_of_a_run_file_is_read_by_train_rl(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("rl: false\nrl_train:\n  steps: 7\n  lr: 5.0e-4\n")
    ns = argparse.Namespace(config=str(path), nla="n", data="d", out="o")
    cfg = resolve_config(RLConfig, ns, section="rl")
    assert cfg.steps == 7 and cfg.lr == 5e-4


def test_device_that_is_not_there_is_a_one_line_error(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        # On a GPU machine, ask for a device index past the last one instead.
        dev = f"cuda:{torch.cuda.device_count()}"
    else:
        dev = "cuda"
    one_line_error(nla("extract", "--out", str(tmp_path / "o"), "--device", dev, "--model", "tiny:llama"),
                   "--device:", "requested but")
    with pytest.raises(NLAError, match="device: unknown device 'gpu'"):
        config_from_dict(LabelConfig, {"data": "d", "device": "gpu"})


# ---------------------------------------------------------------- one flag name per thing
def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(" ".join(path), parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _walk(sub, (*path, name))
    return out


# Names the contract retires, with the one to use instead (issue 16, item 2).
RETIRED = {"--bundle": "--nla", "--init": "--nla", "--precision": "--dtype"}
# Flags still to be renamed (empty: every command is on the contract);
# nothing outside this list may use a retired name or another --device default.
PENDING: set[tuple[str, str]] = set()


def test_every_subcommand_spells_shared_flags_alike() -> None:
    from nla.config import _UNSET

    parsers = _walk(build_parser([]))
    assert {p.split(" ")[0] for p, _ in parsers if p} >= set(COMMANDS)
    problems: set[tuple[str, str]] = set()
    for path, parser in parsers:
        flags = {s: a for a in parser._actions for s in a.option_strings}
        problems |= {(path, flag) for flag in RETIRED if flag in flags}
        device = flags.get("--device")
        # Config-driven flags default to _UNSET (the config field's default is checked below).
        if device is not None and device.default not in ("auto", _UNSET):
            problems.add((path, "--device"))
        dtype = flags.get("--dtype")
        if dtype is not None and not (dtype.choices or "float32" in (dtype.metavar or "")):
            problems.add((path, "--dtype"))
    assert problems <= PENDING, f"flags off the contract: {sorted(problems - PENDING)}"


def test_eval_load_in_4bit_is_the_shared_flag_and_a_one_line_error_on_cpu(tiny_dataset: Path, tmp_path: Path) -> None:
    """`nla eval --load-in-4bit` is the flag of `train sft|rl` (nla.models.loading.load_in_4bit);
    without a CUDA GPU it stops in one line before the report folder is made."""
    from nla.bundle import NLA

    parsers = dict(_walk(build_parser([])))
    for path in ("eval", "train sft", "train rl"):
        assert "--load-in-4bit" in {s for a in parsers[path]._actions for s in a.option_strings}, path
    # --device cpu: refused on a GPU machine too (NF4 kernels are CUDA's).
    bundle = tmp_path / "bundle"
    NLA.initialize(dataset=str(tiny_dataset), device="cpu").save_pretrained(bundle)
    out = tmp_path / "report"
    err = one_line_error(nla("eval", "--nla", str(bundle), "--data", str(tiny_dataset), "--out", str(out),
                             "--device", "cpu", "--load-in-4bit"), "--load-in-4bit needs a CUDA GPU")
    assert "this run is on cpu" in err
    assert not out.exists()


def test_every_stage_config_has_device_auto_and_no_empty_default() -> None:
    from nla.data.extract import ExtractConfig
    from nla.eval.suite import EvalConfig
    from nla.serve.app import ServeConfig

    for cls in (ExtractConfig, LabelConfig, RLConfig, EvalConfig, ServeConfig):
        field = {f.name: f for f in dataclasses.fields(cls)}["device"]
        assert field.default == "auto", cls.__name__


# ---------------------------------------------------------------- the shared output guard
def test_force_replaces_only_the_commands_own_files(tmp_path: Path) -> None:
    """`--force` over an earlier RL run removes that run's bundle, checkpoints and metrics (no
    stale checkpoint survives into the new run) and nothing else; a resume may change only
    the settings that do not change results (here the device)."""
    from nla.config import claim_output, config_to_dict, save_config
    from nla.train.rl import RL_OWNED, RL_RESUME_FREE

    run = tmp_path / "run"
    (run / "checkpoints" / "rl-0000010").mkdir(parents=True)
    (run / "av").mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine\n")
    old = RLConfig(nla="b", data="d", out=str(run), device="cpu")
    save_config(old, run / "train_config.yaml")
    kw: dict[str, Any] = dict(command="train rl", owned=RL_OWNED, config_file="train_config.yaml",
                              free=RL_RESUME_FREE)
    moved = dataclasses.replace(old, device="cuda")
    claim_output(run, force=False, resume=True, settings=config_to_dict(moved), **kw)  # device is free
    with pytest.raises(NLAError, match="started with seed=0, this resume asks for 1"):
        claim_output(run, force=False, resume=True, settings=config_to_dict(dataclasses.replace(old, seed=1)), **kw)
    claim_output(run, force=True, resume=False, settings=config_to_dict(old), **kw)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
