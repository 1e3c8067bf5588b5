"""nla.models.injection: replace/add hooks, marker search, batching, KV cache, PEFT, bad input."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import TINY_ARCHS

from nla.errors import NLAError
from nla.models.injection import (
    Injector,
    MarkerTokens,
    check_vectors,
    find_marker,
    marker_positions,
)
from nla.models.layers import decoder_blocks
from nla.models.loading import load_model
from nla.models.prompts import DEFAULT_AV_TEMPLATE, encode_rendered, render_chat, user_content
from nla.models.verbalizer import InjectionSettings, Verbalizer


def _verbalizer(model: Any, tok: Any, mode: str = "replace", scale: float = 8.0) -> Verbalizer:
    def render(marker: str) -> str:
        return render_chat(tok, user_content(DEFAULT_AV_TEMPLATE, marker))

    tokens = find_marker(render, lambda t: encode_rendered(tok, t), tok)
    d = model.config.get_text_config().hidden_size
    return Verbalizer(model, tok, tokens, DEFAULT_AV_TEMPLATE, InjectionSettings(mode, scale, 1, 0.5), d)


@pytest.fixture(scope="module", params=TINY_ARCHS)
def av(request: pytest.FixtureRequest) -> tuple[str, Verbalizer]:
    model, tok = load_model(f"tiny:{request.param}", device="cpu")
    return request.param, _verbalizer(model, tok)


def _prompt(v: Verbalizer, tag: str | None = None) -> tuple[torch.Tensor, int]:
    ids = v.prompt_ids(tag)
    return torch.tensor([ids]), ids.index(v.tokens.marker_id)


def _vec(d: int, seed: int = 0, n: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 3.0


def test_marker_choice_per_tokenizer(av: tuple[str, Verbalizer]) -> None:
    arch, v = av
    code = ord(v.tokens.marker)
    # qwen/gemma tokenizers hold U+32xx characters as single tokens; llama/gpt2 take the fallback.
    if arch in ("qwen2", "qwen3", "gemma"):
        assert 0x3200 <= code < 0x3400
    else:
        assert not 0x3200 <= code < 0x3400
    ids = v.prompt_ids()
    assert ids.count(v.tokens.marker_id) == 1
    p = ids.index(v.tokens.marker_id)
    assert (ids[p - 1], ids[p + 1]) == (v.tokens.left_id, v.tokens.right_id)
    assert v.tokenizer.encode(v.tokens.marker, add_special_tokens=False) == [v.tokens.marker_id]


def test_marker_search_fails_clearly_without_candidates() -> None:
    _, tok = load_model("tiny:llama", device="cpu")
    # A template that renders every candidate twice can never give a single marker.
    with pytest.raises(NLAError, match="no usable marker"):
        find_marker(lambda m: f"{m} and {m}", lambda t: encode_rendered(tok, t), tok)


def test_replace_writes_scaled_unit_vector_into_embedding_output(av: tuple[str, Verbalizer]) -> None:
    arch, v = av
    ids, p = _prompt(v)
    emb = v.model.get_input_embeddings()
    vec = _vec(v.d_model)
    captured: list[torch.Tensor] = []
    with torch.no_grad():
        clean = emb(ids)
        with v.injector(vec):
            # Registered after the injector's hook, so it sees the injected output.
            h = emb.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
            try:
                v.model(input_ids=ids)
            finally:
                h.remove()
    out = captured[0]
    expected = vec[0] * v.injection.scale / vec[0].norm()
    torch.testing.assert_close(out[0, p], expected, rtol=1e-6, atol=1e-6)
    assert float(out[0, p].norm()) == pytest.approx(v.injection.scale, rel=1e-5)
    # Every other position keeps the module's own output, including Gemma's sqrt(d) scaling.
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[p] = False
    assert torch.equal(out[0, keep], clean[0, keep])
    if arch == "gemma":
        # Gemma scales inside the embedding module: the clean output is sqrt(d) * table row.
        raw = emb.weight[ids[0, 0]]
        torch.testing.assert_close(clean[0, 0], raw * math.sqrt(v.d_model))


def test_injection_changes_logits_at_and_after_marker_only(av: tuple[str, Verbalizer]) -> None:
    _, v = av
    ids, p = _prompt(v)
    with torch.no_grad():
        clean = v.model(input_ids=ids).logits
        with v.injector(_vec(v.d_model)):
            injected = v.model(input_ids=ids).logits
    assert torch.equal(injected[0, :p], clean[0, :p])
    changed = (injected[0, p:] - clean[0, p:]).abs().amax(-1)
    assert bool((changed > 0).all()), changed


def test_only_direction_matters_under_replace(av: tuple[str, Verbalizer]) -> None:
    _, v = av
    ids, _ = _prompt(v)
    vec = _vec(v.d_model, seed=3)
    with torch.no_grad(), v.injector(vec) as inj:
        a = v.model(input_ids=ids).logits
        inj.set_vectors(vec * 1000.0)
        b = v.model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_add_mode_adds_scaled_direction_at_inject_layer(av: tuple[str, Verbalizer]) -> None:
    _, v = av
    ids, p = _prompt(v)
    inj_layer, coef = 1, 0.5
    block = decoder_blocks(v.model)[inj_layer]
    vec = _vec(v.d_model, seed=1)

    def run(injector: Injector | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        emb = v.model.get_input_embeddings()
        hooks = []
        if injector is not None:
            injector.__enter__()
        try:
            hooks.append(emb.register_forward_hook(lambda _m, _i, o: seen.__setitem__("emb", o.detach().clone())))
            hooks.append(block.register_forward_hook(
                lambda _m, _i, o: seen.__setitem__("blk", (o[0] if isinstance(o, tuple) else o).detach().clone())))
            with torch.no_grad():
                logits = v.model(input_ids=ids).logits
        finally:
            for h in hooks:
                h.remove()
            if injector is not None:
                injector.__exit__(None, None, None)
        return seen["emb"], seen["blk"], logits

    emb0, blk0, logits0 = run(None)
    injector = Injector(v.model, v.tokens, vec, mode="add", inject_layer=inj_layer, coef=coef)
    emb1, blk1, logits1 = run(injector)
    assert torch.equal(emb1, emb0)  # add mode leaves the embeddings alone
    h = blk0[0, p]
    torch.testing.assert_close(blk1[0, p], h + coef * h.norm() * vec[0] / vec[0].norm(), rtol=1e-5, atol=1e-5)
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[p] = False
    assert torch.equal(blk1[0, keep], blk0[0, keep])
    assert torch.equal(logits1[0, :p], logits0[0, :p])
    assert bool(((logits1[0, p:] - logits0[0, p:]).abs().amax(-1) > 0).all())


def test_left_padded_batch_equals_single_rows(av: tuple[str, Verbalizer]) -> None:
    _, v = av
    tags = [None, "a much longer model tag than the others", "short"]
    prompts = [v.prompt_ids(t) for t in tags]
    assert len({len(p) for p in prompts}) == 3  # real padding happens
    vecs = _vec(v.d_model, seed=2, n=3)
    width = max(len(p) for p in prompts)
    pad = v.tokenizer.pad_token_id
    ids = torch.full((3, width), pad)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    # Explicit positions from the mask: without them a left-padded row starts at position > 0.
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), v.injector(vecs) as inj:
        batched = v.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for r, p in enumerate(prompts):
            inj.set_vectors(vecs[r])
            single = v.model(input_ids=torch.tensor([p])).logits[0]
            torch.testing.assert_close(batched[r, width - len(p):], single, rtol=1e-4, atol=1e-4)


def test_greedy_generation_with_kv_cache_equals_without(av: tuple[str, Verbalizer]) -> None:
    _, v = av
    ids, _ = _prompt(v)
    vec = _vec(v.d_model, seed=4)
    kwargs: dict[str, Any] = dict(max_new_tokens=6, do_sample=False, output_scores=True,
                                  return_dict_in_generate=True, pad_token_id=v.tokenizer.pad_token_id,
                                  eos_token_id=None, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        with v.injector(vec):
            cached = v.model.generate(input_ids=ids, use_cache=True, **kwargs)
            uncached = v.model.generate(input_ids=ids, use_cache=False, **kwargs)
        plain = v.model.generate(input_ids=ids, use_cache=True, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The injection reached the generation: the first-step logits differ from a clean run.
    assert not torch.allclose(cached.scores[0], plain.scores[0])


def test_injection_under_peft_lora(av: tuple[str, Verbalizer]) -> None:
    import copy

    from peft import get_peft_model

    from nla.bundle import LoraSettings

    _, v = av
    peft_model = get_peft_model(copy.deepcopy(v.model), LoraSettings(r=4).peft_config())
    # Non-zero LoRA B so the adapter really changes the function.
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    ids, p = _prompt(v)
    vec = _vec(v.d_model, seed=5)
    for mode in ("replace", "add"):
        inj = Injector(peft_model, v.tokens, vec, mode=mode, scale=v.injection.scale, inject_layer=1)
        with torch.no_grad():
            clean = peft_model(input_ids=ids).logits
            with inj:
                injected = peft_model(input_ids=ids).logits
        assert torch.equal(injected[0, :p], clean[0, :p])
        assert bool(((injected[0, p:] - clean[0, p:]).abs().amax(-1) > 0).all())
    # The replace hook sits on the embedding the adapter model really uses.
    captured: list[torch.Tensor] = []
    with torch.no_grad(), Injector(peft_model, v.tokens, vec, scale=v.injection.scale):
        emb = peft_model.get_input_embeddings()
        h = emb.register_forward_hook(lambda _m, _i, o: captured.append(o.detach().clone()))
        try:
            peft_model(input_ids=ids)
        finally:
            h.remove()
    torch.testing.assert_close(captured[0][0, p], vec[0] * v.injection.scale / vec[0].norm())


def test_marker_count_mismatch_is_an_error(av: tuple[str, Verbalizer]) -> None:
    _, v = av
    ids, _ = _prompt(v)
    with v.injector(_vec(v.d_model, n=2)), pytest.raises(NLAError, match=r"found 1 marker tokens .* got 2 vectors"):
        v.model(input_ids=ids)
    # A row without the marker (a prompt that lost it) is refused, never silently uninjected.
    no_marker = torch.tensor([v.tokenizer.encode("plain text without it", add_special_tokens=False)])
    with v.injector(_vec(v.d_model)), pytest.raises(NLAError, match="found 0 marker"):
        v.model(input_ids=no_marker)


def test_marker_positions_needs_both_neighbours() -> None:
    tokens = MarkerTokens("x", 7, 3, 4)
    ids = torch.tensor([[1, 3, 7, 4, 9], [3, 7, 5, 7, 4]])
    # Row 1: first 7 has the wrong right neighbour, second the wrong left one.
    assert marker_positions(ids, tokens).tolist() == [[0, 2]]


@pytest.mark.parametrize(
    ("vectors", "match"),
    [
        (torch.ones(2, 5), "width 5 does not match"),
        (torch.tensor([[1.0, float("nan"), 0.0, 1.0]]), "NaN or inf"),
        (torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, float("inf"), 0.0, 1.0]]), "vector 1 contains NaN or inf"),
        (torch.zeros(1, 4), "all zeros"),
        (torch.ones(2, 2, 4), "shape"),
    ],
)
def test_bad_vectors_are_refused(vectors: torch.Tensor, match: str) -> None:
    with pytest.raises(NLAError, match=match):
        check_vectors(vectors, 4)


def test_verbalizer_refuses_bad_vectors() -> None:
    model, tok = load_model("tiny:gpt2", device="cpu")
    v = _verbalizer(model, tok)
    for bad in (torch.ones(1, v.d_model + 1), torch.full((1, v.d_model), float("nan")), torch.zeros(v.d_model)):
        with pytest.raises(NLAError):
            v.generate(bad, max_new_tokens=2)
    with pytest.raises(NLAError, match="injection mode"):
        Injector(model, v.tokens, mode="sideways")
