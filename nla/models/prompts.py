"""AV and AR prompt rendering: the chat template, BOS handling, and the response format.

The templates themselves are data (stored in the bundle sidecar); this module only renders
them. Rendering goes through the tokenizer's own chat template, then is tokenized *without*
special tokens, adding BOS only when the template did not: many chat templates already start
with ``{{ bos_token }}`` and tokenizing that text with ``add_special_tokens=True`` gives a
double BOS, which silently degrades every model trained or evaluated on it.
"""

from __future__ import annotations

import re
from typing import Any

from nla.errors import NLAError

DEFAULT_AV_TEMPLATE = (
    "Here is a thought taken from a language model while it read some text: <concept>{marker}</concept>\n"
    "Explain, inside <explanation></explanation> tags, what the model is tracking at that point."
)
DEFAULT_AR_TEMPLATE = "Explanation of a language model's thought:\n{explanation}\nThe thought:"
TAGGED_AV_PREFIX = "Model: {tag}\n"

# Used when a tokenizer has no chat template (GPT-2 and other base models).
PLAIN_CHAT = "User: {content}\nAssistant: "

EXPLANATION_RE = re.compile(r"<explanation>(.*?)</explanation>", re.DOTALL)


def format_response(explanation: str) -> str:
    """What the AV is trained to write."""
    return f"<explanation>{explanation.strip()}</explanation>"


def parse_explanation(text: str) -> str | None:
    """The explanation inside the tags, or None (unparseable or truncated before the close tag)."""
    m = EXPLANATION_RE.search(text)
    if m is None:
        return None
    inner = m.group(1).strip()
    return inner or None


def user_content(template: str, marker: str, tag: str | None = None) -> str:
    if "{marker}" not in template:
        raise NLAError("AV prompt template has no {marker} placeholder")
    content = template.replace("{marker}", marker)
    if "{tag}" in content:
        content = content.replace("{tag}", tag or "")
    elif tag:
        content = TAGGED_AV_PREFIX.replace("{tag}", tag) + content
    return content


def render_chat(tokenizer: Any, content: str, response: str | None = None) -> str:
    """The rendered prompt (with generation prompt), or the full exchange if ``response`` given."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        if response is None:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        messages.append({"role": "assistant", "content": response})
        return tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = PLAIN_CHAT.format(content=content)
    if response is None:
        return prompt
    return prompt + response + (tokenizer.eos_token or "")


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer prepends BOS when asked for special tokens."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bool(ids) and ids[0] == bos


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered chat text with exactly one BOS where the model expects one."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = tokenizer.bos_token_id
    if adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        raise NLAError("prompt starts with two BOS tokens (chat template and tokenizer both add one)")
    return ids


def completion_suffix(tokenizer: Any, content: str, response: str) -> str:
    """The text the AV must write after its prompt: the response plus the turn's end marker."""
    prompt = render_chat(tokenizer, content)
    full = render_chat(tokenizer, content, response)
    if full.startswith(prompt) and response in full[len(prompt) :]:
        return full[len(prompt) :]
    return response + (tokenizer.eos_token or "")


def end_token_ids(tokenizer: Any) -> list[int]:
    """Ids that end an AV answer: EOS plus the chat template's end-of-turn token."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    probe = "xq"
    suffix = completion_suffix(tokenizer, "hi", probe)
    after = suffix.split(probe, 1)[1] if probe in suffix else ""
    if after:
        first = tokenizer.encode(after, add_special_tokens=False)
        if first:
            ids.append(int(first[0]))
    return sorted(set(ids))
