"""SFT's ar_adapt phase: the AR trains on the AV's own greedy answers, cached, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_dataset
from test_sft import SPLITS, cfg_for, curve, label_by_construction

from nla.bundle import NLA
from nla.data.store import ActivationDataset
from nla.train.adapt import answer_text, mixed_rows
from nla.train.loop import latest_checkpoint, read_metrics
from nla.train.sft import ADAPT_ANSWERS, train_sft


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapt") / "data"
    make_dataset(out, arch="gemma", docs=16, split=SPLITS)
    return label_by_construction(out)


def adapt_cfg(data: Path, out: Path, **kw: object):  # type: ignore[no-untyped-def]
    return cfg_for(data, out, max_steps=2, ar_adapt_steps=4, ar_adapt_rows=6, ar_adapt_max_new_tokens=8,
                   save_every=2, **kw)


def cached(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / ADAPT_ANSWERS).read_text(encoding="utf-8").splitlines()]


def test_adapt_reads_the_avs_answers_and_resumes_without_asking_again(labelled: Path, tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    train_sft(adapt_cfg(labelled, full))
    assert len(curve(full, "ar_adapt")) == 4
    answers = cached(full)
    ds = ActivationDataset.open(labelled)
    ar_rows = {f"{r['doc_id']}\x00{r['position']}": i for i, r in enumerate(ds.rows("ar_sft"))}
    assert len(answers) == 6 and all(a["key"] in ar_rows for a in answers)
    # The cached texts are what the trained AV says, greedily, for those rows' vectors.
    nla = NLA.from_pretrained(full, device="cpu")
    vectors = torch.as_tensor(ds.vectors("ar_sft"))[[ar_rows[a["key"]] for a in answers]]
    now = nla.verbalizer.generate(vectors, max_new_tokens=8, do_sample=False)
    assert [a["text"] for a in answers] == [answer_text(v[0].explanation, v[0].raw) for v in now]
    assert nla.meta.training["ar_adapt"]["steps"] == 4

    # Stopped inside ar_adapt (2 AV + 2 AR + 2 adapt steps), then resumed: the same curve, and
    # the AV is not asked again (one cache line per row).
    train_sft(adapt_cfg(labelled, part, stop_after_steps=6))
    ck = latest_checkpoint(part, "ar_adapt")
    assert ck is not None and ck.name == "ar_adapt-0000002"
    train_sft(adapt_cfg(labelled, part, resume=True))
    assert cached(part) == answers
    a, b = curve(full, "ar_adapt"), curve(part, "ar_adapt")
    assert len(b) == 4 and a == pytest.approx(b, rel=1e-4, abs=1e-5)
    phases = [r["phase"] for r in read_metrics(part / "metrics.jsonl")]
    assert phases.index("ar_adapt") > max(i for i, p in enumerate(phases) if p == "ar")


def test_adapt_is_off_by_default_and_needs_a_trained_av(labelled: Path, tmp_path: Path) -> None:
    run = tmp_path / "plain"
    train_sft(cfg_for(labelled, run, max_steps=1))
    assert not (run / ADAPT_ANSWERS).exists()
    assert "ar_adapt" not in {r["phase"] for r in read_metrics(run / "metrics.jsonl")}
    # `train ar` on a fresh bundle has no trained AV whose words could be learnt: no adapt phase.
    ar_only = tmp_path / "ar_only"
    train_sft(adapt_cfg(labelled, ar_only), targets=["ar"])
    assert not (ar_only / ADAPT_ANSWERS).exists()


def test_mixed_rows_keep_every_av_row_and_the_teacher_fraction() -> None:
    av = [{"src": "av", "i": i} for i in range(30)]
    teacher = [{"src": "t", "i": i} for i in range(100)]
    rows = mixed_rows(av, teacher, 0.25, seed=0)
    assert rows[:30] == av and len(rows) == 40
    assert all(r["src"] == "t" for r in rows[30:]) and len({r["i"] for r in rows[30:]}) == 10
    assert mixed_rows(av, teacher, 0.25, seed=0) == rows
    assert mixed_rows(av, teacher, 0.0, seed=0) == av
    with pytest.raises(ValueError):
        mixed_rows(av, teacher, 1.0, seed=0)
