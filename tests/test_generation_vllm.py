"""Our side of the vLLM rollout backend, on CPU without vLLM (it cannot run on these machines).

What vLLM receives is built and checked here against the transformers path: the prompt
embeddings (``{"prompt_embeds": e}``, vLLM's ``examples/offline_inference/prompt_embed_inference.py``),
the weights pushed through ``LLM.apply_model`` → ``model.load_weights`` under Hugging Face
checkpoint names (``vllm/entrypoints/llm.py``, ``vllm/v1/engine/llm_engine.py``: ``apply_model``
is ``collective_rpc("apply_model", args=(func,))``), the minimum-version message, and the parsing
of ``RequestOutput``/``CompletionOutput`` (fields ``token_ids``, ``finish_reason``, ``stop_reason``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nla.bundle import NLA, LoraSettings
from nla.errors import NLAError
from nla.train.generation import (
    MIN_VLLM,
    build_prompt_embeds,
    check_vllm_version,
    rollouts_from_vllm,
    vllm_weight_items,
)


@pytest.fixture(scope="module")
def bundle(tiny_dataset: Path) -> NLA:
    nla = NLA.initialize(dataset=str(tiny_dataset), lora=LoraSettings(r=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in nla.av_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return nla


def test_version_check_names_the_minimum() -> None:
    for ok in ("0.11.0", "0.11.1rc2.dev45+g1234abc", "0.12.0", "1.0.0"):
        check_vllm_version(ok)
    need = ".".join(map(str, MIN_VLLM))
    with pytest.raises(NLAError, match=rf"needs vLLM >= {need} .*found 0\.10\.2: pip install -U 'vllm>={need}'"):
        check_vllm_version("0.10.2")
    with pytest.raises(NLAError, match=r"found 0\.6\.3\.post1"):
        check_vllm_version("0.6.3.post1")
    with pytest.raises(NLAError, match="cannot read the vLLM version 'dev'"):
        check_vllm_version("dev")


def test_prompt_embeds_carry_the_vector_exactly_as_the_injection_hook(bundle: NLA) -> None:
    """Greedy continuation from the embeddings vLLM would get equals the transformers path."""
    vb = bundle.verbalizer
    assert vb.injection.mode == "replace"
    vecs = torch.randn(2, bundle.meta.d_model, generator=torch.Generator().manual_seed(1))
    embeds = build_prompt_embeds(vb, vecs)
    prompt = vb.prompt_ids()
    assert embeds.shape == (2, len(prompt), bundle.meta.d_model) and embeds.device.type == "cpu"
    model = bundle.av_model
    with torch.no_grad():
        from_embeds = model(inputs_embeds=embeds, use_cache=False).logits
        with vb.injector(vecs):
            from_ids = model(input_ids=torch.tensor([prompt] * 2), use_cache=False).logits
        plain = model(input_ids=torch.tensor([prompt] * 2), use_cache=False).logits
    assert torch.allclose(from_embeds, from_ids, atol=1e-5)
    assert not torch.allclose(from_embeds, plain, atol=1e-3)  # the vector is really in there
    # Row i carries vector i: swapping the vectors swaps the rows.
    swapped = build_prompt_embeds(vb, vecs.flip(0))
    assert torch.allclose(swapped, embeds.flip(0))


def test_weight_items_are_checkpoint_names_that_load_strictly(bundle: NLA) -> None:
    """The names ``load_weights`` gets are the model's own checkpoint names (no PEFT prefixes,
    no LoRA factors): a fresh model of the architecture loads them strictly and then computes
    what the policy computes with its adapter merged."""
    import copy

    from transformers import AutoModelForCausalLM

    policy = bundle.av_model
    assert hasattr(policy, "peft_config")
    merged = copy.deepcopy(policy).merge_and_unload()
    items = vllm_weight_items(merged)
    names = [n for n, _ in items]
    assert not any("lora_" in n or "base_model" in n or "base_layer" in n for n in names)
    fresh = AutoModelForCausalLM.from_config(merged.config)
    missing, unexpected = fresh.load_state_dict(dict(items), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)  # a tied head may be left out
    ids = torch.tensor([bundle.verbalizer.prompt_ids()])
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)
    # On the PEFT model itself: the base weights under the same names, the adapter left out.
    base_items = dict(vllm_weight_items(policy))
    assert set(base_items) == set(names)
    q = next(n for n in names if n.endswith("q_proj.weight"))
    assert not torch.equal(base_items[q], dict(items)[q])  # merged ≠ base: the adapter did something


def test_vllm_outputs_become_group_major_rollouts(bundle: NLA) -> None:
    vb = bundle.verbalizer
    end = vb.end_ids[0]
    text = vb.tokenizer.encode("<explanation>loops</explanation>", add_special_tokens=False)

    def comp(ids: list[int], reason: str, stop: int | None = None) -> SimpleNamespace:
        return SimpleNamespace(token_ids=ids, finish_reason=reason, stop_reason=stop)

    outs = [
        SimpleNamespace(outputs=[comp([*text], "stop", end), comp([*text, end], "stop", end)]),
        SimpleNamespace(outputs=[comp(text[:3], "length"), comp([], "stop", None)]),
    ]
    rolls = rollouts_from_vllm(vb, outs)
    assert [r.vector_index for r in rolls] == [0, 0, 1, 1]
    # A stop token left out of token_ids is put back: it is an action the policy is scored on.
    assert rolls[0].completion_ids == [*text, end] == rolls[1].completion_ids
    assert rolls[0].finished and rolls[0].explanation == "loops" and not rolls[0].invalid
    assert not rolls[2].finished and rolls[2].invalid  # cut off by max_tokens
    assert rolls[3].completion_ids == [end] and rolls[3].finished
