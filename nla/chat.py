"""Chat transcripts as the base model reads them: rendered with the model's own chat template,
each token tagged with the role of the turn it belongs to.

NLAs are most often used to read a model's state while it answers a user, so ``explain()``
and the explorer accept ``[{"role": ..., "content": ...}, ...]``. The template is the
tokenizer's (never one of ours): a hand-written rendering would put the state in a context the
model never sees in use. Token ids follow :func:`nla.models.prompts.encode_rendered`, so a
template that writes ``{{ bos_token }}`` and a tokenizer that adds BOS give one BOS, not two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nla.errors import NLAError
from nla.models.prompts import adds_bos, encode_rendered

MAX_MESSAGES = 256


@dataclass
class Transcript:
    """Token ids of a rendered transcript and, per token, its turn's role and whether it lies in
    the message's content (``"content"``) or the template's markup around it (``"template"``)."""

    text: str
    ids: list[int]
    roles: list[str]
    parts: list[str]
    turns: list[int]  # index of the message each token belongs to (-1: the generation prompt)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` strings, or a one-line error."""
    if not isinstance(messages, list) or not messages:
        raise NLAError("messages must be a non-empty list of {\"role\": ..., \"content\": ...}")
    if len(messages) > MAX_MESSAGES:
        raise NLAError(f"{len(messages)} messages; at most {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise NLAError(f"messages[{i}] must be {{\"role\": str, \"content\": str}}, got {m!r:.80}")
        if not m["role"].strip():
            raise NLAError(f"messages[{i}].role is empty")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja raises for roles a template refuses (e.g. no system role)
        raise NLAError(f"the chat template refused these messages ({str(exc).splitlines()[0]})") from None
    return str(text)


def render_transcript(tokenizer: Any, messages: Any, add_generation_prompt: bool = False) -> Transcript:
    """Render ``messages`` with the tokenizer's chat template and tag every token.

    Turn boundaries come from rendering each prefix of the conversation: where the template
    renders ``messages[:i]`` as a prefix of the whole, the characters up to its end belong to
    turns ``< i``. Templates that render a prefix differently (one that only adds a date to the
    last system turn, say) fall back to finding each message's content in order.
    """
    messages = check_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise NLAError("this model's tokenizer has no chat template: pass plain text instead of messages")
    full = _render(tokenizer, messages, add_generation_prompt)
    ends: list[int] = []
    cursor = 0
    for i in range(1, len(messages) + 1):
        prefix = _render(tokenizer, messages[:i], False)
        if full.startswith(prefix) and len(prefix) >= cursor:
            cursor = len(prefix)
        else:
            found = full.find(messages[i - 1]["content"], cursor)
            if found < 0:
                raise NLAError(f"cannot find messages[{i - 1}]'s content in the rendered transcript")
            cursor = found + len(messages[i - 1]["content"])
        ends.append(cursor)
    content_spans = []
    start = 0
    for m, end in zip(messages, ends):
        at = full.find(m["content"], start, end) if m["content"] else -1
        content_spans.append((at, at + len(m["content"])) if at >= 0 else (end, end))
        start = end

    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    ids = encode_rendered(tokenizer, full)
    if ids[len(ids) - len(offsets):] != list(enc["input_ids"]):
        raise NLAError("tokenizing the rendered transcript is not stable (offsets and ids disagree)")
    if len(ids) > len(offsets):  # encode_rendered prepended the BOS the template did not write
        assert adds_bos(tokenizer)
        offsets = [(0, 0)] * (len(ids) - len(offsets)) + offsets
    roles, parts, turns = [], [], []
    for a, b in offsets:
        turn = next((t for t, end in enumerate(ends) if a < end), -1)
        if turn == -1 and a == 0 and b == 0:
            turn = 0
        if turn == -1:
            roles.append("assistant")  # the generation prompt opens the assistant's turn
            parts.append("template")
            turns.append(-1)
            continue
        lo, hi = content_spans[turn]
        roles.append(messages[turn]["role"])
        parts.append("content" if b > a and lo <= a and b <= hi else "template")
        turns.append(turn)
    return Transcript(full, ids, roles, parts, turns)
