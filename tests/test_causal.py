"""Causal faithfulness (nla/eval/causal.py) on a tiny model: the patch lands at layer K,
the true vector recovers 100 %, μ recovers 0 %, noise recovers less, claim ablation is
measured per claim, and `nla eval` reports the block (or skips it with --no-causal).

Patching follows the activation-patching convention of TransformerLensOrg/TransformerLens,
``transformer_lens/patching.py`` (a hook overwrites one position's residual stream and the
downstream output is compared); our hook and metric are our own.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_dataset

from nla.bundle import NLA
from nla.cli import main
from nla.data.store import ActivationDataset
from nla.eval.causal import (
    base_lm,
    causal_faithfulness,
    fraction_recovered,
    kl_div,
    patched_logprobs,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("causal")
    data = make_dataset(root / "data", docs=10, split="av_sft=0.2,ar_sft=0.4,rl=0.1,eval=0.3")
    bundle = root / "bundle"
    NLA.initialize(dataset=data, device="cpu").save_pretrained(bundle)
    return data, bundle


@pytest.fixture(scope="module")
def loaded(setup: tuple[Path, Path]) -> tuple[NLA, ActivationDataset]:
    data, bundle = setup
    return NLA.from_pretrained(bundle, device="cpu"), ActivationDataset.open(data)


def test_patch_is_at_block_k_output(loaded: tuple[NLA, ActivationDataset]) -> None:
    """The state the hook replaces is hidden_states[K + 1] (docs/design.md §2), and patching it
    with itself leaves the next-token distribution unchanged."""
    nla, _ = loaded
    ids = nla.tokenizer.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=True)
    with base_lm(nla) as model:
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        logp, clean = patched_logprobs(model, nla.meta.layer_index, ids, hs[nla.meta.layer_index + 1][0, -1:].float())
    assert torch.allclose(clean, hs[nla.meta.layer_index + 1][0, -1].float(), atol=1e-5)
    assert not torch.allclose(clean, hs[nla.meta.layer_index][0, -1].float(), atol=1e-3)
    assert float(kl_div(logp[:1], logp[1:2])) < 1e-6


def test_true_vector_recovers_all_and_mean_none(loaded: tuple[NLA, ActivationDataset]) -> None:
    nla, ds = loaded
    rows, vecs = ds.rows()[:12], ds.vectors()[:12]
    ctx = [r["context"] for r in rows]
    mean = ds.mean_vector()
    true_block, _ = causal_faithfulness(nla, ctx, vecs, vecs, mean)
    mean_block, _ = causal_faithfulness(nla, ctx, vecs, mean.expand(len(vecs), -1), mean)
    noise_block, noise_rows = causal_faithfulness(nla, ctx, vecs, torch.randn(vecs.shape, generator=torch.Generator().manual_seed(0)), mean)
    assert true_block["rows_left_out"] == 0 and true_block["n"] == 12
    assert true_block["kl"]["mean_ablation"] > 1e-4  # μ changes the prediction: there is something to recover
    assert true_block["fraction_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert true_block["kl"]["true_vector"] < 1e-5
    assert mean_block["fraction_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert noise_block["fraction_recovered"] < 0.9
    assert all(v is not None and v >= 0 for v in noise_rows.kl_recon)


def test_scale_of_the_patch_does_not_matter(loaded: tuple[NLA, ActivationDataset]) -> None:
    """Only the direction is patched: the AR's output norm is not a model state's norm."""
    nla, ds = loaded
    rows, vecs = ds.rows()[:4], ds.vectors()[:4]
    mean = ds.mean_vector()
    noise = torch.randn(vecs.shape, generator=torch.Generator().manual_seed(1))
    a, _ = causal_faithfulness(nla, [r["context"] for r in rows], vecs, noise, mean)
    b, _ = causal_faithfulness(nla, [r["context"] for r in rows], vecs, noise * 37.0, mean)
    assert a["kl"]["reconstruction"] == pytest.approx(b["kl"]["reconstruction"], rel=1e-4)


def test_claim_ablation_per_claim(loaded: tuple[NLA, ActivationDataset]) -> None:
    nla, ds = loaded
    rows, vecs = ds.rows()[:3], ds.vectors()[:3]
    texts = ["Python code. A function call. Documentation text.", "one claim only", "Lists. Loops. Strings."]
    recon = nla.reconstruct(texts)
    block, per = causal_faithfulness(nla, [r["context"] for r in rows], vecs, recon, ds.mean_vector(), texts)
    assert [len(d) for d in per.claim_delta_kl] == [3, 0, 3]
    ca = block["claim_ablation"]
    assert ca["rows_with_claims"] == 2
    assert [e["n"] for e in ca["per_claim_index"]] == [2, 2, 2]
    # ΔKL is KL(dropped) − KL(full), recomputed here from a direct reconstruction of the dropped text.
    dropped = nla.reconstruct(["A function call. Documentation text."])
    direct, _ = causal_faithfulness(nla, [rows[0]["context"]], vecs[:1], dropped, ds.mean_vector())
    assert per.claim_delta_kl[0][0] == pytest.approx(direct["kl"]["reconstruction"] - per.kl_recon[0], abs=1e-6)


def test_fraction_recovered_edges() -> None:
    assert fraction_recovered(0.0, 2.0) == 1.0
    assert fraction_recovered(2.0, 2.0) == 0.0
    assert fraction_recovered(4.0, 2.0) == -1.0
    assert fraction_recovered(1.0, 0.0) is None


def test_eval_reports_causal_block(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, bundle = setup
    fast = ["--max-new-tokens", "8", "--best-of", "0", "--bootstrap", "0", "--no-progress", "--device", "cpu"]
    out = tmp_path / "r"
    assert main(["eval", "--nla", str(bundle), "--data", str(data), "--out", str(out), *fast]) == 0
    m = json.loads((out / "metrics.json").read_text())
    c = m["causal"]
    assert c["enabled"] and c["n"] + c["rows_left_out"] == m["dataset"]["rows_evaluated"]
    assert c["fraction_recovered_true_vector"] == pytest.approx(1.0, abs=1e-3)
    assert c["kl"]["shuffled_reconstruction"] is not None
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert "causal_kl" in sample and "causal_claim_delta_kl" in sample
    assert (out / "plots" / "causal_kl.png").stat().st_size > 1000
    assert 'id="causal"' in (out / "index.html").read_text()
    skip = tmp_path / "skip"
    assert main(["eval", "--nla", str(bundle), "--data", str(data), "--out", str(skip), "--no-causal", *fast]) == 0
    assert json.loads((skip / "metrics.json").read_text())["causal"] == {"enabled": False}
    assert "causal block not run" in (skip / "index.html").read_text()


def test_per_position_check_and_api(loaded: tuple[NLA, ActivationDataset]) -> None:
    """The explorer's per-token check is the eval block's patching at one position."""
    import httpx

    from nla.eval.causal import causal_at_positions
    from nla.serve import ServeConfig, create_app, running_server

    nla, _ = loaded
    text = "A for loop repeats a block of code"
    ids = nla.tokenizer.encode(text, add_special_tokens=True)
    recon = nla.reconstruct(["loops in Python", "a keyword"])
    mean = nla.mean_vector
    assert mean is not None
    got = causal_at_positions(nla, ids, [3, len(ids) - 1], recon, mean)
    block, _ = causal_faithfulness(nla, [nla.tokenizer.decode(ids, skip_special_tokens=True)],
                                   nla.base_states(ids)[1][-1:], recon[1:], mean)
    assert got[1]["kl_reconstruction"] == pytest.approx(block["kl"]["reconstruction"], rel=1e-4)
    assert got[1]["kl_mean_ablation"] == pytest.approx(block["kl"]["mean_ablation"], rel=1e-4)
    with running_server(create_app(nla, ServeConfig(torch_threads=1, default_new_tokens=4))) as url:
        r = httpx.post(url + "/v1/explain", json={"text": text, "positions": [-1], "causal": True}, timeout=60).json()
        c = r["results"][0]["causal"]
        want = causal_at_positions(nla, ids, [len(ids) - 1], nla.reconstruct([r["results"][0]["explanation"]
                                                                              or r["results"][0]["raw"] or " "]), mean)[0]
        assert c["kl_reconstruction"] == pytest.approx(want["kl_reconstruction"], rel=1e-4)
        assert c["fraction_recovered"] == pytest.approx(want["fraction_recovered"], rel=1e-4)
        plain = httpx.post(url + "/v1/explain", json={"text": text, "positions": [-1]}, timeout=60).json()
        assert plain["results"][0]["causal"] is None


def test_lora_base_and_full_logits_agree(setup: tuple[Path, Path], loaded: tuple[NLA, ActivationDataset]) -> None:
    """The base read through a LoRA AV with its adapter disabled (and logits_to_keep passed
    through PEFT) patches exactly like the plain base model."""
    from nla.bundle import LoraSettings

    data, _ = setup
    plain, ds = loaded
    lora = NLA.initialize(dataset=data, device="cpu", lora=LoraSettings(r=2, alpha=4))
    rows, vecs = ds.rows()[:3], ds.vectors()[:3]
    noise = torch.randn(vecs.shape, generator=torch.Generator().manual_seed(2))
    a, _ = causal_faithfulness(plain, [r["context"] for r in rows], vecs, noise, ds.mean_vector())
    b, _ = causal_faithfulness(lora, [r["context"] for r in rows], vecs, noise, ds.mean_vector())
    assert a["kl"]["reconstruction"] == pytest.approx(b["kl"]["reconstruction"], rel=1e-4)
    assert b["kl"]["true_vector"] < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_cached_prefix_equals_running_every_variant_whole(arch: str) -> None:
    """patched_logprobs runs the prefix once and only the last token per variant (KV cache
    copied); it must equal patching block K's last-position output in a full forward of each
    variant (more variants than one chunk, so the cache copy per chunk is exercised)."""
    from nla.models.layers import decoder_blocks

    torch.manual_seed(0)
    nla = NLA.initialize(f"tiny:{arch}", device="cpu")
    model, k = nla.av_model, nla.meta.layer_index
    ids = nla.tokenizer("the parser reads the tokens and then builds a tree")["input_ids"]
    directions = torch.randn(20, nla.meta.d_model)
    fast, clean_state = patched_logprobs(model, k, ids, directions)

    def full(direction: torch.Tensor | None) -> torch.Tensor:
        def hook(_m: torch.nn.Module, _i: object, out: object) -> object:
            hidden = out[0] if isinstance(out, tuple) else out
            if direction is not None:
                hidden = hidden.clone()
                hidden[0, -1] = direction / direction.norm() * hidden[0, -1].norm()
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        handle = decoder_blocks(model)[k].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        finally:
            handle.remove()
        return torch.log_softmax(logits.float(), dim=-1)

    naive = torch.stack([full(None)] + [full(d) for d in directions])
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-4)
    assert clean_state.shape == (nla.meta.d_model,)


def test_prefix_groups_chain_prefixes_only() -> None:
    """Rows are grouped only where one's ``ids[:-1]`` is a prefix of the group's longest."""
    from nla.eval.causal import prefix_groups

    ids = [[1, 2, 3, 4], [1, 2], [9, 8, 7], [1, 2, 3, 4, 5, 6], [], [1, 5, 6], [9, 8, 6], [1, 2, 3, 9]]
    groups = prefix_groups(ids)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 5, 6, 7]  # the empty row is left out
    for g in groups:
        longest = ids[g[-1]][:-1]
        assert all(longest[: len(ids[i]) - 1] == ids[i][:-1] for i in g)
    # [1, 2] (prefix []) goes with a [1, ...] row; [9, 8, 7] and [9, 8, 6] share ids[:-1] == [9, 8].
    assert any(set(g) >= {2, 6} for g in groups)
    assert len(groups) <= 4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_shared_prefix_equals_per_row(arch: str) -> None:
    """Rows of one document share one prefix forward (its KV cache cut to each row's length)
    and give the per-row path's KL figures; rows of another document and a lone row still
    work. gemma's hybrid sliding-window cache cannot be cut back, so it falls back to the
    per-row path (its contexts run past the 16-token window). Cache cropping follows
    transformers' ``DynamicCache.crop`` / ``batch_repeat_interleave``
    (huggingface/transformers, ``src/transformers/cache_utils.py``)."""
    from nla.eval.causal import croppable, prefix_cache

    torch.manual_seed(0)
    nla = NLA.initialize(f"tiny:{arch}", device="cpu")
    docs = ["the parser reads the tokens and then builds a tree of nodes for every statement in the file",
            "a for loop repeats a block of code once for each item in the list it walks over"]
    contexts, vectors = [], []
    for doc, positions in zip(docs, [(3, 9, 14, 20, -1), (6, -1)]):
        ids, states = nla.base_states(doc)
        for p in positions:
            p %= len(ids)
            contexts.append(nla.tokenizer.decode(ids[: p + 1], skip_special_tokens=True))
            vectors.append(states[p])
    contexts.append("import os")  # shares nothing with the others
    vectors.append(nla.base_states("import os")[1][-1])
    vecs = torch.stack(vectors).float()
    recon = torch.randn(vecs.shape, generator=torch.Generator().manual_seed(3))
    mean = vecs.mean(0)
    shuffled = torch.roll(torch.arange(len(vecs)), 1)
    texts = ["Python code. A tree. Tokens."] * len(vecs)

    with base_lm(nla) as model:  # the model causal_faithfulness runs (loaded once, kept by nla)
        pass
    prefix_forwards: list[int] = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, inp, _o: prefix_forwards.append(1) if inp[0].shape[1] > 1 else None)
    try:
        per_row, a = causal_faithfulness(nla, contexts, vecs, recon, mean, texts, shuffled=shuffled, share_prefix=False)
        per_row_forwards, prefix_forwards[:] = len(prefix_forwards), []
        grouped, b = causal_faithfulness(nla, contexts, vecs, recon, mean, texts, shuffled=shuffled)
    finally:
        handle.remove()
    can_crop = croppable(prefix_cache(model, nla.tokenizer.encode(docs[0])))
    assert can_crop == (arch != "gemma")
    assert per_row_forwards == len(contexts)
    # One prefix forward per document and one for the lone row where the cache can be cut.
    assert len(prefix_forwards) == (3 if can_crop else len(contexts))
    assert per_row["n"] == grouped["n"] >= len(contexts) - 1
    for name in ("kl_recon", "kl_mean", "kl_true", "kl_shuffled"):
        x, y = getattr(a, name), getattr(b, name)
        assert [v is None for v in x] == [v is None for v in y]
        torch.testing.assert_close(torch.tensor([v for v in x if v is not None]),
                                   torch.tensor([v for v in y if v is not None]), rtol=1e-5, atol=1e-6)
    assert [len(d) for d in a.claim_delta_kl] == [len(d) for d in b.claim_delta_kl] == [3] * len(contexts)
    torch.testing.assert_close(torch.tensor([d for ds in a.claim_delta_kl for d in ds if d is not None]),
                               torch.tensor([d for ds in b.claim_delta_kl for d in ds if d is not None]),
                               rtol=1e-5, atol=1e-6)
    # A ratio of means: float rounding of the two forwards (1e-6 relative per KL) adds up.
    assert grouped["fraction_recovered"] == pytest.approx(per_row["fraction_recovered"], rel=1e-4)
