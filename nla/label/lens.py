"""The ``lens`` teacher: offline, deterministic explanations read off the base model itself.

For each row it runs the dataset's base model on the row's context (batched, left padding)
and writes three features in the prompt's ``<analysis>`` shape, each a checkable fact about
that position. Two styles:

* ``short`` (``--teacher lens``, the default): about 30 tokens, no fixed wording beyond a
  leading word per line, so every token the AV and AR spend is on something the vector holds::

      - ends "of the given type"
      - predicts "." then "," or "of"
      - about "literal", "evaluation", "object"

* ``long`` (``--teacher lens-long``, the format before lens-v2): 10–20 words per feature in full
  sentences, about 90 tokens, a third of them the same preamble on every row.

The three facts in both: the very end of the text (the current token and the few words before
it, what the residual stream at layer K is mostly about), the model's own top next-token
predictions (softmax of the logits at the last token), and the passage's most distinctive
words (tf-idf of the context against the corpus of documents in the dataset); the long style
adds where the current sentence stands.

It needs no API and no key, so a fresh checkout can run the whole pipeline; its explanations are
plain, but they differ wherever positions differ, which is what an AV must learn to read.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from typing import Any

from nla.label.prompt import format_analysis
from nla.label.providers import LabelRequest, Teacher

LENS_VERSIONS = {"short": "lens-v2", "long": "lens-v1"}
STYLES = tuple(LENS_VERSIONS)
MAX_TOKENS = 512  # longer contexts keep their last 512 tokens: the end is what predicts next

STOPWORDS = frozenset(
    ["the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was", "one", "our", "out", "has", "him", "his", "how", "its", "may", "new", "now", "old", "see", "two", "way", "who", "did", "get", "let", "put", "say", "she", "too", "use", "that", "with", "have", "this", "will", "your", "from", "they", "been", "were", "said", "each", "which", "their", "there", "what", "about", "would", "these", "other", "into", "more", "some", "than", "then", "them", "when", "where", "while", "also", "such", "only", "very", "just", "should", "could", "must", "does", "done", "being", "because", "after", "before", "between", "both", "same", "most", "many", "over", "under", "again", "once", "here", "whose", "those"]
)
_WORD = re.compile(r"[A-Za-z][A-Za-z_'-]*[A-Za-z]")
_BOUNDARY = re.compile(r"(?:[.!?][\"')\]]*\s+|\n)")


def words_of(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text) if len(w) >= 3 and w.lower() not in STOPWORDS]


def _quote(words: list[str]) -> str:
    # Double quotes inside a quoted snippet would make the feature ambiguous to read back.
    text = " ".join(w[:24] for w in words).replace('"', "'")
    return f'"{text}"'


def _n_words(text: str) -> int:
    return len(text.split())


class LensTeacher(Teacher):
    """Explanations from the base model's logits and the context; see the module docstring."""

    remote = False

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "float32",
                 batch_size: int = 16, top_k: int = 3, style: str = "short"):
        super().__init__()
        from nla.models.loading import canonical_spec

        if style not in LENS_VERSIONS:
            raise ValueError(f"lens style {style!r}: choose {', '.join(STYLES)}")
        self.style = style
        # The provider name carries the style, so the label cache (keyed by provider) never
        # hands a row labelled in one style to a run asking for the other.
        self.provider = "lens" if style == "short" else f"lens-{style}"
        self.model = canonical_spec(model)
        self.device = device
        self.dtype = dtype
        self.batch_size = max(1, batch_size)
        self.top_k = top_k
        self._lm: Any = None
        self._tok: Any = None
        self._idf: dict[str, float] = {}
        self._default_idf = 1.0

    @property
    def spec(self) -> str:
        return f"lens:{self.model}"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lens_version": LENS_VERSIONS[self.style], "top_k": self.top_k}

    @property
    def cache_model(self) -> str:
        # lens-v1 (long) answers were cached as provider "lens": the version keeps them apart.
        return f"{self.model}@{LENS_VERSIONS[self.style]}"

    # ------------------------------------------------------------------ setup
    def prepare(self, contexts: dict[str, str]) -> None:
        """Document frequencies over the dataset's documents, and the model."""
        df: Counter[str] = Counter()
        for text in contexts.values():
            df.update(set(words_of(text)))
        n = len(contexts)
        self._idf = {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}
        self._default_idf = math.log(1 + n) + 1.0
        self._load()

    def _load(self) -> None:
        if self._lm is None:
            from nla.models.loading import load_model

            self._lm, self._tok = load_model(self.model, dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ the model's view
    def _predictions(self, contexts: list[str]) -> list[list[tuple[int, float]]]:
        """Top-k (token id, probability) after each context, batched with left padding.

        Rows of one document are prefixes of each other: a causal model's logits at token j of
        the longer text are those of the shorter text ending at j, so each group of prefixes
        runs once, on its longest member (positions_per_doc times fewer tokens).
        """
        import torch

        self._load()
        tok, lm = self._tok, self._lm
        encoded = []
        for c in contexts:
            seq = list(tok(c, add_special_tokens=True)["input_ids"])[-MAX_TOKENS:]
            encoded.append(seq or [tok.eos_token_id or 0])
        hosts: list[list[int]] = []  # sequences actually run
        where: list[tuple[int, int]] = [(0, 0)] * len(encoded)  # row → (host, token index)
        for i in sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i)):
            seq = encoded[i]
            for h, host in enumerate(hosts):
                if host[: len(seq)] == seq:
                    where[i] = (h, len(seq) - 1)
                    break
            else:
                hosts.append(seq)
                where[i] = (len(hosts) - 1, len(seq) - 1)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        width = max(len(s) for s in hosts)
        ids = torch.full((len(hosts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(hosts), width), dtype=torch.long)
        for h, seq in enumerate(hosts):
            ids[h, width - len(seq):] = torch.tensor(seq)
            mask[h, width - len(seq):] = 1
        # Explicit positions: with left padding, models with absolute position embeddings
        # (GPT-2) would otherwise count the pads and shift every real token.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        columns = sorted({width - len(hosts[h]) + j for h, j in where})
        device = next(lm.parameters()).device
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                  "position_ids": positions.to(device)}
        with torch.no_grad():
            try:
                # Only the columns we read: the full [batch, len, vocab] logits would be most
                # of the memory and a good part of the time with a 49k-token vocabulary.
                logits = lm(**inputs, logits_to_keep=torch.tensor(columns, device=device)).logits
                col = {c: k for k, c in enumerate(columns)}
            except TypeError:
                logits = lm(**inputs).logits
                col = {c: c for c in columns}
        picked = torch.stack([logits[h, col[width - len(hosts[h]) + j]] for h, j in where]).float()
        top = torch.topk(torch.softmax(picked, dim=-1), self.top_k, dim=-1)
        return [
            [(int(i), float(p)) for i, p in zip(idx.tolist(), val.tolist())]
            for idx, val in zip(top.indices.cpu(), top.values.cpu())
        ]

    def _token(self, token_id: int) -> str:
        tok = self._tok
        if token_id == tok.eos_token_id:
            return "end-of-text"
        text = tok.decode([token_id])
        if "\ufffd" in text:
            return "byte-fragment"  # part of a multi-byte character: no text to quote
        if not text.strip():
            return "newline" if "\n" in text else ("tab" if "\t" in text else "space")
        return _quote(text.split())

    # ------------------------------------------------------------------ the features
    def _ranked(self, context: str, k: int) -> list[str]:
        """The context's k highest tf-idf words (ties broken alphabetically, so deterministic)."""
        tf = Counter(words_of(context))
        return sorted(tf, key=lambda w: (-tf[w] * self._idf.get(w, self._default_idf), w))[:k]

    def distinctive(self, context: str, k: int = 3) -> str:
        ranked = self._ranked(context, k)
        quoted = [_quote([w]) for w in ranked]
        if len(quoted) >= 3:
            return (f"Its most distinctive words, compared with the rest of the corpus, are "
                    f"{quoted[0]}, {quoted[1]} and {quoted[2]}.")
        if len(quoted) == 2:
            return (f"Its most distinctive words, compared with the rest of the corpus, are "
                    f"{quoted[0]} and {quoted[1]}.")
        if quoted:
            return f"Its most distinctive word, compared with the rest of the corpus, is {quoted[0]}."
        return "The passage has almost no ordinary words, mostly symbols, numbers or very short tokens."

    @staticmethod
    def sentence(context: str) -> str:
        starts = [m.end() for m in _BOUNDARY.finditer(context)]
        start = starts[-1] if starts else 0
        current = context[start:].split()
        if not current:
            before = context.split()[-3:]
            if not before:
                return "Nothing has been written yet apart from whitespace, so any opening token could follow."
            return f"A new sentence or line is about to begin, right after {_quote(before)}."
        n = len(current)
        if n <= 3:
            return f"The current sentence or line has only just started: {_quote(current)}, {n} word{'s' * (n > 1)} so far."
        return f"The current sentence or line started with {_quote(current[:3])} and is {n} words long so far."

    def ending(self, context: str, top: list[tuple[int, float]]) -> str:
        guesses = [self._token(t) for t, _ in top]
        p = top[0][1] * 100
        pct = f"{p:.0f}%" if p >= 1 else "under 1%"
        rest = " or ".join(guesses[1:3])
        words = context.split()
        for n in (3, 2, 1):
            tail = _quote(words[-n:]) if words else "whitespace"
            if words and context[-1:].isspace():
                tail += " and a " + ("line break" if context.endswith("\n") else "space")
            text = f"It ends with {tail}, and the model predicts {guesses[0]} ({pct}) next"
            text += f", then {rest}." if rest else "."
            if _n_words(text) <= 20:
                return text
        return text

    def features(self, context: str, top: list[tuple[int, float]]) -> list[str]:
        if self.style == "short":
            return [self.short_ending(context), self.short_next(top), self.short_topic(context)]
        return [self.distinctive(context), self.sentence(context), self.ending(context, top)]

    # ------------------------------------------------------------------ the short style
    @staticmethod
    def short_ending(context: str, n_words: int = 4) -> str:
        """The last few words as the model saw them (the current token is the last of them)."""
        words = context.split()
        if not words:
            return "ends in whitespace only"
        text = f"ends {_quote(words[-n_words:])}"
        if len(words) == 1:
            text += " at the start"  # a feature needs three words to parse (label/prompt.py)
        trailing = context[len(context.rstrip()):]
        if trailing:
            text += " then a " + ("line break" if "\n" in trailing else "space")
        return text

    def short_next(self, top: list[tuple[int, float]]) -> str:
        # Distinct tokens can read the same ("newline" for "\n" and "\n\n"): say each once.
        guesses = list(dict.fromkeys(self._token(t) for t, _ in top))
        text = f"predicts {guesses[0]}"
        if len(guesses) > 1:
            text += " then " + " or ".join(guesses[1:3])
        return text if len(text.split()) >= 3 else text + " next"

    def short_topic(self, context: str, k: int = 3) -> str:
        """The passage's most distinctive words, without a sentence around them."""
        ranked = self._ranked(context, k)
        if not ranked:
            return "about symbols and numbers"
        quoted = ", ".join(_quote([w]) for w in ranked)
        return f"about {quoted}" if len(ranked) >= 2 else f"about {quoted} only"

    def _explain_sync(self, batch: list[LabelRequest]) -> list[str | None]:
        # Rows whose dataset stored the model's next tokens (`nla extract --next-tokens`) need no
        # forward pass here; the others (older datasets, fewer stored than top_k) get one.
        tops: list[list[tuple[int, float]] | None] = [
            list(r.next_tokens[: self.top_k]) if r.next_tokens and len(r.next_tokens) >= self.top_k else None
            for r in batch
        ]
        missing = [i for i, t in enumerate(tops) if t is None]
        if missing:
            for i, top in zip(missing, self._predictions([batch[i].context for i in missing]), strict=True):
                tops[i] = top
        self.usage.requests += len(batch)
        return [format_analysis(self.features(r.context, t or [])) for r, t in zip(batch, tops, strict=True)]

    async def explain(self, batch: list[LabelRequest]) -> list[str | None]:
        return await asyncio.to_thread(self._explain_sync, batch)
