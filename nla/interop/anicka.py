"""anicka's NLAs (anicka-net/nla-at-home): one PEFT adapter per repo, a depth-tagged raw prompt.

What the publisher ships and runs (``scripts/nla_lib.py``, ``scripts/brain_in_jar_qwen.py``)::

    nla-qwen2.5-7b-L20-av-v2/   adapter_config.json + adapter_model.safetensors (LoRA on the
                                base causal LM) + nla_meta.yaml (paper field names, without
                                the neighbour ids) + tokenizer files
    nla-qwen2.5-7b-L20-ar-v2/   one of two AR forms:
        lora_sl      adapter_config.json + adapter_model.safetensors: LoRA on the *full-depth*
                     base; read ``hidden_states[L + 1]`` (= output of block L, no final norm) at
                     the last token of ``AR_TEMPLATE_DEPTH_SL`` (explanation, depth, a trailing
                     injection char), encoded without special tokens; no value head (identity)
        ar_head      ar_head.safetensors | ar_head.pt (``Linear(d, d)``, no bias, first tensor) on
                     the frozen full-depth base, read the same way, ``AR_TEMPLATE_RECONSTRUCT``
                     encoded with special tokens
    (subfolders ``av/`` and ``ar/`` of one repo are read the same way, e.g. nla-qwen3-4b-v2)

AV recipe: ``make_av_prompt(depth_pct, char)``, a raw prompt (no chat template) ending in
``<explanation>``, encoded with ``add_special_tokens=True``; the embedding at the marker is
replaced by the activation normalised to ``INJECTION_SCALE`` (150). The AV writes the
explanation and ``</explanation>``; the opening tag is the prompt's last token.

Given by hand when the sidecar lacks it (the registry carries it): ``depth_pct``, the
depth the single-layer adapter was trained with (73 for the Qwen2.5-7B L20 -v2 pair per
their ``live_nla_compare.py``: ``round(100 * (L + 0.5) / n_layers)``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from nla.errors import NLAError
from nla.interop.common import (
    RAW_CHAT_TEMPLATE,
    adapter_base,
    adapter_scaling,
    adapter_tensors,
    check_equal,
    folder_tokenizer,
    is_adapter_dir,
    linear_from,
    load_av,
    map_placeholders,
    merged_trunk,
    pair_folders,
    quantization_4bit,
    read_tensors,
    resolve_scale,
    sidecar,
)
from nla.interop.paper import layer_fields
from nla.meta import META_NAME
from nla.models.injection import MarkerTokens
from nla.models.reconstructor import identity_head
from nla.models.verbalizer import InjectionSettings
from nla.parts import BundleMeta, NLAParts

INJECTION_SCALE = 150.0  # nla_lib.INJECTION_SCALE: every published adapter normalises to it
AR_HEADS = ("ar_head.safetensors", "ar_head.pt")


def av_prompt(depth_pct: int) -> str:
    """Their frozen ``make_av_prompt`` with ``{injection_char}`` left as a placeholder."""
    return (
        "You are a meticulous AI researcher conducting an important investigation "
        "into activation vectors from a language model. Your overall task is to "
        "describe the semantic content of that activation vector.\n\n"
        "We will pass the vector enclosed in <concept> tags into your context, "
        "along with the network depth where it was extracted. "
        "You must then produce an explanation for the vector, enclosed within "
        "<explanation> tags. The explanation consists of 2-3 text snippets "
        "describing that vector.\n\n"
        f"Here is the vector from depth {depth_pct}% of the network:\n\n"
        "<concept>{injection_char}</concept>\n\n"
        "Please provide an explanation.\n\n"
        "<explanation>"
    )


def ar_template_depth_sl(depth_pct: int, char: str) -> str:
    return f"Summary of the following text from depth {depth_pct}%: <text>{{explanation}}</text> <summary>{char}"


AR_TEMPLATE_RECONSTRUCT = (
    "You are a meticulous AI researcher conducting an important investigation "
    "into a model's internal states. Below is a description of an activation vector:\n\n"
    "<explanation>{explanation}</explanation>\n\n"
    "Based on this description, reconstruct the activation vector."
)


def is_ar_dir(root: Path) -> bool:
    if any((root / h).exists() for h in AR_HEADS):
        return True
    # A lora_sl AR is a bare adapter; an AV adapter carries the sidecar with the marker.
    return is_adapter_dir(root) and not _has_av_sidecar(root)


def _has_av_sidecar(root: Path) -> bool:
    if not (root / META_NAME).exists():
        return False
    try:
        data = sidecar(root)
    except NLAError:
        return False
    return data.get("kind") == "nla_model" and isinstance(data.get("tokens"), dict) and data.get("role") not in (
        "ar", "critic")


def is_av_dir(root: Path) -> bool:
    return is_adapter_dir(root) and _has_av_sidecar(root)


def resolve_pair(path: Path, ar: Path | None) -> tuple[Path, Path]:
    # A lone folder is the AV when it carries the AV sidecar, else the AR.
    return pair_folders(path, ar, is_av_dir, is_ar_dir, "anicka", known_by="av")


def load(path: str | Path, *, ar: str | Path | None = None, depth_pct: int | None = None,
         base_model: str | None = None, load_in_4bit: bool = False, dtype: str | torch.dtype = "float32",
         device: str | None = None) -> NLAParts:
    """The parts of an anicka AV adapter and its AR (by name, ``--ar``, or ``av/``+``ar/``)."""
    from nla.models.layers import hidden_size, num_layers
    from nla.models.loading import parse_dtype, pick_device

    av_dir, ar_dir = resolve_pair(Path(path), Path(ar) if ar is not None else None)
    where = av_dir / META_NAME
    data = sidecar(av_dir)
    if not is_adapter_dir(av_dir):
        raise NLAError(f"{av_dir}: not a PEFT adapter folder (no adapter_config.json)")
    tok = data.get("tokens") or {}
    char, marker_id = tok.get("injection_char"), tok.get("injection_token_id")
    if not isinstance(char, str):
        raise NLAError(f"{where}: missing field 'tokens.injection_char'")
    layer = check_equal({**layer_fields(data, "AV"),
                         "extraction.layer": (data.get("extraction") or {}).get("layer")}, where)
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise NLAError(f"{where}: field 'extraction_layer_index' has invalid value {layer!r}")
    base = base_model or check_equal({"base_model": data.get("base_model") or data.get("base_checkpoint"),
                                      "adapter_config.json base_model_name_or_path": adapter_base(av_dir)}, where)
    recorded_depth = data.get("depth_pct")
    depth = depth_pct if depth_pct is not None else recorded_depth
    templates = data.get("prompt_templates") or {}
    raw_av = templates.get("av") or templates.get("actor")
    if raw_av is None:
        if not isinstance(depth, int):
            raise NLAError(f"{where}: missing field 'depth_pct' (the depth the adapter was trained with, in its "
                           f"prompt): pass --depth-pct N (depth_pct=N), or use the registry name")
        raw_av = av_prompt(depth)
    av_tmpl = map_placeholders(raw_av, {"injection_char": "marker"}, "marker", where, "prompt_templates.av")

    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    tokenizer = folder_tokenizer(av_dir, base)
    live = tokenizer.encode(char, add_special_tokens=False)
    if len(live) != 1 or (marker_id is not None and live != [marker_id]):
        raise NLAError(f"{where}: field 'tokens.injection_token_id' is {marker_id} but the tokenizer encodes "
                       f"{char!r} as {live}")
    tokenizer.chat_template = RAW_CHAT_TEMPLATE
    from nla.models.prompts import encode_rendered, render_chat, user_content

    ids = encode_rendered(tokenizer, render_chat(tokenizer, user_content(av_tmpl, char)))
    hits = [i for i, t in enumerate(ids) if t == live[0]]
    if len(hits) != 1 or hits[0] in (0, len(ids) - 1):
        raise NLAError(f"{where}: the AV prompt holds the marker {char!r} {len(hits)} times, expected once inside")
    # Their sidecar has no neighbour ids: they are read off the live prompt (checked again on load).
    tokens = MarkerTokens(char, live[0], int(ids[hits[0] - 1]), int(ids[hits[0] + 1]))
    quant = quantization_4bit() if load_in_4bit else None
    av_model = load_av(av_dir, base, torch_dtype, dev, quant)
    n_layers = num_layers(av_model.config)
    if not 0 <= layer < n_layers:
        raise NLAError(f"{where}: field 'extraction_layer_index' is {layer}, the base has blocks 0..{n_layers - 1}")
    d_model = hidden_size(av_model.config)
    scale = resolve_scale((data.get("extraction") or {}).get("injection_scale", INJECTION_SCALE), d_model, where,
                          "extraction.injection_scale")
    head_file = next((ar_dir / h for h in AR_HEADS if (ar_dir / h).exists()), None)
    if head_file is not None:
        from nla.models.loading import resolve_model_path
        from nla.models.reconstructor import load_trunk

        tensors = read_tensors(head_file)
        if "weight" not in tensors and len(tensors) != 1:
            raise NLAError(f"{head_file}: expected one weight tensor, found {sorted(tensors)}")
        head = linear_from({"weight": tensors.get("weight", next(iter(tensors.values())))}, d_model, d_model,
                           head_file)
        trunk = load_trunk(resolve_model_path(base), layer, torch_dtype)
        ar_tmpl, specials, form = AR_TEMPLATE_RECONSTRUCT, True, "ar_head"
    elif is_adapter_dir(ar_dir):
        ar_meta = sidecar(ar_dir) if (ar_dir / META_NAME).exists() else {}
        if (ar_meta.get("training") or {}).get("mean_subtract"):
            raise NLAError(f"{ar_dir / META_NAME}: field 'training.mean_subtract' is true (the AR adds "
                           f"layer_means.pt to its output); this form is not supported")
        if not isinstance(depth, int):
            raise NLAError(f"{where}: missing field 'depth_pct' (the lora_sl AR's template holds it): pass --depth-pct")
        trunk = merged_trunk(base, layer, adapter_tensors(ar_dir), adapter_scaling(ar_dir),
                             ar_dir / "adapter_model.safetensors", torch_dtype)
        head = identity_head(d_model)  # LoraSLReward reads the hidden state itself
        ar_tmpl, specials, form = ar_template_depth_sl(depth, char), False, "lora_sl"
    else:
        raise NLAError(f"{ar_dir}: not an anicka AR (no adapter_config.json, {' or '.join(AR_HEADS)}); "
                       f"value_heads.safetensors / stage2 .pt ARs are not supported")
    meta = BundleMeta(
        base_model=str(base), layer_index=layer, d_model=d_model, n_layers=n_layers,
        injection=InjectionSettings("replace", scale, 1, 1.0), tokens=tokens,
        prompt_templates={"av": av_tmpl, "ar": ar_tmpl}, mse_scale=float(d_model) ** 0.5,
        av_format="peft", ar_format="full",
        extra={"imported_from": {"layout": "anicka", "av": str(av_dir), "ar": str(ar_dir), "ar_form": form,
                                 "depth_pct": depth},
               "av_chat_template": RAW_CHAT_TEMPLATE, "ar_add_special_tokens": specials},
    )
    return NLAParts(meta, tokenizer, dev, str(where), av_model=av_model, trunk=trunk, head=head)
