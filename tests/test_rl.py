"""nla.train.rl and nla.train.generation: GRPO of the AV against the AR, on tiny models."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from nla.bundle import NLA, LoraSettings
from nla.cli import main
from nla.errors import NLAError
from nla.train.generation import Rollout, SamplingSettings, TransformersBackend, make_backend
from nla.train.loop import read_metrics
from nla.train.rl import (
    RLConfig,
    RLTrainer,
    batch_indices,
    completion_logprobs,
    grpo_token_loss,
    head_chunked_logprobs,
    naive_completion_logprobs,
    prepare_policy,
    train_rl,
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # The test machines are small and shared: several BLAS threads per process thrash.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def warm_start(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SFT-free tiny bundle whose AV LoRA adapter is *non-zero* (so it differs from the base)."""
    nla = NLA.initialize(dataset=str(tiny_dataset), lora=LoraSettings(r=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in nla.av_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("rl") / "warm"
    nla.save_pretrained(out)
    return out


def _rl_records(run: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["phase"] == "rl"]


# ---------------------------------------------------------------- pieces
def test_batch_indices_cover_epochs_and_are_a_function_of_step() -> None:
    first = [i for s in range(5) for i in batch_indices(10, 4, s, seed=3)]
    assert sorted(first[:10]) == list(range(10))  # epoch 0 visits every row once
    assert batch_indices(10, 4, 3, seed=3) == first[12:16]  # same step, same rows: resume-safe
    assert batch_indices(3, 7, 0, seed=0).count(0) >= 2  # a batch larger than the split wraps
    with pytest.raises(NLAError, match="no 'rl' rows"):
        batch_indices(0, 4, 0, seed=0)


def test_grpo_loss_is_reinforce_on_policy_and_clipped_off_policy() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, kl = grpo_token_loss(logp, logp.detach(), logp.detach(), adv, mask, kl_coef=0.5, clip_eps=0.2)
    assert torch.allclose(kl, torch.zeros(2))  # policy == reference
    loss.sum().backward()
    assert logp.grad is not None
    # d/dlogp of −A·ratio at ratio 1 is −A per unmasked token (token mean per sequence).
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5], [1.0, 0.0]]))
    # Ratio far above 1 + eps with A > 0: clipped, so no gradient.
    lp = torch.tensor([[0.0]], requires_grad=True)
    clipped, _ = grpo_token_loss(lp, torch.tensor([[-1.0]]), None, torch.tensor([1.0]), torch.ones(1, 1), 0.0, 0.2)
    clipped.sum().backward()
    assert lp.grad is not None and float(lp.grad.abs().sum()) == 0.0
    # k3 is non-negative and zero only at equality.
    _, kl2 = grpo_token_loss(torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.tensor([[-3.0]]),
                             torch.tensor([0.0]), torch.ones(1, 1), 1.0, 0.2)
    assert float(kl2) > 0


def test_transformers_backend_rollouts(warm_start: Path) -> None:
    nla = NLA.from_pretrained(warm_start)
    backend = TransformersBackend(nla.verbalizer)
    vecs = torch.randn(3, nla.meta.d_model, generator=torch.Generator().manual_seed(1))
    settings = SamplingSettings(max_new_tokens=6, batch_size=4)  # 4 does not divide 6: uneven chunks
    rolls = backend.generate(vecs, 2, settings, seed=5)
    assert [r.vector_index for r in rolls] == [0, 0, 1, 1, 2, 2]  # group-major
    for r in rolls:
        assert 1 <= len(r.completion_ids) <= 6
        assert r.finished == (r.completion_ids[-1] in nla.verbalizer.end_ids)
        assert r.invalid  # an untrained AV writes no <explanation> tags
    again = backend.generate(vecs, 2, settings, seed=5)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in rolls]  # seeded
    other = backend.generate(vecs, 2, settings, seed=6)
    assert [r.completion_ids for r in other] != [r.completion_ids for r in rolls]
    with pytest.raises(NLAError, match="temperature must be > 0"):
        backend.generate(vecs, 2, SamplingSettings(temperature=0.0), seed=0)


def test_vllm_backend_names_the_missing_package(warm_start: Path) -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - only where vLLM is installed
        pytest.fail("this test checks the import-failure path; vLLM is installed here")
    nla = NLA.from_pretrained(warm_start)
    with pytest.raises(NLAError, match="vLLM is not installed"):
        make_backend("vllm", nla.verbalizer, base_dir=warm_start)
    with pytest.raises(NLAError, match="unknown generation backend 'hf'"):
        make_backend("hf", nla.verbalizer)


def test_rl_without_vllm_stops_before_claiming_the_run_folder(warm_start: Path, tiny_dataset: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(["train", "rl", "--nla", str(warm_start), "--data", str(tiny_dataset), "--out", str(out),
                 "--generation-backend", "vllm", "--device", "cpu"]) != 0
    assert not out.exists()


def test_logprobs_do_not_depend_on_padding_or_batching(warm_start: Path) -> None:
    nla = NLA.from_pretrained(warm_start)
    vb = nla.verbalizer
    vecs = torch.randn(3, nla.meta.d_model, generator=torch.Generator().manual_seed(2))
    comps = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    pad = vb.tokenizer.pad_token_id
    with torch.no_grad(), vb.injector() as inj:
        together, mask = completion_logprobs(nla.av_model, inj, vb.prompt_ids(), comps, vecs, 1.0, pad)
        for i, c in enumerate(comps):
            alone, _ = completion_logprobs(nla.av_model, inj, vb.prompt_ids(), [c], vecs[i : i + 1], 1.0, pad)
            assert torch.allclose(together[i, : len(c)], alone[0], atol=1e-5)
        # The vector matters: another vector gives other log-probs for the same tokens.
        other, _ = completion_logprobs(nla.av_model, inj, vb.prompt_ids(), comps, -vecs, 1.0, pad)
    assert mask.sum().item() == sum(len(c) for c in comps)
    assert not torch.allclose(together * mask, other * mask, atol=1e-4)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep`` (older or custom models): the fallback path."""

    def __init__(self, inner: Any):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = False) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


@pytest.mark.parametrize("arch", ["gemma", "gpt2", "llama", "no_logits_to_keep"])
def test_lean_logprobs_equal_the_naive_computation(arch: str) -> None:
    """Values *and* gradients of the completion-only, chunked log-probs equal the full-vocabulary,
    every-position fp32 log-softmax, on real tiny architectures (gemma3 has a final-logit
    soft-cap path in its forward, gpt2 tied heads), several chunks per answer."""
    from nla.models.injection import Injector, MarkerTokens
    from nla.models.loading import load_model
    from nla.train.rl import supports_logits_to_keep

    model, tok = load_model(f"tiny:{'llama' if arch == 'no_logits_to_keep' else arch}")
    if arch == "no_logits_to_keep":
        model = _NoLogitsToKeep(model)
    assert supports_logits_to_keep(model) == (arch != "no_logits_to_keep")
    model.eval()  # gpt2 has dropout: two passes must see the same function (autograd still works)
    # Hooks are not entered: the injection itself is tested elsewhere, here only the scoring.
    inj = Injector(model, MarkerTokens("x", 0, 0, 0))
    vecs = torch.ones(3, 8)
    prompt = [5, 9, 11, 4]
    comps = [[7, 8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]
    pad = tok.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))

    def grads(logp: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        return [g.clone() for g in torch.autograd.grad((logp * mask * weights).sum(), params)]

    naive = naive_completion_logprobs(model, inj, prompt, comps, vecs, 0.7, pad)
    lean, mask = completion_logprobs(model, inj, prompt, comps, vecs, 0.7, pad, chunk_elements=2 * 3 * len(tok))
    assert lean.shape == naive.shape == mask.shape == (3, 7)
    # The real models take the decoder → chunked-head path (verified once); the wrapper falls back.
    assert getattr(model, "_nla_head_split_ok", None) is (None if arch == "no_logits_to_keep" else True)
    assert torch.allclose(lean * mask, naive * mask, atol=1e-5)
    for a, b in zip(grads(lean, mask), grads(naive, mask)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the reference pass: no autograd, no checkpointing
        again, _ = completion_logprobs(model, inj, prompt, comps, vecs, 0.7, pad)
    assert torch.allclose(again * mask, naive.detach() * mask, atol=1e-5)


def test_head_chunked_logprobs_never_hold_a_vocabulary_sized_tensor() -> None:
    """Autograd saves no ``[.., vocab]`` tensor (the chunks are recomputed in backward), and the
    values and gradients equal the plain computation's."""
    vocab, d = 1000, 16
    head = torch.nn.Linear(d, vocab, bias=False)
    hidden = torch.randn(2, 6, d, requires_grad=True)
    targets = torch.randint(0, vocab, (2, 6))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = head_chunked_logprobs(head, 30.0, hidden, targets, 0.8, chunk_elements=2 * 2 * vocab)
    assert out.dtype == torch.float32 and out.shape == (2, 6)
    assert saved and not any(t.shape[-1] == vocab for t in saved)
    out.sum().backward()
    got = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    logits = torch.tanh(head(hidden) / 30.0) * 30.0
    ref = torch.log_softmax(logits / 0.8, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(out, ref, atol=1e-5)
    ref.sum().backward()
    assert torch.allclose(got[0], hidden.grad, atol=1e-6)
    assert torch.allclose(got[1], head.weight.grad, atol=1e-6)


def test_lean_logprobs_with_injection_and_lora(warm_start: Path) -> None:
    nla = NLA.from_pretrained(warm_start)
    vb = nla.verbalizer
    vecs = torch.randn(2, nla.meta.d_model, generator=torch.Generator().manual_seed(4))
    comps = [[5, 6, 7, 8], [9, 10]]
    with torch.no_grad(), vb.injector() as inj:
        lean, mask = completion_logprobs(nla.av_model, inj, vb.prompt_ids(), comps, vecs, 1.0, vb.tokenizer.pad_token_id)
        naive = naive_completion_logprobs(nla.av_model, inj, vb.prompt_ids(), comps, vecs, 1.0,
                                          vb.tokenizer.pad_token_id)
    assert torch.allclose(lean * mask, naive * mask, atol=1e-5)


def test_lora_reference_is_the_warm_start_not_the_base(warm_start: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    warm = NLA.from_pretrained(warm_start)
    vb = warm.verbalizer
    vec = torch.randn(1, warm.meta.d_model, generator=torch.Generator().manual_seed(3))
    comp = [[20, 21, 22, 23]]
    pad = vb.tokenizer.pad_token_id
    with torch.no_grad(), vb.injector() as inj:
        expected, _ = completion_logprobs(warm.av_model, inj, vb.prompt_ids(), comp, vec, 1.0, pad)
        with warm.av_model.disable_adapter():
            base, _ = completion_logprobs(warm.av_model, inj, vb.prompt_ids(), comp, vec, 1.0, pad)
    assert not torch.allclose(expected, base, atol=1e-4)  # the warm-start adapter does something
    cfg = RLConfig(nla=str(warm_start), data=str(tiny_dataset), out=str(tmp_path / "r"), lora_r=4)
    recon = warm.reconstruct(["a loop over a list", "x"])
    assert warm.ar.trunk.get_input_embeddings().weight is warm.av_model.get_input_embeddings().weight
    ref = prepare_policy(warm, cfg)
    assert ref is None  # no second copy: the adapter-off policy is the reference
    # Merging the warm-start adapter rewrote the AV's base weights; the AR stopped sharing
    # them first, so it still computes what it did.
    assert torch.equal(warm.reconstruct(["a loop over a list", "x"]), recon)
    with torch.no_grad():
        for name, p in warm.av_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)  # pretend RL moved the policy
        with warm.av_model.disable_adapter(), vb.injector() as inj:
            got, _ = completion_logprobs(warm.av_model, inj, vb.prompt_ids(), comp, vec, 1.0, pad)
    assert torch.allclose(got, expected, atol=1e-5)


def test_ar_keeps_learning_on_fresh_explanations(warm_start: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = RLConfig(nla=str(warm_start), data=str(tiny_dataset), out=str(tmp_path / "r"), ar_lr=3e-3, ar_steps=1,
                   eval_rows=0)
    trainer = RLTrainer(cfg)
    vecs = trainer.vectors[:4].repeat_interleave(2, 0)
    words = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta"]
    rolls = [Rollout(i // 2, [1], words[i // 2], words[i // 2], True) for i in range(8)]
    rolls.append(Rollout(3, [1], "junk", None, False))  # invalid: the AR must not train on it
    vecs = torch.cat([vecs, trainer.vectors[:1]])
    losses = [trainer._ar_update(rolls, vecs, step) for step in range(15)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05


# ---------------------------------------------------------------- whole runs
def _letter_e_reward(tokenizer: Any, fail_at_step: int | None = None) -> Any:
    """A dense, learnable reward for an untrained AV: the share of answer tokens containing 'e'."""
    e_ids = {i for i in range(len(tokenizer)) if "e" in tokenizer.decode([i])}

    def reward(vectors: torch.Tensor, explanations: list[str | None], reconstructions: torch.Tensor,
               token_ids: list[list[int]], step: int, **ctx: Any) -> list[float]:
        if fail_at_step is not None and step == fail_at_step:
            raise KeyboardInterrupt  # a kill in the middle of a run
        return [sum(t in e_ids for t in ids) / max(len(ids), 1) for ids in token_ids]

    return reward


def test_reward_is_learned_and_a_resumed_run_continues_the_curve(
    warm_start: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    tok = NLA.from_pretrained(warm_start).tokenizer

    def cfg(out: Path, resume: bool = False) -> RLConfig:
        # Full fine-tuning (frozen reference copy) at a high lr: learnable in a couple dozen steps.
        return RLConfig(nla=str(warm_start), data=str(tiny_dataset), out=str(out), steps=30, batch_size=4,
                        group_size=4, max_new_tokens=8, lr=1e-2, lora_r=0, invalid_reward=None, train_ar=False,
                        eval_rows=0, save_every=5, seed=1, progress=False, resume=resume)

    full = tmp_path / "full"
    train_rl(cfg(full), rewards=[(_letter_e_reward(tok), 1.0)])
    recs = _rl_records(full)
    rewards = [r["reward"] for r in recs]
    assert len(rewards) == 30
    assert all(isinstance(r["kl"], float) and math.isfinite(r["kl"]) for r in recs)
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards
    assert recs[-1]["kl"] > 0  # it moved away from the reference, and says so
    assert (full / "curves.png").stat().st_size > 0
    assert NLA.from_pretrained(full).meta.av_format == "full"

    # Killed during step 13, resumed from the step-10 checkpoint: the same curve.
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_rl(cfg(cut), rewards=[(_letter_e_reward(tok, fail_at_step=12), 1.0)])
    assert len(_rl_records(cut)) == 12
    train_rl(cfg(cut, resume=True), rewards=[(_letter_e_reward(tok), 1.0)])
    resumed = [r["reward"] for r in _rl_records(cut)]
    assert [r["step"] for r in _rl_records(cut)] == list(range(1, 31))  # no duplicates after the resume
    assert resumed == pytest.approx(rewards, abs=1e-4)


def test_cli_neg_mse_end_to_end_with_lora(warm_start: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    from nla.cli import main

    out = tmp_path / "cli"
    rc = main(["train", "rl", "--nla", str(warm_start), "--data", str(tiny_dataset), "--out", str(out),
               "--steps", "3", "--batch-size", "3", "--group-size", "2", "--max-new-tokens", "10",
               "--eval-rows", "4", "--lora-r", "4", "--lr", "1e-3", "--no-progress"])
    assert rc == 0
    recs = _rl_records(out)
    assert [r["step"] for r in recs] == [1, 2, 3]
    keys = {"reward", "fve_nrm", "kl", "length", "distinct_rate", "collapse_alarm", "unparseable",
            "sec_generate", "sec_reward", "sec_update"}
    assert keys <= set(recs[0])
    assert recs[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # fresh adapter: policy == reference
    assert all(math.isfinite(r["kl"]) for r in recs)
    # An untrained AV writes nothing parseable: every rollout gets the −2 floor.
    assert recs[0]["unparseable"] == 1.0 and recs[0]["reward"] == -2.0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["phase"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3] and math.isfinite(evals[-1]["eval_fve_nrm"])
    summary = json.loads((out / "rl_summary.json").read_text())
    assert "eval_before" in summary and "collapsed" in summary
    trained = NLA.from_pretrained(out)
    assert trained.meta.av_format == "full" and trained.meta.ar_format == "peft"
    assert len(trained.verbalize(torch.randn(1, trained.meta.d_model), max_new_tokens=4)[0]) == 1


def test_mode_collapse_is_detected_and_reported(warm_start: Path, tiny_dataset: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # Every vector the same and near-greedy sampling: every rollout is the same answer, a
    # collapse by construction (a random AV's answers otherwise depend on the vector).
    import shutil

    from nla.data.store import VECTOR_COLUMN, ActivationDataset, vectors_to_arrow

    same = tmp_path / "same"
    shutil.copytree(tiny_dataset, same)
    ds = ActivationDataset.open(same)
    first = ds.vectors()[:1]
    for shard, table in ds.iter_shards():
        column = vectors_to_arrow(first.expand(table.num_rows, -1))
        ds.replace_shard(shard, table.set_column(table.column_names.index(VECTOR_COLUMN), VECTOR_COLUMN, column))
    cfg = RLConfig(nla=str(warm_start), data=str(same), out=str(tmp_path / "c"), steps=2, batch_size=4,
                   group_size=2, max_new_tokens=4, temperature=1e-4, eval_rows=4, progress=False)
    summary = train_rl(cfg)
    recs = _rl_records(tmp_path / "c")
    assert all(r["collapse_alarm"] for r in recs) and recs[-1]["distinct_rate"] < 0.5
    assert summary["collapsed"] is True and summary["collapse_alarm_steps"] == [1, 2]
    assert "mode collapse" in capsys.readouterr().err


def test_bad_settings_are_one_line_errors(warm_start: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    from nla.cli import main

    base = ["train", "rl", "--nla", str(warm_start), "--data", str(tiny_dataset), "--out", str(tmp_path / "x")]
    with pytest.raises(NLAError, match=r"^train rl: group_size: must be at least 2, got 1$"):
        RLTrainer(RLConfig(nla=str(warm_start), data=str(tiny_dataset), out=str(tmp_path), group_size=1))
    with pytest.raises(NLAError, match=r"^train rl: nla is required \(give --nla\)$"):
        RLTrainer(RLConfig(data=str(tiny_dataset), out=str(tmp_path)))
    with pytest.raises(NLAError, match="--eval-split 'rl': choose a held-out split"):
        RLTrainer(RLConfig(nla=str(warm_start), data=str(tiny_dataset), out=str(tmp_path), eval_split="rl"))
    assert main([*base, "--reward", "nope"]) == 2
    assert main([*base, "--reward", "neg_mse", "contrastive", "--reward-weights", "1"]) == 2
    assert main([*base, "--generation-backend", "vllm"]) == 2


@pytest.mark.slow
def test_rl_step_on_the_embedded_default(tmp_path: Path) -> None:
    """One GRPO step (and its checkpoint) on SmolLM2-135M: the real model's shapes and template."""
    from conftest import make_dataset

    data = make_dataset(tmp_path / "data", arch="llama", docs=8, model="default", min_position=20, seq_len=64)
    NLA.initialize(dataset=str(data), lora=LoraSettings(r=4)).save_pretrained(tmp_path / "init")
    cfg = RLConfig(nla=str(tmp_path / "init"), data=str(data), out=str(tmp_path / "rl"), steps=1, batch_size=2,
                   group_size=2, max_new_tokens=6, lora_r=4, eval_rows=2, progress=False)
    summary = train_rl(cfg)
    (rec,) = _rl_records(tmp_path / "rl")
    assert math.isfinite(rec["kl"]) and math.isfinite(rec["reward"]) and summary["steps"] == 1
    assert NLA.from_pretrained(tmp_path / "rl").meta.d_model == 576


def test_a_gain_made_of_hedging_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nla.train import loop
    from nla.train.rl import summarize_rl_run

    def write(after_top1: float) -> dict[str, Any]:
        run = tmp_path / f"run{after_top1}"
        run.mkdir()
        rows = [{"step": 0, "phase": "eval", "eval_fve_nrm": -0.30, "eval_top1": 0.21, "eval_n": 128},
                {"step": 1, "phase": "rl", "reward": -0.6, "distinct_rate": 1.0},
                {"step": 1, "phase": "eval", "eval_fve_nrm": -0.20, "eval_top1": after_top1, "eval_n": 128}]
        (run / loop.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return summarize_rl_run(run, collapse_threshold=0.3)

    # fve_nrm up while retrieval fell from 0.21 to 0.12 (beyond 2 standard errors of 0.036).
    assert write(0.12)["hedging"] is True
    assert "hedging towards the mean" in capsys.readouterr().err
    assert write(0.19)["hedging"] is False  # within noise
    assert write(0.30)["hedging"] is False
    assert "hedging" not in capsys.readouterr().err


def test_load_in_4bit_is_a_one_line_error_without_a_gpu(warm_start: Path, tiny_dataset: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """QLoRA needs CUDA + bitsandbytes: on CPU the flag fails at once, in one line, before the run
    directory exists; the shared loader refuses too, and the quantisation recipe is QLoRA's."""
    from nla.cli import main
    from nla.models.loading import load_in_4bit, load_model, loading_in_4bit, quantization_config

    out = tmp_path / "q"
    base = ["train", "rl", "--nla", str(warm_start), "--data", str(tiny_dataset), "--out", str(out),
            "--device", "cpu", "--load-in-4bit"]
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--load-in-4bit needs a CUDA GPU" in err and "Traceback" not in err
    assert not out.exists()
    assert main([*base, "--lora-r", "0"]) == 2
    assert "--lora-r 0 (full fine-tuning) cannot update them" in capsys.readouterr().err
    with pytest.raises(NLAError, match="needs a CUDA GPU"), load_in_4bit(True, "cpu"):
        pass
    assert not loading_in_4bit()  # the refused context left nothing set
    with load_in_4bit(False, "cpu"):
        model, _ = load_model("tiny:gpt2", device="cpu")  # disabled: an ordinary load
    assert next(model.parameters()).dtype == torch.float32
    q = quantization_config("float32")
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16  # fp32 compute would spend what 4-bit saves


# ---------------------------------------------------------------- several processes
RL_DDP_CONFIG = """\
rl:
  steps: 4
  batch_size: 5            # over 2 ranks: uneven shares (3 + 2 vectors)
  group_size: 2
  max_new_tokens: 6
  lr: 0.02
  lora_r: 4
  kl_coef: 0.05
  update_batch_size: 4     # cuts a rank's share into micro-batches
  reward: ["_rl_ddp:letter_e"]
  invalid_reward: null
  eval_rows: 0
  save_every: 2
  seed: 3
  device: cpu
  progress: false
"""


def test_two_process_rl_matches_one_process_and_resumes(warm_start: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    """`accelerate launch -m nla.cli train rl` with 2 CPU processes (gloo) = one process on the
    same global batch (the command docs/scaling.md gives).

    Each rank generates its share, the rewards are computed on the gathered batch, the policy
    gradients are summed over ranks, one checkpoint is written: the curve (reward, loss, KL,
    grad norm) and the final weights agree within float tolerance, and a 2-process run killed
    at step 3 and resumed continues the same curve (those two launches are `-m nla.cli` itself;
    the first goes through tests/_rl_ddp.py, which calls the CLI's main and then checks the AR
    keep-up step, which needs parseable explanations, so no CLI run on an untrained AV takes it). Launched like the SFT DDP test: `--multi_gpu` makes accelerate start two
    processes through torchrun, `device: cpu` makes them CPU processes talking over gloo.
    """
    import os
    import shutil
    import subprocess
    import sys

    # tests/ is on sys.path (pytest inserts a test folder without __init__.py), as for conftest.
    from _rl_ddp import ar_check
    from test_sft import free_port

    from nla.cli import main

    repo = Path(__file__).resolve().parents[1]
    here = Path(__file__).parent
    config = tmp_path / "rl.yaml"
    config.write_text(RL_DDP_CONFIG)
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{here}", "OMP_NUM_THREADS": "1"}
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]

    def launch(*args: str, fail_at: int | None = None) -> subprocess.CompletedProcess[str]:
        extra = {"NLA_TEST_FAIL_AT": str(fail_at)} if fail_at is not None else {}
        return subprocess.run([*launcher, "--main_process_port", str(free_port()), *args],
                              env={**env, **extra}, cwd=repo, capture_output=True, text=True)

    def rl_args(out: Path, *extra: str) -> list[str]:
        return ["-m", "nla.cli", "train", "rl", "--config", str(config), "--nla", str(warm_start),
                "--data", str(tiny_dataset), "--out", str(out), *extra]

    single, ar_one = tmp_path / "single", tmp_path / "ar1"
    assert main(rl_args(single)[2:]) == 0
    ar_check(str(warm_start), str(tiny_dataset), str(ar_one))
    # One launch: `nla train rl` through the CLI's main (what -m nla.cli runs), then the AR check.
    ddp, ar_two = tmp_path / "ddp", tmp_path / "ar2"
    res = launch(str(here / "_rl_ddp.py"), str(warm_start), str(tiny_dataset), str(ar_two), "--",
                 *rl_args(ddp)[2:])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _rl_records(single), _rl_records(ddp)
    assert [r["processes"] for r in b] == [2] * 4 and [r["processes"] for r in a] == [1] * 4
    for key in ("reward", "length", "loss", "kl", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key
    assert a[-1]["kl"] > 0  # the policy moved: the match is not that of two idle runs
    wa, wb = NLA.from_pretrained(single).av_model.state_dict(), NLA.from_pretrained(ddp).av_model.state_dict()
    assert wa.keys() == wb.keys()
    # Adam at lr 0.02 turns float-level gradient differences into ~1e-5 weight differences.
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4, rtol=1e-4) for k in wa)
    # One checkpoint per save, written once (by the main process).
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == sorted(
        p.name for p in (single / "checkpoints").iterdir())
    assert json.loads((ddp / "rl_summary.json").read_text())["processes"] == 2

    # Killed during step 3 (after the step-2 checkpoint), resumed with 2 processes: the same curve.
    cut = tmp_path / "cut"
    killed = launch(*rl_args(cut), fail_at=2)
    assert killed.returncode != 0 and len(_rl_records(cut)) == 2
    res = launch(*rl_args(cut, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    c = _rl_records(cut)
    assert [r["step"] for r in c] == [1, 2, 3, 4]
    for key in ("reward", "kl", "loss"):
        assert [r[key] for r in c] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-6), key

    # The AR keep-up step: picks split over the ranks, gradients summed, the same weights.
    la, lb = (json.loads((d / "ar_losses.json").read_text()) for d in (ar_one, ar_two))
    assert la == pytest.approx(lb, rel=1e-5) and all(math.isfinite(x) for x in la)
    pa, pb = torch.load(ar_one / "ar_params.pt"), torch.load(ar_two / "ar_params.pt")
    assert pa.keys() == pb.keys() and pa
    assert all(torch.allclose(pa[k], pb[k], atol=1e-4, rtol=1e-4) for k in pa)  # Adam at lr 1e-2, as above
    before = dict(NLA.from_pretrained(warm_start, is_trainable=True).ar.named_parameters())
    assert any(not torch.allclose(pa[k], before[k]) for k in pa)  # the AR did train: not a trivial match
