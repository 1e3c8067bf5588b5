"""Solshine's Gemma-4-E2B NLA (SolshineCode/nla-gemma-4-e2b): two PEFT repos, a raw prompt.

What the publisher ships (``examples/round_trip_example.py``, ``trajectory/*/nla_meta.yaml``)::

    …-L23-av-v0_0_1/   adapter_config.json + adapter_model.safetensors (LoRA on the base
                       causal LM) + nla_meta.yaml
    …-L23-ar-v0_0_1/   adapter_config.json + adapter_model.safetensors (LoRA on the *full-
                       depth* base causal LM) + linear_head.pt (``Linear(d, d, bias=True)``
                       state dict: ``weight``, ``bias``)

AV sidecar (``role: actor``, token ids only)::

    kind: nla_model
    role: actor
    base_model: google/gemma-4-E2B
    extraction: {d_model: 1536, layer: 23, injection_scale: sqrt_d_model, mse_scale: sqrt_d_model}
    tokens: {injection_token_id, injection_left_neighbor_id, injection_right_neighbor_id}
    av_lora: {...}, training: {...}, …          # provenance, ignored

Recipe reproduced: the AV prompt is the publisher's template with the injection char,
encoded *without* a chat template by ``tokenizer.encode`` (so with BOS); the embedding output
at the marker is replaced by the vector scaled to √d. The AR is the full-depth base + LoRA,
read at the output of ``layers[AR_TRUNCATION - 1]`` (block 17 for the v0.0.1 release) at the
last token of ``AR_TEMPLATE`` (encoded with BOS) and mapped by ``linear_head.pt`` with its
bias. Blocks after the read-out cannot change it, so the AR is imported as the base cut after
the read-out block with the adapter folded in (exact, and a fraction of the memory).

Not in the files, so given by hand (the registry entry carries them): the AR read-out block
(``ar_layer``), and the two templates when the sidecar has none (the release's are built in
below, copied from the publisher's example as data).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nla.errors import NLAError
from nla.interop.common import (
    PAPER_TOKEN_FIELDS,
    RAW_CHAT_TEMPLATE,
    adapter_base,
    adapter_scaling,
    adapter_tensors,
    check_equal,
    folder_tokenizer,
    is_adapter_dir,
    load_av,
    load_linear,
    map_placeholders,
    merged_trunk,
    pair_folders,
    quantization_4bit,
    resolve_scale,
    sidecar,
)
from nla.meta import META_NAME, require
from nla.models.injection import MarkerTokens
from nla.models.verbalizer import InjectionSettings
from nla.parts import BundleMeta, NLAParts

HEAD_FILE = "linear_head.pt"
# The v0.0.1 release's templates, as its example script sends them (sidecars carry none).
AV_TEMPLATE = (
    "You are a meticulous AI researcher conducting an important investigation into activation vectors from "
    "a language model. Your overall task is to describe the semantic content of that activation vector.\n\n"
    "We will pass the vector enclosed in <concept> tags into your context. You must then produce an explanation "
    "for the vector, enclosed within <explanation> tags. The explanation consists of 2-3 text snippets "
    "describing that vector.\n\nHere is the vector:\n\n<concept>{injection_char}</concept>"
)
AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"


def is_solshine_sidecar(data: dict[str, Any]) -> bool:
    """Their sidecar nests width and layer under ``extraction`` (the paper's are top-level)."""
    extraction = data.get("extraction")
    return data.get("kind") == "nla_model" and isinstance(extraction, dict) and "layer" in extraction


def is_ar_dir(root: Path) -> bool:
    return is_adapter_dir(root) and (root / HEAD_FILE).exists()


def is_av_dir(root: Path) -> bool:
    if not (is_adapter_dir(root) and (root / META_NAME).exists()):
        return False
    try:
        return is_solshine_sidecar(sidecar(root))
    except NLAError:
        return False


def resolve_pair(path: Path, ar: Path | None) -> tuple[Path, Path]:
    # A lone folder is the AR when it carries the head, else the AV.
    return pair_folders(path, ar, is_av_dir, is_ar_dir, "Solshine", known_by="ar")


def _marker(tokenizer: Any, data: dict[str, Any], where: Path) -> MarkerTokens:
    """Their sidecar has ids only; the char is the token's text, checked to round-trip."""
    marker_id = require(data, "tokens.injection_token_id", where, int)
    char = (data.get("tokens") or {}).get("injection_char")
    if char is None:
        char = tokenizer.decode([marker_id])
    if tokenizer.encode(char, add_special_tokens=False) != [marker_id]:
        raise NLAError(f"{where}: field 'tokens.injection_token_id' ({marker_id}) is not a single-token character "
                       f"of this tokenizer")
    return MarkerTokens(char, marker_id, require(data, "tokens.injection_left_neighbor_id", where, int),
                        require(data, "tokens.injection_right_neighbor_id", where, int))


def load(path: str | Path, *, ar: str | Path | None = None, ar_layer: int | None = None,
         base_model: str | None = None, av_template: str | None = None, ar_template: str | None = None,
         load_in_4bit: bool = False, dtype: str | torch.dtype = "float32", device: str | None = None) -> NLAParts:
    """The parts of Solshine's AV/AR repos (either one, the other found by name)."""
    from nla.models.layers import num_layers
    from nla.models.loading import parse_dtype, pick_device

    av_dir, ar_dir = resolve_pair(Path(path), Path(ar) if ar is not None else None)
    where = av_dir / META_NAME
    data = sidecar(av_dir)
    if not is_solshine_sidecar(data):
        raise NLAError(f"{where}: missing field 'extraction.layer' (not a Solshine sidecar)")
    role = data.get("role", "actor")
    if role not in ("actor", "av"):
        raise NLAError(f"{where}: field 'role' is {role!r}, expected 'actor' (pass the AV folder as SOURCE)")
    for sub in (av_dir, ar_dir):
        if not is_adapter_dir(sub):
            raise NLAError(f"{sub}: not a PEFT adapter folder (no adapter_config.json)")
    if not (ar_dir / HEAD_FILE).exists():
        raise NLAError(f"{ar_dir}: no {HEAD_FILE} (the AR's Linear(d, d) head with bias)")
    base = base_model or check_equal({"base_model": data.get("base_model"),
                                      "av/adapter_config.json base_model_name_or_path": adapter_base(av_dir)}, where)
    d_model = require(data, "extraction.d_model", where, int)
    layer = require(data, "extraction.layer", where, int)
    if ar_layer is None:
        raise NLAError(f"{where}: the AR read-out block is not recorded (their AR_TRUNCATION - 1, 17 for "
                       f"v0.0.1): pass --ar-layer N (ar_layer=N), or use the registry name")
    scale = resolve_scale(data.get("extraction", {}).get("injection_scale", "sqrt_d_model"), d_model, where,
                          "extraction.injection_scale")
    templates = data.get("prompt_templates") or {}
    raw_av = av_template or templates.get("av") or templates.get("actor") or AV_TEMPLATE
    raw_ar = ar_template or templates.get("ar") or templates.get("critic") or AR_TEMPLATE
    av_tmpl = map_placeholders(raw_av, {"injection_char": "marker"}, "marker", where, "prompt_templates.actor")
    ar_tmpl = map_placeholders(raw_ar, {"explanation": "explanation"}, "explanation", where, "prompt_templates.critic")

    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    tokenizer = folder_tokenizer(av_dir, base)
    tokens = _marker(tokenizer, data, where)
    quant = quantization_4bit() if load_in_4bit else None
    av_model = load_av(av_dir, base, torch_dtype, dev, quant)
    n_layers = num_layers(av_model.config)
    if not 0 <= layer < n_layers:
        raise NLAError(f"{where}: field 'extraction.layer' is {layer}, the base has blocks 0..{n_layers - 1}")
    if not 0 <= ar_layer < n_layers:
        raise NLAError(f"ar_layer {ar_layer} is out of range: the base has blocks 0..{n_layers - 1}")
    # The adapter was trained on the full causal LM; folded into blocks 0..ar_layer it gives
    # exactly the hidden state their hook reads (later blocks cannot change it).
    trunk = merged_trunk(base, ar_layer, adapter_tensors(ar_dir), adapter_scaling(ar_dir),
                         ar_dir / "adapter_model.safetensors", torch_dtype)
    head = load_linear(ar_dir / HEAD_FILE, d_model, d_model)
    meta = BundleMeta(
        base_model=str(base), layer_index=layer, d_model=d_model, n_layers=n_layers,
        injection=InjectionSettings("replace", scale, 1, 1.0), tokens=tokens,
        prompt_templates={"av": av_tmpl, "ar": ar_tmpl}, mse_scale=math.sqrt(d_model),
        av_format="peft", ar_format="full",
        extra={"imported_from": {"layout": "solshine", "av": str(av_dir), "ar": str(ar_dir), "ar_layer": ar_layer},
               "av_chat_template": RAW_CHAT_TEMPLATE, "ar_add_special_tokens": True},
    )
    return NLAParts(meta, tokenizer, dev, str(where), av_model=av_model, trunk=trunk, head=head,
                    field_names=PAPER_TOKEN_FIELDS)
