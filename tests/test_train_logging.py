"""RL and eval log to TensorBoard / W&B under the same flags as SFT (--tensorboard, --wandb).

TensorBoard is in the dev extra, so the real writer runs and the event files are read back
with TensorBoard's own reader; W&B is not installed here, so its flag must fail in one line
before any work is done (W&B would need the network anyway).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from nla.bundle import NLA, LoraSettings
from nla.cli import main
from nla.train import loop


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def bundle(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("log") / "init"
    NLA.initialize(dataset=str(tiny_dataset), lora=LoraSettings(r=4)).save_pretrained(out)
    return out


def test_rl_writes_tensorboard_with_the_jsonl_numbers(bundle: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "rl"
    assert main(["train", "rl", "--nla", str(bundle), "--data", str(tiny_dataset), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--group-size", "2", "--max-new-tokens", "4",
                 "--eval-rows", "2", "--no-progress", "--tensorboard"]) == 0
    scalars = _scalars(out / "tensorboard")
    records = [r for r in loop.read_metrics(out / loop.METRICS_FILE) if r["phase"] == "rl"]
    assert [s for s, _ in scalars["rl/reward"]] == [1, 2]
    assert [v for _, v in scalars["rl/reward"]] == pytest.approx([r["reward"] for r in records])
    assert "rl/kl" in scalars and "eval/eval_fve_nrm" in scalars
    assert not any("example" in tag for tag in scalars)  # text is not a scalar


def test_eval_mirrors_its_headline_numbers_without_a_jsonl(bundle: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    import json

    torch.set_num_threads(1)
    out = tmp_path / "ev"
    assert main(["eval", "--nla", str(bundle), "--data", str(tiny_dataset), "--out", str(out), "--device", "cpu",
                 "--max-rows", "4", "--max-new-tokens", "4", "--best-of", "0", "--bootstrap", "0",
                 "--no-probes", "--no-causal", "--no-progress", "--tensorboard"]) == 0
    scalars = _scalars(out / "tensorboard")
    report = json.loads((out / "metrics.json").read_text())
    flat = loop.flatten_numbers(report)
    assert flat and {f"eval/{k}" for k in flat} == set(scalars)
    some = next(k for k in flat if "fve" in k)
    assert scalars[f"eval/{some}"] == [(0, pytest.approx(flat[some]))]
    assert not (out / loop.METRICS_FILE).exists()  # metrics.json is eval's record


def test_wandb_flag_without_the_package_is_one_line_before_any_work(bundle: Path, tiny_dataset: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert importlib.util.find_spec("wandb") is None, "this test checks the missing-package path"
    for argv in (["train", "rl", "--nla", str(bundle), "--data", str(tiny_dataset), "--out", str(tmp_path / "r")],
                 ["eval", "--nla", str(bundle), "--data", str(tiny_dataset), "--out", str(tmp_path / "e")],
                 # SFT checks the sink before the dataset (unlabelled here) and before claiming --out.
                 ["train", "sft", "--data", str(tiny_dataset), "--out", str(tmp_path / "s")]):
        assert main([*argv, "--wandb"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.splitlines() == [err] and "--wandb: the wandb package is not installed (pip install wandb)" in err
    assert not any((tmp_path / name).exists() for name in ("r", "e", "s"))


def test_flatten_numbers_keeps_finite_numbers_only() -> None:
    nested = {"a": 1, "b": {"c": 2.5, "d": {"e": float("nan"), "f": True, "g": "x"}}, "h": [1, 2]}
    assert loop.flatten_numbers(nested) == {"a": 1.0, "b/c": 2.5}
