"""nla.models.verbalizer: AV prompts, SFT examples, batched/sampled generation, parsing."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS

from nla.bundle import NLA
from nla.models.verbalizer import Verbalizer


@pytest.fixture(scope="module", params=TINY_ARCHS)
def av(request: pytest.FixtureRequest) -> tuple[str, Verbalizer]:
    return request.param, NLA.initialize(f"tiny:{request.param}", device="cpu").verbalizer


def test_training_example_prompt_first_then_answer(av: tuple[str, Verbalizer]) -> None:
    _arch, v = av
    ids, n_prompt = v.training_example("the word 'for' in a loop")
    assert ids[:n_prompt] == v.prompt_ids()
    answer = v.tokenizer.decode(ids[n_prompt:])
    assert answer.startswith("<explanation>the word 'for' in a loop</explanation>")
    # ... followed by the end-of-turn token the generation stops on.
    assert any(t in v.end_ids for t in ids[n_prompt:])
    assert ids[n_prompt:].index(next(t for t in ids[n_prompt:] if t in v.end_ids)) >= 1
    bos = v.tokenizer.bos_token_id
    if bos is not None:
        assert ids.count(bos) <= 1


def test_tagged_prompt_keeps_one_marker(av: tuple[str, Verbalizer]) -> None:
    _, v = av
    ids = v.prompt_ids("gemma-3-270m")
    assert ids.count(v.tokens.marker_id) == 1
    assert ids != v.prompt_ids()
    assert "gemma-3-270m" in v.prompt_text("gemma-3-270m")


def test_batched_generation_equals_one_at_a_time(av: tuple[str, Verbalizer]) -> None:
    _, v = av
    vecs = torch.randn(4, v.d_model, generator=torch.Generator().manual_seed(0))
    # Different tags give different prompt lengths, so the batch really is left-padded.
    tags: list[str | None] = [None, "tag one", None, "a considerably longer tag"]
    batched = v.generate(vecs, max_new_tokens=8, tags=tags, batch_size=4)
    for i in range(4):
        single = v.generate(vecs[i], max_new_tokens=8, tags=[tags[i]])
        assert batched[i][0].token_ids == single[0][0].token_ids
        assert batched[i][0].raw == single[0][0].raw


def test_n_samples_per_vector_and_seeded_sampling() -> None:
    v = NLA.initialize("tiny:qwen2", device="cpu").verbalizer
    vecs = torch.randn(3, v.d_model, generator=torch.Generator().manual_seed(1))
    a = v.generate(vecs, n=4, do_sample=True, max_new_tokens=6, seed=7, batch_size=5)
    b = v.generate(vecs, n=4, do_sample=True, max_new_tokens=6, seed=7, batch_size=5)
    assert [len(x) for x in a] == [4, 4, 4]
    assert [[o.token_ids for o in x] for x in a] == [[o.token_ids for o in x] for x in b]
    # Temperature-1 sampling from a random model does not give 12 identical answers.
    assert len({tuple(o.token_ids) for x in a for o in x}) > 1


def test_decode_parses_and_keeps_raw_text(av: tuple[str, Verbalizer]) -> None:
    _, v = av
    tok = v.tokenizer
    end = v.end_ids[0]
    good = tok.encode("<explanation>loop variable</explanation>", add_special_tokens=False)
    out = v._decode([*good, end, 5, 6])
    assert out.explanation == "loop variable" and not out.truncated
    assert out.token_ids == good  # cut at the end token
    cut = tok.encode("<explanation>loop vari", add_special_tokens=False)
    out = v._decode(cut)
    assert out.explanation is None and out.truncated
    assert out.raw == "<explanation>loop vari"
