"""Chat transcripts (nla/chat.py): rendered with the model's own template, one BOS, every token
tagged with its turn's role; `explain()` and `/v1/explain` accept them.

Turn boundaries come from rendering each prefix of the conversation, the generation-boundary
method described in ewernn/trait-interp ``docs/chat_templates.md``; transformers' own
``return_assistant_tokens_mask`` needs a ``{% generation %}`` block that most published
templates (and SmolLM2's) lack, so we do not rely on it.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from nla.bundle import NLA
from nla.chat import render_transcript
from nla.errors import NLAError
from nla.models.loading import load_tokenizer
from nla.models.prompts import encode_rendered
from nla.serve import ServeConfig, create_app, running_server

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does a for loop do?"},
    {"role": "assistant", "content": "It repeats a block for each item."},
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_tokens_tagged_by_role(arch: str) -> None:
    tok = load_tokenizer(f"tiny:{arch}")
    t = render_transcript(tok, MESSAGES)
    assert t.ids == encode_rendered(tok, tok.apply_chat_template(MESSAGES, tokenize=False))
    if tok.bos_token_id is not None:
        assert t.ids.count(tok.bos_token_id) == 1  # the template's BOS and the tokenizer's are one
    assert len(t.roles) == len(t.parts) == len(t.turns) == len(t.ids)
    # Roles appear in conversation order, each as one run of tokens.
    runs = [r for i, r in enumerate(t.roles) if i == 0 or t.roles[i - 1] != r]
    assert runs == ["system", "user", "assistant"]
    for turn, m in enumerate(MESSAGES):
        content = [i for i, (p, tn) in zip(t.ids, zip(t.parts, t.turns)) if p == "content" and tn == turn]
        assert tok.decode(content) == m["content"]
        assert any(p == "template" and tn == turn for p, tn in zip(t.parts, t.turns))


def test_generation_prompt_opens_the_assistant_turn() -> None:
    tok = load_tokenizer("tiny:qwen2")
    t = render_transcript(tok, MESSAGES[:2], add_generation_prompt=True)
    assert t.text.endswith("<|im_start|>assistant\n")
    assert t.roles[-1] == "assistant" and t.parts[-1] == "template" and t.turns[-1] == -1


def test_bad_messages_are_one_line_errors() -> None:
    tok = load_tokenizer("tiny:llama")
    for bad, msg in [([], "non-empty list"), ([{"role": "user"}], "messages\\[0\\]"),
                     ([{"role": " ", "content": "x"}], "role is empty"), ("hello", "non-empty list")]:
        with pytest.raises(NLAError, match=msg):
            render_transcript(tok, bad)
    with pytest.raises(NLAError, match="no chat template"):
        render_transcript(load_tokenizer("tiny:gpt2"), MESSAGES)


@pytest.fixture(scope="module")
def bundle(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat") / "run"
    NLA.initialize("tiny:llama", dataset=tiny_dataset, device="cpu").save_pretrained(out)
    return out


def test_explain_accepts_messages(bundle: Path) -> None:
    nla = NLA.from_pretrained(bundle, device="cpu")
    t = render_transcript(nla.tokenizer, MESSAGES)
    last = len(t.ids) - 2  # the last content token of the assistant's answer
    out = nla.explain(MESSAGES, positions=[last, 0], max_new_tokens=4)
    assert [r["position"] for r in out] == [last, 0]
    assert out[0]["role"] == "assistant" and out[0]["part"] == "content"
    assert out[1]["role"] == "system" and out[1]["part"] == "template"
    # The explained vector is the base model's block-K state on the rendered transcript.
    _, states = nla.base_states(t.ids)
    want = nla.round_trip(states[[last]], max_new_tokens=4)
    assert out[0]["explanation"] == want.explanations[0] and out[0]["raw"] == want.raw[0]
    assert out[0]["cosine"] == pytest.approx(float(want.per_vector[0]["cosine"]), abs=1e-6)
    # Plain text still works, without role fields.
    plain = nla.explain("a for loop", positions=[-1], max_new_tokens=4)
    assert "role" not in plain[0]
    assert torch.equal(nla.base_states("a for loop")[1], nla.base_states(nla.tokenizer.encode("a for loop"))[1])


def test_api_explain_messages(bundle: Path) -> None:
    nla = NLA.from_pretrained(bundle, device="cpu")
    t = render_transcript(nla.tokenizer, MESSAGES)
    with running_server(create_app(nla, ServeConfig(torch_threads=1, default_new_tokens=4))) as url:
        r = httpx.post(url + "/v1/explain", json={"messages": MESSAGES, "positions": [-2]}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [tk["id"] for tk in body["tokens"]] == t.ids
        assert [tk["role"] for tk in body["tokens"]] == t.roles
        assert body["results"][0]["position"] == len(t.ids) - 2
        bad = httpx.post(url + "/v1/explain", json={"messages": [{"role": "", "content": "x"}]})
        assert bad.status_code == 422 and "role is empty" in bad.json()["detail"]
        plain = httpx.post(url + "/v1/explain", json={"text": "a for loop", "positions": []}).json()
        assert all(tk["role"] is None for tk in plain["tokens"])
