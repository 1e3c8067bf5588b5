"""The teacher prompt, the strict parser of its answers, and the stored explanation form.

A teacher sees the text up to and including the sampled token and names the 2–3 features a
language model would rely on most to predict the next token, the last one about the very end
of the text, inside ``<analysis>`` tags. Only well-formed answers are kept: a half-formed one
would teach the AV to write half-formed explanations.

The stored ``explanation`` column holds the *canonical form*: one feature per line, each line
``- <feature>`` (whitespace collapsed, no tags). The AV is trained to emit exactly that text
inside ``<explanation>`` tags; :func:`explanation_features` splits it back into features
(:func:`nla.models.prompts.parse_explanation` takes the text out of the AV's tags).

``PROMPT_VERSION`` is part of the cache key: change it whenever the wording changes, so answers
to an old prompt are never reused for a new one.
"""

from __future__ import annotations

import re

PROMPT_VERSION = "nla-teacher-v1"

MIN_FEATURES = 2
MAX_FEATURES = 4
# The prompt asks for 10–20 words; the parser is looser so a 9- or 23-word feature from an
# otherwise good answer is not thrown away (and paid for again).
MIN_WORDS = 3
MAX_WORDS = 40

SYSTEM_PROMPT = (
    "You study how language models read text. You will be shown a passage that stops right "
    "after one token. Name the 2 or 3 features of the passage that a language model would lean "
    "on most to predict the token that comes next. Make the last feature about the very end of "
    "the passage: its final words or tokens. Write each feature as one plain statement of 10 to "
    "20 words, on its own line starting with \"- \". Say only things that are true of the passage. "
    "Put the features, and nothing else, between <analysis> and </analysis>."
)

USER_TEMPLATE = "The passage (it stops right after its final token):\n<passage>\n{context}\n</passage>"


def build_messages(context: str) -> list[dict[str, str]]:
    """The chat messages for one row: a system instruction and the passage."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(context=context)},
    ]


_BLOCK = re.compile(r"<analysis>(.*?)</analysis>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?\s*[a-z_]+\s*>", re.IGNORECASE)
_QUOTED = re.compile(r'"[^"]*"')
# "- x", "* x", "• x", "1. x", "2) x", "Feature 1: x" — the shapes chat models write lists in.
_BULLET = re.compile(r"^\s*(?:[-*•–]\s+|\d+[.)]\s+|feature\s*\d+\s*[:.)-]\s*)", re.IGNORECASE)


def parse_analysis(text: str | None) -> list[str] | None:
    """The features of a teacher answer, or ``None`` if the answer is malformed.

    Well-formed: a closed ``<analysis>…</analysis>`` block (the last one counts, so a model that
    quotes the tags while thinking aloud is still read right) holding 2–4 non-empty lines, each
    a feature of 3–40 words with no leftover tags.
    """
    if not text:
        return None
    blocks = _BLOCK.findall(text)
    if not blocks:
        return None
    features = []
    for line in blocks[-1].splitlines():
        line = _BULLET.sub("", line, count=1)
        line = " ".join(line.split())
        if not line:
            continue
        # A tag inside a quotation is quoted text (documentation quotes "<subject>"), not a
        # stray tag of the answer's format.
        if "<" in line and _TAG.search(_QUOTED.sub("", line)):
            return None
        if not MIN_WORDS <= len(line.split()) <= MAX_WORDS:
            return None
        features.append(line)
    if not MIN_FEATURES <= len(features) <= MAX_FEATURES:
        return None
    return features


def format_explanation(features: list[str]) -> str:
    """The canonical stored form: ``- feature`` lines joined by newlines."""
    return "\n".join(f"- {f}" for f in features)


def explanation_features(text: str) -> list[str]:
    """The features of a stored (canonical) explanation."""
    return [line[2:] if line.startswith("- ") else line for line in text.splitlines() if line.strip()]


def normalize_answer(text: str | None) -> str | None:
    """Teacher answer → canonical explanation, or ``None`` if malformed."""
    features = parse_analysis(text)
    return format_explanation(features) if features else None


def format_analysis(features: list[str]) -> str:
    """An answer in the shape the prompt asks for (used by the offline ``lens`` teacher)."""
    return "<analysis>\n" + format_explanation(features) + "\n</analysis>"
