"""PEFT adapter pairs: LoRA adapters for a named base model, with a separate value head.

Layout (see docs/interop.md)::

    ROOT/
      nla_meta.yaml          kind: nla_peft_pair (below)
      av/                    adapter_config.json + adapter_model.safetensors
      ar/                    adapter_config.json + adapter_model.safetensors
                             + value head: value_head.safetensors | value_head.pt | linear_head.pt
                               (``weight`` [d, d], optional ``bias`` [d]; .pt read weights-only)

``nla_meta.yaml``::

    kind: nla_peft_pair
    base_model: meta-llama/Llama-3.1-8B-Instruct   # optional: default the adapters' base_model_name_or_path
    layer_index: 20            # K: the vectors are outputs of decoder block K
    d_model: 4096
    injection: {mode: replace | add, scale: 80.0 | sqrt_d_model, layer: 1, coef: 1.0}
    tokens: {marker: "…", marker_id: 1234, left_id: 29, right_id: 30}
    prompt_templates: {av: "...{marker}...", ar: "...{explanation}..."}
    ar:
      num_layers: 22           # blocks the AR adapter was trained on (default K + 1)
      readout_layer: 20        # block whose output is read (default num_layers - 1)
      value_head: linear_head.pt   # optional: which file (default: first found, order above)
    load_in_4bit: false        # load the base in 4-bit NF4 (needs bitsandbytes + CUDA)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nla.errors import NLAError
from nla.interop.common import (
    adapter_base,
    assemble,
    check_equal,
    find_head_file,
    is_adapter_dir,
    load_ar_trunk,
    load_av,
    load_linear,
    map_placeholders,
    quantization_4bit,
    resolve_scale,
    sidecar,
)
from nla.meta import META_NAME, require
from nla.models.injection import MarkerTokens
from nla.models.verbalizer import InjectionSettings

KIND = "nla_peft_pair"


def _int(data: dict[str, Any], field: str, where: Path, default: int) -> int:
    node: Any = data
    for part in field.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return default
    if not isinstance(node, int) or isinstance(node, bool) or node < 0:
        raise NLAError(f"{where}: field {field!r} has invalid value {node!r}")
    return node


def load(path: str | Path, *, base_model: str | None = None, load_in_4bit: bool | None = None,
         num_layers: int | None = None, readout_layer: int | None = None, ar_template: str | None = None,
         dtype: str | torch.dtype = "float32", device: str | None = None) -> Any:
    """An :class:`NLA` from a PEFT pair folder; keyword arguments override the sidecar."""
    from nla.bundle import BundleMeta
    from nla.models.layers import num_layers as config_num_layers
    from nla.models.loading import (
        canonical_spec,
        load_tokenizer,
        parse_dtype,
        pick_device,
        resolve_model_path,
    )

    root = Path(path)
    where = root / META_NAME
    data = sidecar(root)
    kind = require(data, "kind", where, str)
    if kind != KIND:
        raise NLAError(f"{where}: field 'kind' is {kind!r}, expected {KIND!r}")
    av_dir, ar_dir = root / "av", root / "ar"
    for sub in (av_dir, ar_dir):
        if not is_adapter_dir(sub):
            raise NLAError(f"{root}: {sub.name}/ is not a PEFT adapter folder (no adapter_config.json)")
    if base_model is None:
        base_model = check_equal({"base_model": data.get("base_model"),
                                  "av/adapter_config.json base_model_name_or_path": adapter_base(av_dir),
                                  "ar/adapter_config.json base_model_name_or_path": adapter_base(ar_dir)}, where)
    base = canonical_spec(str(base_model))
    layer = require(data, "layer_index", where, int)
    d_model = require(data, "d_model", where, int)
    mode = require(data, "injection.mode", where, str)
    if mode not in ("replace", "add"):
        raise NLAError(f"{where}: field 'injection.mode' has invalid value {mode!r} (replace or add)")
    inj = data["injection"]
    scale = resolve_scale(inj.get("scale", "sqrt_d_model"), d_model, where, "injection.scale")
    coef = resolve_scale(inj.get("coef", 1.0), d_model, where, "injection.coef")
    tokens = MarkerTokens(require(data, "tokens.marker", where, str), require(data, "tokens.marker_id", where, int),
                          require(data, "tokens.left_id", where, int), require(data, "tokens.right_id", where, int))
    av_template = map_placeholders(require(data, "prompt_templates.av", where, str), {"marker": "marker", "tag": "tag"},
                                   "marker", where, "prompt_templates.av")
    raw_ar = ar_template if ar_template is not None else require(data, "prompt_templates.ar", where, str)
    ar_tmpl = map_placeholders(raw_ar, {"explanation": "explanation"}, "explanation", where, "prompt_templates.ar")

    ar_meta = data.get("ar") or {}
    if not isinstance(ar_meta, dict):
        raise NLAError(f"{where}: field 'ar' has invalid value {ar_meta!r}")
    depth = num_layers if num_layers is not None else _int(data, "ar.num_layers", where, layer + 1)
    readout = readout_layer if readout_layer is not None else _int(data, "ar.readout_layer", where, depth - 1)
    if depth < 1:
        raise NLAError(f"{where}: field 'ar.num_layers' must be at least 1, got {depth}")
    if not 0 <= readout < depth:
        raise NLAError(f"{where}: field 'ar.readout_layer' is {readout}, the AR has blocks 0..{depth - 1}")

    from transformers import AutoConfig

    base_layers = config_num_layers(AutoConfig.from_pretrained(resolve_model_path(base), trust_remote_code=False))
    if depth > base_layers:
        raise NLAError(f"{where}: field 'ar.num_layers' is {depth}, the base model has {base_layers} blocks")
    if not 0 <= layer < base_layers:
        raise NLAError(f"{where}: field 'layer_index' is {layer}, the base model has blocks 0..{base_layers - 1}")

    want_4bit = load_in_4bit if load_in_4bit is not None else bool(data.get("load_in_4bit", False))
    quant = quantization_4bit() if want_4bit else None
    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    tokenizer = load_tokenizer(base)
    meta = BundleMeta(
        base_model=base,
        layer_index=layer,
        d_model=d_model,
        n_layers=base_layers,
        injection=InjectionSettings(mode, scale, _int(data, "injection.layer", where, 1), coef),
        tokens=tokens,
        prompt_templates={"av": av_template, "ar": ar_tmpl},
        mse_scale=float(d_model) ** 0.5,
        av_format="peft",
        ar_format="peft",
        extra={"imported_from": {"layout": "peft_pair", "path": str(root), "ar_num_layers": depth,
                                 "ar_readout_layer": readout}},
    )
    av_model = load_av(av_dir, base, torch_dtype, dev, quant)
    trunk = load_ar_trunk(ar_dir, base, depth - 1, torch_dtype, quant, readout)
    if readout != layer and quant is None:
        # Our bundle rebuilds a LoRA AR as "base cut after block K + adapter"; an AR that reads
        # another block cannot be rebuilt that way, so it is merged into a full trunk instead.
        trunk = trunk.merge_and_unload()  # type: ignore[operator]
        meta.ar_format = "full"
    head = load_linear(find_head_file(ar_dir, ar_meta.get("value_head")), d_model, d_model)
    return assemble(meta, av_model, trunk, tokenizer, head, dev, str(where))
