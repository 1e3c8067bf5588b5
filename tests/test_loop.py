"""Shared training infrastructure: schedule, NaN guard, metrics log, checkpoints, plots."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from nla.train.loop import (
    MetricsLogger,
    TrainerState,
    cosine_with_warmup,
    guarded_step,
    latest_checkpoint,
    list_checkpoints,
    plot_metrics,
    read_metrics,
    restore_checkpoint,
    save_checkpoint,
)


def test_cosine_with_warmup_shape() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = cosine_with_warmup(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))  # monotone decay after warm-up
    assert lrs[-1] < 0.05


def test_guarded_step_skips_nan_and_clears_grads() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    (p * torch.tensor([1.0, float("nan"), 1.0])).sum().backward()
    stepped, norm = guarded_step(opt, [p], max_grad_norm=1.0)
    assert not stepped and math.isnan(norm)
    assert torch.equal(p.detach(), torch.ones(3)) and p.grad is None
    (p * 2).sum().backward()
    stepped, norm = guarded_step(opt, [p], max_grad_norm=None)
    assert stepped and norm == pytest.approx(math.sqrt(12))
    assert torch.allclose(p.detach(), torch.full((3,), 0.8))


def test_metrics_logger_truncate_and_plot(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path)
    for step in range(1, 6):
        log.log(step, {"loss": 1.0 / step, "note": "x", "bad": float("nan")})
    log.log(5, {"fve_nrm": 0.3}, phase="eval")
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 9, "lo')  # a kill mid-write
    log.truncate_after(3, phase="train")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if r["phase"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in records if r["phase"] == "eval"] == [5]
    assert records[0]["bad"] == "nan"
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics(tmp_path / "none.jsonl", tmp_path / "x.png") is None


def test_checkpoint_round_trip_restores_optimizer_scheduler_rng(tmp_path: Path) -> None:
    from nla.bundle import NLA

    nla = NLA.initialize("tiny:llama")
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = cosine_with_warmup(opt, 2, 10)
    for _ in range(3):
        (p * p).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    torch.manual_seed(123)
    for step in (3, 6, 9):
        save_checkpoint(tmp_path, nla, TrainerState("av", step, 10), opt, sched, keep=2)
    assert [c.name for c in list_checkpoints(tmp_path, "av")] == ["av-0000006", "av-0000009"]
    expected_next = torch.rand(3)
    # A half-written checkpoint (no trainer_state.json) is never picked.
    (tmp_path / "checkpoints" / "av-0000012").mkdir()
    last = latest_checkpoint(tmp_path, "av")
    assert last is not None and last.name == "av-0000009"

    q = torch.nn.Parameter(torch.ones(4))
    opt2 = torch.optim.AdamW([q], lr=0.1)
    sched2 = cosine_with_warmup(opt2, 2, 10)
    torch.manual_seed(999)
    state = restore_checkpoint(last, opt2, sched2)
    assert state.step == 9 and state.phase == "av" and state.total_steps == 10
    assert torch.equal(torch.rand(3), expected_next)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    # Each checkpoint is a complete bundle.
    loaded = NLA.from_pretrained(last)
    assert loaded.meta.layer_index == nla.meta.layer_index
