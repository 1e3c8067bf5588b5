"""The teacher prompt's parser: strict on shape, and the canonical stored form round-trips."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nla.label.prompt import (
    PROMPT_VERSION,
    build_messages,
    explanation_features,
    format_analysis,
    format_explanation,
    normalize_answer,
    parse_analysis,
)

F1 = "The passage defines Python's assert statement and its grammar in a reference manual."
F2 = "The text ends right after an opening quote, so the keyword itself comes next."


def test_prompt_carries_the_context_and_version() -> None:
    messages = build_messages("x = 1\nassert")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "x = 1\nassert" in messages[1]["content"]
    assert "<analysis>" in messages[0]["content"] and PROMPT_VERSION


def test_well_formed_answers_parse() -> None:
    assert parse_analysis(f"<analysis>\n- {F1}\n- {F2}\n</analysis>") == [F1, F2]
    # numbered lists, other bullets, thinking before the block, extra blank lines
    text = f"Let me think. <analysis>\n\n1. {F1}\n2) {F2}\n</analysis>\n"
    assert parse_analysis(text) == [F1, F2]
    assert parse_analysis(f"<ANALYSIS>\n* {F1}\n• {F2}\n</ANALYSIS>") == [F1, F2]
    # a tag-like string inside a quotation is content (the passage quoted it), not a stray tag
    quoting = 'It ends with "\'<subject> == NAME", and the model predicts "1" next.'
    assert parse_analysis(f"<analysis>\n- {F1}\n- {quoting}\n</analysis>") == [F1, quoting]
    # the last block counts when a model quotes the tags first
    quoted = f"I will write <analysis>...</analysis>. <analysis>\n- {F1}\n- {F2}\n</analysis>"
    assert parse_analysis(quoted) == [F1, F2]


def test_malformed_answers_are_rejected() -> None:
    bad = [
        None,
        "",
        f"- {F1}\n- {F2}",  # no tags
        f"<analysis>\n- {F1}\n- {F2}",  # never closed
        f"<analysis>\n- {F1}\n</analysis>",  # one feature
        f"<analysis>{F1} {F2}</analysis>",  # one line
        "<analysis>\n- yes\n- no\n</analysis>",  # too short to be features
        "<analysis>\n" + "\n".join(f"- {F1}" for _ in range(5)) + "\n</analysis>",  # too many
        f"<analysis>\n- {F1}\n- {F2} <explanation>\n</analysis>",  # stray tag
    ]
    for text in bad:
        assert parse_analysis(text) is None, text


def test_canonical_form() -> None:
    stored = normalize_answer(f"<analysis>\n1.   {F1}\n2. {F2}   \n</analysis>")
    assert stored == f"- {F1}\n- {F2}"
    assert explanation_features(stored) == [F1, F2]
    assert normalize_answer(format_analysis([F1, F2])) == stored


@given(st.lists(st.lists(st.sampled_from(["alpha", "beta", "gamma's", "(x)", "1.5", "end."]),
                         min_size=3, max_size=30), min_size=2, max_size=4))
def test_round_trip(words: list[list[str]]) -> None:
    features = [" ".join(w) for w in words]
    assert parse_analysis(format_analysis(features)) == features
    assert explanation_features(format_explanation(features)) == features
