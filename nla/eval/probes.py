"""Faithfulness probes: text edits that should (or should not) move the reconstruction.

Each probe rewrites explanations; the suite reconstructs the rewritten text with the real AR
and reports the FVE change against the unedited text. They ask whether the AR reads the
*meaning* of an explanation or a hidden code riding on its surface:

* :func:`paraphrase` — a deterministic, meaning-preserving rewrite (synonyms, claim order).
  A faithful AR barely moves; a large drop means it keyed on exact wording.
* :func:`drop_claim` — remove one claim: how much each claim carries.
* :func:`shuffle_words` — same bag of words, no syntax. A reconstruction that survives this
  intact is reading word identity (or a code in it), not the statements.

A teacher that can answer free-form prompts (an object with an async
``complete(messages) -> str | None``) adds paraphrase-by-teacher and the LLM judge; without one
those entries say why they were skipped.
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

PARAPHRASER_VERSION = "rules-v1"

# Word-for-word substitutions that keep the meaning of the plain descriptive English that
# explanations are written in. Applied only outside quotes: quoted spans are the evidence
# (tokens of the context) and must survive a paraphrase unchanged.
SYNONYMS: dict[str, str] = {
    "predicts": "expects",
    "predict": "expect",
    "predicted": "expected",
    "expects": "predicts",
    "distinctive": "characteristic",
    "words": "terms",
    "word": "term",
    "started": "began",
    "starts": "begins",
    "start": "begin",
    "begins": "starts",
    "began": "started",
    "ends": "finishes",
    "end": "finish",
    "passage": "text",
    "text": "passage",
    "current": "present",
    "compared": "contrasted",
    "shows": "displays",
    "likely": "probably",
    "probably": "likely",
    "about": "regarding",
    "mentions": "refers to",
    "describes": "depicts",
    "discusses": "talks about",
    "function": "routine",
    "uses": "employs",
    "model": "network",
    "next": "following",
    "following": "next",
    "only": "merely",
    "long": "lengthy",
    "large": "big",
    "small": "little",
    "begin": "start",
    "finish": "end",
    "topic": "subject",
    "subject": "topic",
    "token": "piece",
    "contains": "includes",
    "includes": "contains",
    "refers": "points",
}
PHRASES: list[tuple[str, str]] = [
    ("so far", "up to now"),
    ("about to", "going to"),
    ("compared with", "relative to"),
    ("right after", "just after"),
    ("is about", "concerns"),
]
_QUOTE_SPLIT = re.compile(r'("[^"]*"|\'[^\'\s][^\']*\')')
_WORD_RE = re.compile(r"[A-Za-z]+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


# --------------------------------------------------------------------------- claims
def split_claims(text: str) -> tuple[list[str], str]:
    """The claims of an explanation and the joiner that puts them back together.

    The canonical form (``- feature`` per line, see :mod:`nla.label.prompt`) splits by line;
    free prose splits by sentence.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        return [ln[2:] if ln.startswith("- ") else ln for ln in lines], "lines"
    body = lines[0] if lines else ""
    if body.startswith("- "):
        body = body[2:]
    parts = [p.strip() for p in _SENTENCE.split(body) if p.strip()]
    return parts, "sentences"


def join_claims(claims: list[str], style: str) -> str:
    if style == "lines":
        return "\n".join(f"- {c}" for c in claims)
    return " ".join(claims)


def drop_claim(text: str, index: int) -> str | None:
    """``text`` without claim ``index``; ``None`` when it has a single claim (nothing would be left)."""
    claims, style = split_claims(text)
    if len(claims) < 2 or not 0 <= index < len(claims):
        return None
    return join_claims(claims[:index] + claims[index + 1 :], style)


# --------------------------------------------------------------------------- paraphrase
def _swap_words(segment: str) -> str:
    for a, b in PHRASES:
        segment = re.sub(rf"\b{re.escape(a)}\b", b, segment)

    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        low = word.lower()
        if low not in SYNONYMS:
            return word
        out = SYNONYMS[low]
        return out[0].upper() + out[1:] if word[0].isupper() else out

    return _WORD_RE.sub(swap, segment)


def paraphrase(text: str) -> str:
    """A deterministic meaning-preserving rewrite: synonyms outside quotes, claims rotated.

    Rotating claims (the last one first) keeps the set of statements but moves every claim,
    so an AR that reads a position code ("the third line says …") is caught too.
    """
    claims, style = split_claims(text)
    rewritten = []
    for claim in claims:
        pieces = _QUOTE_SPLIT.split(claim)
        rewritten.append("".join(p if i % 2 else _swap_words(p) for i, p in enumerate(pieces)))
    if len(rewritten) > 1:
        rewritten = rewritten[-1:] + rewritten[:-1]
    return join_claims(rewritten, style)


def shuffle_words(text: str, seed: int) -> str:
    """The explanation's words in a random (seeded) order: same bag of words, no syntax."""
    words = text.split()
    rng = random.Random(seed)
    rng.shuffle(words)
    return " ".join(words)


# --------------------------------------------------------------------------- teacher hooks
PARAPHRASE_SYSTEM = (
    "Rewrite the explanation below in different words. Keep every claim and every quoted "
    "snippet exactly true; change wording and sentence structure. Answer with the rewritten "
    "explanation only, one claim per line starting with \"- \"."
)
JUDGE_SYSTEM = (
    "You grade explanations of what a language model is tracking at the final token of a "
    "passage. Score how specific and accurate the explanation is for THIS passage: 1 = generic "
    "or wrong, 3 = partly specific, 5 = specific and accurate. Answer with a single digit."
)


def teacher_can_complete(teacher: Any) -> bool:
    """Whether a teacher answers free-form prompts (needed for paraphrase and judge)."""
    return callable(getattr(teacher, "complete", None))


def run_completions(teacher: Any, prompts: list[list[dict[str, str]]], concurrency: int = 8) -> list[str | None]:
    """Ask ``teacher.complete`` for every prompt, a bounded number at a time; errors give None."""

    async def main() -> list[str | None]:
        sem = asyncio.Semaphore(max(1, concurrency))

        async def one(messages: list[dict[str, str]]) -> str | None:
            async with sem:
                try:
                    out = await teacher.complete(messages)
                except Exception:  # a failed request is a missing answer, not a failed eval
                    return None
                return out if isinstance(out, str) else None

        async with teacher:
            return list(await asyncio.gather(*(one(m) for m in prompts)))

    return asyncio.run(main())


def teacher_paraphrases(teacher: Any, texts: list[str]) -> list[str | None]:
    prompts = [[{"role": "system", "content": PARAPHRASE_SYSTEM}, {"role": "user", "content": t}] for t in texts]
    outs = run_completions(teacher, prompts)
    return [o.strip() if o and o.strip() else None for o in outs]


def parse_score(answer: str | None) -> int | None:
    """The first digit 1–5 in a judge's answer."""
    if not answer:
        return None
    m = re.search(r"[1-5]", answer)
    return int(m.group(0)) if m else None


def judge_scores(teacher: Any, contexts: list[str], explanations: list[str]) -> list[int | None]:
    prompts = [
        [{"role": "system", "content": JUDGE_SYSTEM},
         {"role": "user", "content": f"<passage>\n{c}\n</passage>\n<explanation>\n{e}\n</explanation>"}]
        for c, e in zip(contexts, explanations)
    ]
    return [parse_score(o) for o in run_completions(teacher, prompts)]

