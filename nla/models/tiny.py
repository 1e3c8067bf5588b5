"""Tiny random models for tests and smoke runs: real architectures, random weights, no download.

Each architecture gets a byte-level BPE tokenizer trained locally on the built-in corpus, with
the special tokens and chat-template quirks of its real family, because those quirks are what
break NLA code in practice:

* ``llama`` and ``gemma`` add a BOS token *and* put ``{{ bos_token }}`` in the chat template,
  the classic double-BOS trap;
* ``qwen2``/``qwen3`` and ``gemma`` have U+32xx characters as single tokens, so the marker
  search of docs/design.md §4 finds one; ``llama`` and ``gpt2`` have none, like SmolLM2, so the
  fallback search runs;
* ``gpt2`` has no chat template at all;
* widths differ between architectures so cross-model code meets different ``d_model``.

Models are materialised once into the cache directory so every process sees the same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from nla.paths import cache_dir

TINY_VERSION = "1"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# A few enclosed CJK characters (U+3220..) made single tokens for the families that have them.
MARKER_CHARS = [chr(c) for c in range(0x3220, 0x3228)]


@dataclass(frozen=True)
class TinySpec:
    arch: str
    d_model: int
    n_layers: int
    bos: str | None
    eos: str
    pad: str
    specials: tuple[str, ...]
    chat_template: str | None
    add_bos: bool
    marker_chars: bool


TINY_SPECS: dict[str, TinySpec] = {
    "llama": TinySpec(
        "llama", 64, 4, "<|begin_of_text|>", "<|eot_id|>", "<|finetune_pad|>",
        ("<|start_header_id|>", "<|end_header_id|>"), LLAMA_TEMPLATE, True, False,
    ),
    "qwen2": TinySpec(
        "qwen2", 48, 4, None, "<|im_end|>", "<|endoftext|>",
        ("<|im_start|>",), CHATML_TEMPLATE, False, True,
    ),
    "qwen3": TinySpec(
        "qwen3", 64, 4, None, "<|im_end|>", "<|endoftext|>",
        ("<|im_start|>",), CHATML_TEMPLATE, False, True,
    ),
    "gpt2": TinySpec(
        "gpt2", 32, 4, None, "<|endoftext|>", "<|endoftext|>", (), None, False, False,
    ),
    "gemma": TinySpec(
        "gemma", 64, 4, "<bos>", "<end_of_turn>", "<pad>",
        ("<start_of_turn>", "<eos>"), GEMMA_TEMPLATE, True, True,
    ),
}


def tiny_archs() -> list[str]:
    return sorted(TINY_SPECS)


def _config(spec: TinySpec, vocab_size: int, ids: dict[str, int | None]):
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        tie_word_embeddings=True,
    )
    d, n = spec.d_model, spec.n_layers
    if spec.arch == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=d, n_layer=n, n_head=4, n_positions=512, **common
        )
    heads = 4
    kw = dict(
        hidden_size=d,
        num_hidden_layers=n,
        num_attention_heads=heads,
        num_key_value_heads=2,
        intermediate_size=2 * d,
        max_position_embeddings=512,
        **common,
    )
    if spec.arch == "gemma":
        return AutoConfig.for_model(
            "gemma3_text", head_dim=d // heads, sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"][:n],
            query_pre_attn_scalar=d // heads, **kw,
        )
    if spec.arch == "qwen3":
        return AutoConfig.for_model("qwen3", head_dim=d // heads, **kw)
    return AutoConfig.for_model(spec.arch, **kw)


def _train_tokenizer(spec: TinySpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from nla.data.corpus import builtin_documents

    texts = [d.text for d in builtin_documents()]
    specials = [t for t in dict.fromkeys([spec.pad, spec.eos, *( [spec.bos] if spec.bos else []), *spec.specials])]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if spec.marker_chars:
        tok.add_tokens(MARKER_CHARS)
    if spec.add_bos and spec.bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        additional_special_tokens=list(spec.specials),
    )
    if spec.chat_template:
        fast.chat_template = spec.chat_template
    return fast


def tiny_model_path(arch: str) -> Path:
    """Folder holding the materialised tiny model for ``arch`` (built on first use)."""
    if arch not in TINY_SPECS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(tiny_archs())}")
    spec = TINY_SPECS[arch]
    key = hashlib.sha256(f"{TINY_VERSION}:{spec}".encode()).hexdigest()[:10]
    out = cache_dir() / "tiny" / f"{arch}-{key}"
    if (out / "nla_tiny.json").exists():
        return out
    from transformers import AutoModelForCausalLM

    tokenizer = _train_tokenizer(spec)
    ids = {
        "bos": tokenizer.convert_tokens_to_ids(spec.bos) if spec.bos else None,
        "eos": tokenizer.convert_tokens_to_ids(spec.eos),
        "pad": tokenizer.convert_tokens_to_ids(spec.pad),
    }
    config = _config(spec, len(tokenizer), ids)
    # Seeded so every process that builds the model (tests, CLI, subprocesses) gets one model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "nla_tiny.json").write_text(json.dumps({"arch": arch, "version": TINY_VERSION}))
    try:
        tmp.rename(out)
    except OSError:
        # Another process finished first; theirs is identical (same seed, same corpus).
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
