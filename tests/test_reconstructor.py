"""nla.models.reconstructor: a fresh AR reads the block-K state; padding; truncation; fp32 head."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS

from nla.errors import NLAError
from nla.models.layers import default_layer, num_layers
from nla.models.loading import load_model, resolve_model_path
from nla.models.prompts import DEFAULT_AR_TEMPLATE
from nla.models.reconstructor import Reconstructor, load_trunk

TEXTS = [
    "a for loop over a list",
    "the keyword 'def' starting a function definition in Python source code",
    "x",
]


@pytest.fixture(scope="module", params=TINY_ARCHS)
def ar(request: pytest.FixtureRequest) -> tuple[str, Reconstructor, object]:
    spec = f"tiny:{request.param}"
    model, tok = load_model(spec, device="cpu")
    k = default_layer(num_layers(model.config))
    trunk = load_trunk(resolve_model_path(spec), k)
    return request.param, Reconstructor(trunk, tok, DEFAULT_AR_TEMPLATE), model


def test_fresh_ar_returns_block_k_state_at_last_token(ar: tuple[str, Reconstructor, object]) -> None:
    _, rec, model = ar
    k = default_layer(num_layers(model.config))  # type: ignore[attr-defined]
    assert num_layers(rec.trunk.config) == k + 1
    assert torch.equal(rec.value_head.weight, torch.eye(rec.d_model))
    assert rec.value_head.bias is None
    preds = rec.reconstruct(TEXTS)
    for text, pred in zip(TEXTS, preds):
        ids = torch.tensor([rec.token_ids(text)])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)  # type: ignore[operator]
        # DESIGN §2: block K's output is hidden_states[K + 1] of a plain full forward.
        torch.testing.assert_close(pred, out.hidden_states[k + 1][0, -1], rtol=1e-5, atol=1e-5)


def test_batched_right_padded_equals_unbatched(ar: tuple[str, Reconstructor, object]) -> None:
    _, rec, _ = ar
    ids, mask = rec.encode(TEXTS)
    assert mask[:, 0].all() and not mask.all()  # right padding actually present
    with torch.no_grad():
        batched = rec(ids, mask)
    for i, text in enumerate(TEXTS):
        single = rec.reconstruct([text])[0]
        torch.testing.assert_close(batched[i], single, rtol=1e-5, atol=1e-5)
    # Same answer whatever the batch size and order (reconstruct sorts by length internally).
    torch.testing.assert_close(rec.reconstruct(TEXTS, batch_size=1), rec.reconstruct(TEXTS), rtol=1e-5, atol=1e-5)


def test_value_head_is_applied_in_fp32() -> None:
    spec = "tiny:llama"
    _, tok = load_model(spec, device="cpu")
    rec = Reconstructor(load_trunk(resolve_model_path(spec), 2, torch.bfloat16), tok, DEFAULT_AR_TEMPLATE)
    assert rec.value_head.weight.dtype == torch.float32
    with torch.no_grad():
        rec.value_head.weight.mul_(2.0)
    ids, mask = rec.encode(TEXTS[:1])
    with torch.no_grad():
        pred = rec(ids, mask)
        hidden = rec.trunk(input_ids=ids, attention_mask=mask).last_hidden_state[0, -1]
    assert pred.dtype == torch.float32
    torch.testing.assert_close(pred[0], 2.0 * hidden.float())


def test_long_explanations_keep_the_template_tail() -> None:
    _, tok = load_model("tiny:qwen2", device="cpu")
    rec = Reconstructor(load_trunk(resolve_model_path("tiny:qwen2"), 1), tok, DEFAULT_AR_TEMPLATE, max_length=48)
    ids = rec.token_ids("word " * 200)
    assert len(ids) == 48
    tail = tok.encode("\nThe thought:", add_special_tokens=False)
    # The read-out token is the template's last token, as in training, not a word of the middle.
    assert ids[-len(tail):] == tail
    assert rec.token_ids("short") == tok.encode(rec.format("short"))


def test_bad_input() -> None:
    _, tok = load_model("tiny:gpt2", device="cpu")
    with pytest.raises(NLAError, match="layer 9 is out of range"):
        load_trunk(resolve_model_path("tiny:gpt2"), 9)
    rec = Reconstructor(load_trunk(resolve_model_path("tiny:gpt2"), 1), tok, DEFAULT_AR_TEMPLATE)
    with pytest.raises(NLAError, match="no texts"):
        rec.encode([])
