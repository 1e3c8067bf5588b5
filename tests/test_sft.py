"""Warm-start SFT of AV and AR (`nla train av|ar|sft`) on tiny random models."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_dataset

from nla.data.store import VECTOR_COLUMN, ActivationDataset, arrow_to_vectors, make_table
from nla.errors import NLAError
from nla.train.loop import latest_checkpoint, read_metrics
from nla.train.sft import (
    SFTConfig,
    av_labels,
    micro_batches,
    pad_right,
    padding_fraction,
    plan_steps,
    train_sft,
)

REPO = Path(__file__).resolve().parents[1]


# Eight classes of explanation; each row's vector is its class's direction plus a shared offset
# (an anisotropic layer, like real ones) plus a little noise, so the words determine the vector.
PHRASES = ["red apple", "blue ocean", "green forest", "loud music", "cold winter", "fast train", "old castle",
           "sweet honey"]
SPLITS = "av_sft=0.35,ar_sft=0.35,rl=0.05,eval=0.25"


def label_by_construction(path: Path, seed: int = 0, noise: float = 0.1) -> Path:
    """Give each row a phrase of PHRASES and a vector the phrase determines; recompute the stats.

    The extracted vectors of a random tiny model are replaced: labels describing its real
    contexts carry almost nothing linearly readable about them, so an AR trained on those can
    only reach the mean-direction baseline and the test could not tell learning from no learning.
    Rows keep their documents, positions, contexts and splits.
    """
    ds = ActivationDataset.open(path)
    d = ds.d_model
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(len(PHRASES), d, generator=gen)
    offset = torch.randn(d, generator=gen)
    for shard, table in ds.iter_shards():
        k = torch.randint(len(PHRASES), (table.num_rows,), generator=gen)
        vectors = offset + directions[k] + noise * torch.randn(table.num_rows, d, generator=gen)
        rows = {c: table.column(c).to_pylist() for c in ("doc_id", "position", "context", "split")}
        rows["explanation"] = [PHRASES[i] for i in k.tolist()]
        ds.replace_shard(shard, make_table(rows, vectors, d))
    ds.finalize_stats()  # the training mean vector, norms and injection scale of the new vectors
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matrices: intra-op threads only add overhead (and the test machine is shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 documents × 4 positions of tiny:gemma, labelled by construction.

    Gemma, because its random trunk's read-out state depends on the text (its embeddings are
    scaled by sqrt(d)): on tiny:llama the states of different explanations agree to cos 0.99,
    and an identity-initialised head needs hundreds of steps to pull them apart.
    """
    out = tmp_path_factory.mktemp("sft") / "data"
    make_dataset(out, arch="gemma", docs=32, split=SPLITS)
    return label_by_construction(out)


def cfg_for(data: Path, out: Path, **kw: object) -> SFTConfig:
    base: dict[str, object] = dict(data=str(data), out=str(out), device="cpu", progress=False, batch_size=8,
                                   max_steps=6, eval_every=0, save_every=0, lr=1e-3)
    base.update(kw)
    return SFTConfig(**base)  # type: ignore[arg-type]


def curve(run: Path, phase: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["phase"] == phase]


# ---------------------------------------------------------------- unit pieces
def test_labels_mask_prompt_and_padding() -> None:
    ids, mask = pad_right([[5, 6, 7, 8, 9], [5, 6, 7]], pad_id=0)
    labels = av_labels(ids, mask, [3, 2])
    assert labels.tolist() == [[-100, -100, -100, 8, 9], [-100, -100, 7, -100, -100]]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_av_loss_on_answer_logits_equals_the_full_computation(arch: str) -> None:
    """The AV loss asks the model for logits from the last prompt token on (``logits_to_keep``);
    it must equal cross-entropy over the logits of every position with the prompt masked."""
    from nla.bundle import NLA
    from nla.train.sft import AVTask, Example

    torch.manual_seed(0)
    nla = NLA.initialize(f"tiny:{arch}", device="cpu")
    task = AVTask(nla, SFTConfig(data="d", out="o", max_length=512))
    texts = ["- ends \"a b\"\n- predicts \"c\"", "- a much longer answer with many more words in it than the first"]
    batch = [Example(*nla.verbalizer.training_example(t), row=i) for i, t in enumerate(texts)]
    vectors = torch.randn(2, nla.meta.d_model)
    model = nla.av_model
    with torch.no_grad():
        loss, n = task.loss_sum(model, batch, vectors, torch.device("cpu"))
        ids, mask = pad_right([e.ids for e in batch], task.pad_id())
        labels = av_labels(ids, mask, [e.n_prompt for e in batch])
        task.injector.set_vectors(vectors)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        naive = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                  labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert n == int((labels != -100).sum()) > 0
    torch.testing.assert_close(loss, naive, rtol=1e-5, atol=1e-4)


def test_plan_is_deterministic_grouped_and_split_across_processes() -> None:
    lengths = [(i * 37) % 50 + 5 for i in range(96)]
    a = plan_steps(lengths, 8, seed=1, epochs=2, max_steps=None, group_by_length=True)
    assert a == plan_steps(lengths, 8, seed=1, epochs=2, max_steps=None, group_by_length=True)
    assert len(a) == 24 and all(len(s) == 8 for s in a)
    assert sorted(i for s in a[:12] for i in s) == list(range(96))  # one epoch = every row once
    flat = plan_steps(lengths, 8, seed=1, epochs=2, max_steps=None, group_by_length=False)
    assert padding_fraction(a, lengths, 4) < padding_fraction(flat, lengths, 4)
    # Two processes × two micro-batches cover the global batch exactly once.
    parts = [mb for rank in range(2) for mb in micro_batches(a[0], lengths, 2, 2, 2, rank)]
    assert sorted(i for mb in parts for i in mb) == sorted(a[0])
    with pytest.raises(NLAError, match="global batch"):
        plan_steps(lengths[:4], 8, 0, 1, None, True)


# ---------------------------------------------------------------- acceptance
def test_ar_beats_mean_baseline_and_av_loss_falls(labelled: Path, tmp_path: Path) -> None:
    from nla.bundle import NLA

    run = tmp_path / "run"
    # LoRA trunk at 3e-3; the fp32 identity-initialised value head learns faster (3e-2).
    cfg = cfg_for(labelled, run, max_steps=20, ar_max_steps=30, lr=3e-3, head_lr=3e-2, warmup_ratio=0.05)
    train_sft(cfg)
    records = read_metrics(run / "metrics.jsonl")
    ar_eval = [r for r in records if r["phase"] == "ar_eval"]
    start, end = ar_eval[0], ar_eval[-1]
    assert [r["step"] for r in ar_eval] == [0, 30]
    assert start["fve_nrm"] < 0  # the identity head reads another text's state
    assert start["baseline_fve_nrm"] < 0  # the mean direction: fve_meannorm 0, fve_nrm below
    assert end["fve_nrm"] > max(start["baseline_fve_nrm"] + 0.3, 0.3), ar_eval
    assert end["mse_nrm"] < start["mse_nrm"] / 4
    av_eval = [r["loss"] for r in records if r["phase"] == "av_eval"]
    assert len(av_eval) == 2 and av_eval[-1] < av_eval[0] - 0.5, av_eval
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert 0 <= start["padding_fraction"] < start["padding_fraction_ungrouped"]

    nla = NLA.from_pretrained(run)
    assert set(nla.meta.training) == {"av", "ar"}
    ds = ActivationDataset.open(labelled)
    vecs = ds.vectors("eval")
    out = nla.verbalize(vecs[:2], max_new_tokens=12)
    assert len(out) == 2 and all(o[0].raw for o in out)
    # Through the API, each phrase reconstructs nearest to its own class's mean vector.
    every, phrases = ds.vectors(), [r["explanation"] for r in ds.rows()]
    centroids = torch.stack([every[[i for i, p in enumerate(phrases) if p == ph]].mean(0) for ph in PHRASES])
    recon = nla.reconstruct(PHRASES)
    assert recon.shape == (len(PHRASES), nla.meta.d_model) and torch.isfinite(recon).all()
    sims = torch.nn.functional.normalize(recon, dim=-1) @ torch.nn.functional.normalize(centroids, dim=-1).T
    assert int((sims.argmax(-1) == torch.arange(len(PHRASES))).sum()) >= 6, sims


def test_one_process_can_train_in_fp32_then_in_bf16(tmp_path: Path) -> None:
    """accelerate's per-process state would refuse a second run with another precision;
    `--dtype float32|bfloat16` maps to accelerate's mixed precision "no"|"bf16"."""
    from nla.train.sft import make_accelerator

    assert make_accelerator(cfg_for(tmp_path, tmp_path / "a")).mixed_precision == "no"
    assert make_accelerator(cfg_for(tmp_path, tmp_path / "b", dtype="bfloat16")).mixed_precision == "bf16"
    assert make_accelerator(cfg_for(tmp_path, tmp_path / "c")).mixed_precision == "no"


def test_dtype_takes_the_shared_spelling_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--dtype` is checked when flags are read (a Literal field): the retired `--precision bf16`
    spelling and a dtype SFT cannot train in are one-line errors naming the flag."""
    from nla.cli import main

    base = ["train", "sft", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o")]
    assert main([*base, "--dtype", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--dtype: expected one of float32, bfloat16, got 'bf16'"), err
    with pytest.raises(SystemExit):
        main([*base, "--precision", "bf16"])  # the retired flag is gone
    assert "unrecognized arguments: --precision" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_value_head_fp32_under_bf16_full_finetune(labelled: Path, tmp_path: Path) -> None:
    from nla.bundle import NLA

    run = tmp_path / "bf16"
    train_sft(cfg_for(labelled, run, lora=False, dtype="bfloat16", max_steps=2, grad_accum=2,
                      gradient_checkpointing=True), ["ar"])
    nla = NLA.from_pretrained(run)
    assert nla.meta.ar_format == "full" and nla.ar.value_head.weight.dtype == torch.float32
    # Trained: the head moved away from the identity.
    assert not torch.allclose(nla.ar.value_head.weight, torch.eye(nla.meta.d_model))


# ---------------------------------------------------------------- resume
# What differs between two runs of the same settings: wall-clock time and the rates measured from it.
TIMING = {"time", "step_s", "tokens_per_s"}


def bundle_tensors(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a run's final bundle (AV and AR weights, value head, mean vector), by file and key."""
    from safetensors.torch import load_file

    return {f"{f.relative_to(run)}:{k}": v for f in sorted(run.glob("*/*.safetensors"))
            for k, v in load_file(str(f)).items()}


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same final bundle and log the same records, each (phase, step) once."""
    ra, rb = ([{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run / "metrics.jsonl")]
              for run in (a, b))
    keys = [(r["phase"], r["step"]) for r in rb]
    assert len(keys) == len(set(keys)), f"records logged twice: {keys}"
    assert [(r["phase"], r["step"], sorted(r)) for r in ra] == [(r["phase"], r["step"], sorted(r)) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        numbers = [k for k, v in x.items() if isinstance(v, float)]
        assert {k: x[k] for k in numbers} == pytest.approx({k: y[k] for k in numbers}, rel=1e-4, abs=1e-5), x
        assert {k: v for k, v in x.items() if k not in numbers} == {k: v for k, v in y.items() if k not in numbers}
    ta, tb = bundle_tensors(a), bundle_tensors(b)
    assert any("adapter_model" in k for k in ta) and "ar/value_head.safetensors:weight" in ta
    assert ta.keys() == tb.keys()
    for k in ta:  # float noise only (another process may sum in another order): the curves' tolerance
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_stopped_and_resumed_run_matches_uninterrupted(labelled: Path, tmp_path: Path) -> None:
    """Three invocations (stopped in the AR before its first checkpoint, then after it) end with
    the uninterrupted run's bundle and metrics.jsonl. The AR phase that starts over from step 0
    logs its step-0 evaluation and first step once, not once per invocation."""
    full, part = tmp_path / "full", tmp_path / "part"
    train_sft(cfg_for(labelled, full, max_steps=4, save_every=2, eval_every=2))
    train_sft(cfg_for(labelled, part, max_steps=4, save_every=2, eval_every=2, stop_after_steps=5))
    last_av = latest_checkpoint(part, "av")
    assert latest_checkpoint(part, "ar") is None and last_av is not None and last_av.name == "av-0000004"
    assert [r["step"] for r in read_metrics(part / "metrics.jsonl") if r["phase"] == "ar"] == [1]
    with pytest.raises(NLAError, match="--resume"):
        train_sft(cfg_for(labelled, part, max_steps=4, save_every=2, eval_every=2))
    with pytest.raises(NLAError, match="max_steps"):
        train_sft(cfg_for(labelled, part, max_steps=5, save_every=2, eval_every=2, resume=True))
    train_sft(cfg_for(labelled, part, max_steps=4, save_every=2, eval_every=2, resume=True, stop_after_steps=3))
    ck = latest_checkpoint(part, "ar")
    assert ck is not None and ck.name == "ar-0000002"
    train_sft(cfg_for(labelled, part, max_steps=4, save_every=2, eval_every=2, resume=True))
    for phase in ("av", "ar"):
        assert len(curve(full, phase)) == 4
        assert curve(full, phase)[0] != pytest.approx(curve(full, phase)[-1])  # it trained
    assert_same_run(full, part)


def test_stop_at_a_phase_boundary_does_not_start_the_next_phase(labelled: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A step budget spent exactly by the AV ends the invocation there: the AR is neither set up
    nor evaluated (nothing of it logged), and the resume trains it as an uninterrupted run would."""
    run = tmp_path / "run"
    train_sft(cfg_for(labelled, run, max_steps=2, stop_after_steps=2))
    out = capsys.readouterr().out
    assert "train av:" in out and "train ar:" not in out and "stopped after --stop-after-steps" in out
    assert {r["phase"] for r in read_metrics(run / "metrics.jsonl")} == {"av", "av_eval"}
    train_sft(cfg_for(labelled, run, max_steps=2, resume=True))
    assert [(r["phase"], r["step"]) for r in read_metrics(run / "metrics.jsonl") if r["phase"].startswith("ar")] == [
        ("ar_eval", 0), ("ar", 1), ("ar", 2), ("ar_eval", 2)]


def test_the_trainer_api_step_evaluate_save_resume(labelled: Path, tmp_path: Path) -> None:
    """SFTTrainer has the RL trainer's shape: set up once, then step / evaluate / save, and a new
    trainer on the saved checkpoint continues with the same optimizer, schedule and losses."""
    from nla.bundle import NLA
    from nla.train.loop import MetricsLogger
    from nla.train.sft import SFTTrainer, make_accelerator, start_bundle

    cfg = cfg_for(labelled, tmp_path / "run", max_steps=3)
    ds = ActivationDataset.open(labelled)

    def trainer(nla: NLA) -> SFTTrainer:
        return SFTTrainer(cfg, "ar", nla, ds, make_accelerator(cfg), MetricsLogger(cfg.out, enabled=False))

    a = trainer(start_bundle(cfg, torch.device("cpu"), ds))
    assert a.total == 3 and a.state.step == 0 and a.global_batch == 8
    before = a.evaluate()
    assert set(before) >= {"fve_nrm", "mse_nrm", "cosine"}
    rec = a.step(0)
    assert {"loss", "lr", "grad_norm", "skipped", "tokens"} <= set(rec) and not rec["skipped"]
    a.state.step = 1
    a.save()
    ck = latest_checkpoint(cfg.out, "ar")
    assert ck is not None and ck.name == "ar-0000001"
    after = [a.step(s)["loss"] for s in (1, 2)]
    assert a.evaluate()["mse_nrm"] < before["mse_nrm"]

    b = trainer(NLA.from_pretrained(ck, device="cpu", is_trainable=True))
    assert b.try_resume(ck) and b.state.step == 1
    assert [b.step(s)["loss"] for s in (1, 2)] == pytest.approx(after, rel=1e-5)


def free_port() -> int:
    """A port nobody listens on now (a fixed one collides with a concurrent run of this test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nla.cli", "train", *args]


def test_sigkill_then_resume_gives_the_same_curve_and_bundle(labelled: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # Enough steps after the kill point that the run cannot finish between two polls.
    steps, every = 30, 3
    common = ["ar", "--data", str(labelled), "--device", "cpu", "--no-progress", "--batch-size", "8",
              "--max-steps", str(steps), "--save-every", str(every), "--eval-every", "0", "--lr", "1e-3"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--out", str(killed)), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if latest_checkpoint(killed, "ar") is not None and len(curve(killed, "ar")) > every:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert every < len(curve(killed, "ar")) < steps
    res = subprocess.run(_cli(*common, "--out", str(killed), "--resume"), env=env, cwd=REPO, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    # The uninterrupted run, in this process: the same settings as the command line's.
    clean = tmp_path / "clean"
    train_sft(cfg_for(labelled, clean, max_steps=steps, save_every=every), ["ar"])
    a, b = curve(clean, "ar"), curve(killed, "ar")
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl") if r["phase"] == "ar"] == list(range(1, steps + 1))
    assert len(a) == steps and a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert a[0] != pytest.approx(a[-1])  # it trained: the curves agree on more than a constant
    # The same final adapter and value head, and the same records (evaluations included).
    assert_same_run(clean, killed)


# ---------------------------------------------------------------- scale
def test_two_process_ddp_matches_single_process(labelled: Path, tmp_path: Path) -> None:
    """2 processes × 2 micro-batches of 1 row = one process with 1 batch of 4 rows.

    The launch must really start two processes: `accelerate launch --cpu --num_processes 2`
    falls back to a single process without an MPI hostfile (accelerate's simple launcher), so
    the run would silently train on half the global batch. `--multi_gpu` starts two processes
    through torchrun and `--device cpu` makes them CPU processes talking over gloo.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = ["av", "--data", str(labelled), "--device", "cpu", "--no-progress", "--max-steps", "3",
              "--eval-every", "0", "--save-every", "0", "--eval-rows", "4", "--lr", "1e-3"]
    single = tmp_path / "single"  # in this process: the same settings as the command line's
    train_sft(cfg_for(labelled, single, batch_size=4, max_steps=3, eval_rows=4), ["av"])
    ddp = tmp_path / "ddp"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    res = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                          "-m", "nla.cli", "train", *common, "--batch-size", "1", "--grad-accum", "2",
                          "--out", str(ddp)], env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    start = next(r for r in read_metrics(ddp / "metrics.jsonl") if r["phase"] == "av_eval")
    assert start["processes"] == 2 and start["global_batch"] == 4
    a, b = curve(single, "av"), curve(ddp, "av")
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert a[0] != pytest.approx(a[-1])  # weights changed in between: the match is not trivial


def test_fsdp_checkpoint_weights_come_from_the_gathered_state_dict(tmp_path: Path) -> None:
    """The FSDP save path (live modules sharded) writes the full state dict's weights, by key."""
    from safetensors.torch import load_file

    from nla.bundle import NLA, LoraSettings
    from nla.train.loop import TrainerState, save_checkpoint
    from nla.train.sft import write_full_weights

    torch.manual_seed(0)
    nla = NLA.initialize("tiny:llama", lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear",
                                                         use_rslora=False))
    for target, module in (("av", nla.av_model), ("ar", nla.ar)):
        # What a gather would return: the module's own keys, other values than the live ones.
        full = {k: v.detach().clone() + 0.5 for k, v in module.state_dict().items()}
        ck = save_checkpoint(tmp_path, nla, TrainerState(target, 1, 1), keep=None,
                             write_weights=lambda p, t=target, sd=full: write_full_weights(nla, t, sd, p))
        adapter = load_file(str(ck / target / "adapter_model.safetensors"))
        assert adapter, "no adapter weights written"
        live = dict(module.named_parameters())
        for name, value in adapter.items():
            # PEFT drops the adapter name from saved keys; find the full-state-dict entry.
            match = [k for k in full if k.replace(".default", "").endswith(name.removeprefix("base_model.model."))]
            assert len(match) == 1, name
            assert torch.equal(value, full[match[0]]) and not torch.equal(value, live[match[0]])
        if target == "ar":
            head = load_file(str(ck / "ar" / "value_head.safetensors"))["weight"]
            assert torch.equal(head, full["value_head.weight"])
            reloaded = NLA.from_pretrained(ck)
            assert torch.equal(reloaded.ar.value_head.weight, full["value_head.weight"])


# ---------------------------------------------------------------- bad input
def test_unlabelled_dataset_and_bad_settings_are_one_line_errors(tiny_dataset: Path, tmp_path: Path) -> None:
    res = subprocess.run(_cli("av", "--data", str(tiny_dataset), "--out", str(tmp_path / "r"), "--device", "cpu"),
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith("run `nla label --data " + str(tiny_dataset) + "` first")
    with pytest.raises(NLAError, match="dtype: expected one of float32, bfloat16, got 'fp8'"):
        train_sft(cfg_for(tiny_dataset, tmp_path / "p", dtype="fp8"))
    with pytest.raises(NLAError, match="dataset not found"):
        train_sft(cfg_for(tmp_path / "missing", tmp_path / "q"))
    with pytest.raises(NLAError, match="--eval-split 'test' is not a split"):
        train_sft(cfg_for(tiny_dataset, tmp_path / "s", eval_split="test"))


def test_load_in_4bit_is_a_one_line_error_on_cpu(labelled: Path, tmp_path: Path) -> None:
    """QLoRA needs CUDA and bitsandbytes: on this CPU machine `nla train sft --load-in-4bit` stops
    before writing anything, in one line; with --no-lora it names the contradiction."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "nla.cli", "train", "sft", "--data", str(labelled), "--out", str(out),
                           "--device", "cpu", "--load-in-4bit", "--max-steps", "1", "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--load-in-4bit needs a CUDA GPU" in proc.stderr
    assert not out.exists()
    with pytest.raises(NLAError, match="--no-lora"):
        train_sft(cfg_for(labelled, tmp_path / "full", lora=False, load_in_4bit=True))


# ---------------------------------------------------------------- the output guard and a failed start
def test_run_folder_guard_is_the_shared_one(labelled: Path, tmp_path: Path) -> None:
    """SFT uses nla.config.claim_output like RL: another folder's files are refused without
    --force and kept with it; --force over an earlier run removes only that run's files (no stale
    checkpoint survives); a resume may change only RESUME_FREE settings; an activation dataset
    is never written into; a run saved with the retired names (init, precision) still resumes."""
    from nla.config import config_to_dict, save_config
    from nla.meta import write_yaml
    from nla.train.sft import RESUME_FREE, claim_run_dir

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine\n")
    with pytest.raises(NLAError, match="is not an output of nla train sft"):
        claim_run_dir(cfg_for(labelled, notes), ["av", "ar"])
    claim_run_dir(cfg_for(labelled, notes, force=True), ["av", "ar"])
    assert (notes / "notes.txt").read_text() == "mine\n"

    run = tmp_path / "run"
    (run / "checkpoints" / "ar-0000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine\n")
    old = cfg_for(labelled, run)
    save_config(old, run / "train_config.yaml")
    with pytest.raises(NLAError, match="pass --resume to continue it or --force"):
        claim_run_dir(old, ["av", "ar"])
    assert {"device", "force", "save_every"} <= RESUME_FREE
    claim_run_dir(cfg_for(labelled, run, resume=True, save_every=5), ["av", "ar"])
    with pytest.raises(NLAError, match=re.escape("started with lr=0.001, this resume asks for 0.002")):
        claim_run_dir(cfg_for(labelled, run, resume=True, lr=2e-3), ["av", "ar"])
    claim_run_dir(cfg_for(labelled, run, force=True), ["av", "ar"])
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    saved = {k: v for k, v in config_to_dict(cfg_for(labelled, legacy, dtype="bfloat16")).items()
             if k not in ("nla", "dtype")}
    write_yaml(legacy / "train_config.yaml", {**saved, "init": None, "precision": "bf16"})
    claim_run_dir(cfg_for(labelled, legacy, dtype="bfloat16", resume=True), ["av", "ar"])
    with pytest.raises(NLAError, match="started with dtype='bfloat16', this resume asks for 'float32'"):
        claim_run_dir(cfg_for(labelled, legacy, resume=True), ["av", "ar"])
    with pytest.raises(NLAError, match="holds an activation dataset"):
        claim_run_dir(cfg_for(labelled, labelled, force=True), ["av", "ar"])


def test_nla_bundle_must_fit_the_dataset_and_a_failed_start_does_not_block_the_rerun(
        labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--nla BUNDLE` (a start bundle) is checked against the dataset's d_model and layer, one line
    naming both values; the failed start leaves no train_config.yaml, so the same command run
    again fails for the same reason instead of asking for --resume (issue 19)."""
    from nla.bundle import NLA
    from nla.cli import main

    narrow, other_layer = tmp_path / "gpt2", tmp_path / "layer0"
    NLA.initialize("tiny:gpt2", device="cpu").save_pretrained(narrow)  # d_model 32, the dataset's is 64
    NLA.initialize("tiny:gemma", layer=0, device="cpu").save_pretrained(other_layer)  # the dataset reads layer 2
    layer = ActivationDataset.open(labelled).meta.layer_index
    assert layer != 0
    out = tmp_path / "run"
    capsys.readouterr()  # the bundles' save progress bars
    cases = [(narrow, f"dataset {labelled} has d_model=64, bundle {narrow} has d_model=32"),
             (other_layer, f"dataset {labelled} is layer {layer}, bundle {other_layer} reads layer 0")]
    for bundle, message in cases:
        for _ in range(2):  # the re-run meets the same error, not "pass --resume"
            argv = ["train", "ar", "--data", str(labelled), "--out", str(out), "--nla", str(bundle),
                    "--device", "cpu", "--no-progress", "--max-steps", "1"]
            assert main(argv) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and err.endswith(message), err
            assert not (out / "train_config.yaml").exists()
    # A start bundle that fits trains, and the run records it under the new name.
    fits = tmp_path / "fits"
    NLA.initialize(dataset=str(labelled), device="cpu").save_pretrained(fits)
    train_sft(cfg_for(labelled, out, nla=str(fits), max_steps=1), ["ar"])
    from nla.meta import read_yaml

    saved = read_yaml(out / "train_config.yaml")
    assert saved["nla"] == str(fits) and saved["dtype"] == "float32" and "init" not in saved


@pytest.mark.parametrize("bad", ["nan", "inf", "zero"])
@pytest.mark.parametrize("target", ["ar", "av"])
def test_degenerate_training_vectors_are_refused_naming_the_dataset(
        labelled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str, target: str) -> None:
    """NaN, inf or all-zero vectors in the training split stop `train ar|av` before anything is
    written, in one line naming the dataset and the split (nla.models.injection.check_vectors);
    `train ar` used to train through them and end with NaN scores."""
    from nla.cli import main

    data = tmp_path / "data"
    shutil.copytree(labelled, data)
    ds = ActivationDataset.open(data)
    split = f"{target}_sft"
    shard, table = next((sh, t) for sh, t in ds.iter_shards() if split in t.column("split").to_pylist())
    row = table.column("split").to_pylist().index(split)
    vectors = torch.from_numpy(arrow_to_vectors(table.column(VECTOR_COLUMN), ds.d_model).copy())
    vectors[row] = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0}[bad]
    rows = {c: table.column(c).to_pylist() for c in ("doc_id", "position", "context", "split", "explanation")}
    ds.replace_shard(shard, make_table(rows, vectors, ds.d_model))
    out = tmp_path / "run"
    assert main(["train", target, "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    want = "is all zeros" if bad == "zero" else "contains NaN or inf"
    assert len(err.splitlines()) == 1 and f"{data}: split '{split}'" in err and want in err, err
    assert not out.exists()
