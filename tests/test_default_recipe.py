"""The embedded default's recipe on the real SmolLM2-135M: short lens labels and AV SFT.

Asserts only what cannot be flaky: the labels parse in the format the AV is trained to write,
and a few AV steps lower the held-out loss (the AV starts from a chat model that has never
seen the format, so the first steps always help). Quality figures of the full run live in
docs/benchmarks.md, never in a test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nla.data.store import ActivationDataset
from nla.label.prompt import explanation_features, parse_analysis
from nla.label.runner import LabelConfig, label
from nla.train.loop import read_metrics
from nla.train.sft import SFTConfig, train_sft


@pytest.mark.slow
def test_default_recipe_labels_parse_and_av_loss_falls(tmp_path: Path) -> None:
    from nla.data.extract import ExtractConfig, extract

    data = tmp_path / "data"
    extract(ExtractConfig(out=str(data), model="default", layer=20, docs=8, positions_per_doc=6, seq_len=96,
                          min_position=40, device="cpu", split="av_sft=0.5,eval=0.5"))
    summary = label(LabelConfig(data=str(data), progress=False, device="cpu", batch_size=64))
    assert summary.failed == 0 and summary.labelled > 0
    for row in ActivationDataset.open(data).rows():
        features = explanation_features(row["explanation"])
        assert parse_analysis("<analysis>\n" + row["explanation"] + "\n</analysis>") == features
        assert [f.split()[0] for f in features] == ["ends", "predicts", "about"]

    run = tmp_path / "run"
    train_sft(SFTConfig(data=str(data), out=str(run), device="cpu", progress=False, batch_size=4, max_steps=10,
                        lr=1e-3, max_length=128, eval_every=0, eval_rows=12, save_every=0), targets=["av"])
    evals = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "av_eval" and "loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0], evals
