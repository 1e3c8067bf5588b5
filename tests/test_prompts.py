"""nla.models.prompts: chat rendering, exactly one BOS, the response format and its parser."""

from __future__ import annotations

import pytest
from conftest import TINY_ARCHS
from hypothesis import given
from hypothesis import strategies as st

from nla.errors import NLAError
from nla.models.loading import load_tokenizer
from nla.models.prompts import (
    DEFAULT_AV_TEMPLATE,
    adds_bos,
    completion_suffix,
    encode_rendered,
    end_token_ids,
    format_response,
    parse_explanation,
    render_chat,
    user_content,
)


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tok(request: pytest.FixtureRequest) -> tuple[str, object]:
    return request.param, load_tokenizer(f"tiny:{request.param}")


def test_exactly_one_bos(tok: tuple[str, object]) -> None:
    arch, t = tok
    text = render_chat(t, user_content(DEFAULT_AV_TEMPLATE, "§"))
    ids = encode_rendered(t, text)
    bos = t.bos_token_id  # type: ignore[attr-defined]
    if arch in ("llama", "gemma"):
        # The trap: the template writes {{ bos_token }} and the tokenizer adds BOS as well.
        assert text.startswith(t.bos_token)  # type: ignore[attr-defined]
        assert adds_bos(t)
        assert t.encode(text)[:2] == [bos, bos]  # type: ignore[attr-defined]
        assert ids[0] == bos and ids.count(bos) == 1
    else:
        assert bos is None or bos not in ids


def test_double_bos_is_refused() -> None:
    t = load_tokenizer("tiny:llama")
    with pytest.raises(NLAError, match="two BOS"):
        encode_rendered(t, t.bos_token + t.bos_token + "hello")


def test_gpt2_without_chat_template_uses_plain_chat() -> None:
    t = load_tokenizer("tiny:gpt2")
    assert not getattr(t, "chat_template", None)
    assert render_chat(t, "hi") == "User: hi\nAssistant: "
    assert completion_suffix(t, "hi", "<explanation>x</explanation>") == "<explanation>x</explanation><|endoftext|>"


def test_completion_suffix_and_end_tokens(tok: tuple[str, object]) -> None:
    _arch, t = tok
    content = user_content(DEFAULT_AV_TEMPLATE, "§")
    suffix = completion_suffix(t, content, format_response("a cat"))
    assert suffix.startswith("<explanation>a cat</explanation>")
    ends = end_token_ids(t)
    tail = t.encode(suffix, add_special_tokens=False)  # type: ignore[attr-defined]
    # The answer ends with the template's end-of-turn token, which stops generation.
    assert any(i in ends for i in tail)
    assert t.eos_token_id in ends  # type: ignore[attr-defined]


def test_user_content_tags_and_placeholder() -> None:
    assert user_content("see {marker}", "§") == "see §"
    assert user_content("see {marker}", "§", tag="m1") == "Model: m1\nsee §"
    assert user_content("[{tag}] {marker}", "§", tag="m1") == "[m1] §"
    with pytest.raises(NLAError, match="no \\{marker\\}"):
        user_content("no placeholder", "§")


def test_parse_explanation() -> None:
    assert parse_explanation("<explanation>a list of names</explanation>") == "a list of names"
    assert parse_explanation("junk <explanation>\n spaced \n</explanation> tail") == "spaced"
    assert parse_explanation("<explanation>cut off before the clo") is None  # truncated
    assert parse_explanation("no tags at all") is None
    assert parse_explanation("<explanation>  </explanation>") is None  # empty is not an explanation


@given(st.text(alphabet=st.characters(blacklist_characters="<>"), min_size=1).filter(lambda s: s.strip()))
def test_format_parse_round_trip(text: str) -> None:
    assert parse_explanation(format_response(text)) == text.strip()
