"""nanoNLA-style merged checkpoints: merged (bf16) AV/AR weights, additive injection.

Layout (what this importer accepts; see docs/interop.md)::

    ROOT/
      nla_meta.yaml      format: nanonla (below)
      av/                merged causal LM (config.json, *.safetensors, tokenizer files)
      ar/                merged model, either cut to K + 1 blocks or full depth (cut here),
                         plus value_head.safetensors (``weight`` [d, d], optional ``bias`` [d])

``nla_meta.yaml``::

    format: nanonla              # required: identifies the layout
    version: 1                   # required: 1
    base_model: Qwen/Qwen3-0.6B  # optional: recorded, used by ``explain`` for base activations
    d_model: 1024                # required: checked against both configs
    layer: 18                    # required: K = output of decoder block K = hidden_states[K + 1]
    injection:
      type: additive             # required: additive (Karvonen) — the only kind nanoNLA trains
      layer: 1                   # block whose output receives the vector (default 1)
      coef: 1.0                  # h <- h + coef * ||h|| * v / ||v||   (default 1.0)
    marker:
      text: "?"                  # required: the placeholder token's text in the AV prompt
      token_id: 30               # required
      left_id: 220               # optional: derived from the live tokenizer when absent
      right_id: 522              # optional: derived from the live tokenizer when absent
    prompts:
      av: "...{marker}..."       # required
      ar: "...{explanation}..."  # required
    mse_scale: sqrt_d_model      # optional (default √d)

Inference recipe: the AV prompt is ``prompts.av`` with the marker, rendered through the chat
template; at the output of block ``injection.layer``, at the marker position, the hidden state
``h`` becomes ``h + coef * ||h|| * v / ||v||``. The AR reads its input's last token at block K
(no final norm) and applies the value head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nla.errors import NLAError
from nla.interop.common import (
    assemble,
    check_width,
    config_layers,
    find_head_file,
    load_linear,
    map_placeholders,
    resolve_scale,
    sidecar,
)
from nla.meta import META_NAME, require
from nla.models.injection import MarkerTokens
from nla.models.verbalizer import InjectionSettings

FORMAT = "nanonla"
VERSION = 1
ADDITIVE = ("additive", "add", "karvonen")


def is_nanonla_dir(root: Path) -> bool:
    try:
        return (root / META_NAME).exists() and sidecar(root).get("format") == FORMAT
    except NLAError:
        return False


def _marker(data: dict[str, Any], tokenizer: Any, av_template: str, where: Path) -> MarkerTokens:
    """The sidecar's marker, neighbours filled from the live tokenizer when not recorded."""
    from nla.models.prompts import encode_rendered, render_chat, user_content

    text = require(data, "marker.text", where, str)
    marker_id = require(data, "marker.token_id", where, int)
    ids = encode_rendered(tokenizer, render_chat(tokenizer, user_content(av_template, text)))
    hits = [i for i, t in enumerate(ids) if t == marker_id]
    if len(hits) != 1 or hits[0] in (0, len(ids) - 1):
        raise NLAError(f"{where}: field 'marker.token_id' ({marker_id}) occurs {len(hits)} times inside the "
                       f"rendered AV prompt, expected once with a token on each side")
    p = hits[0]
    marker = data["marker"]
    left = marker.get("left_id", int(ids[p - 1]))
    right = marker.get("right_id", int(ids[p + 1]))
    for name, value in (("left_id", left), ("right_id", right)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise NLAError(f"{where}: field 'marker.{name}' has invalid value {value!r}")
    return MarkerTokens(text, marker_id, left, right)


def load(path: str | Path, *, base_model: str | None = None, dtype: str | torch.dtype = "float32",
         device: str | None = None) -> Any:
    """An :class:`NLA` from a nanoNLA merged checkpoint folder."""
    from nla.bundle import BundleMeta
    from nla.models.loading import load_model, load_tokenizer, parse_dtype, pick_device
    from nla.models.reconstructor import load_trunk

    root = Path(path)
    where = root / META_NAME
    data = sidecar(root)
    fmt = require(data, "format", where, str)
    if fmt != FORMAT:
        raise NLAError(f"{where}: field 'format' is {fmt!r}, expected {FORMAT!r}")
    version = require(data, "version", where, int)
    if version != VERSION:
        raise NLAError(f"{where}: field 'version' is {version}, this importer reads {VERSION}")
    d_model = require(data, "d_model", where, int)
    layer = require(data, "layer", where, int)
    kind = require(data, "injection.type", where, str)
    if kind not in ADDITIVE:
        raise NLAError(f"{where}: field 'injection.type' is {kind!r}; nanoNLA checkpoints use 'additive'")
    inj = data["injection"]
    inject_layer = inj.get("layer", 1)
    coef = inj.get("coef", 1.0)
    if not isinstance(inject_layer, int) or isinstance(inject_layer, bool) or inject_layer < 0:
        raise NLAError(f"{where}: field 'injection.layer' has invalid value {inject_layer!r}")
    if isinstance(coef, bool) or not isinstance(coef, (int, float)):
        raise NLAError(f"{where}: field 'injection.coef' has invalid value {coef!r}")
    av_template = map_placeholders(require(data, "prompts.av", where, str), {"marker": "marker"}, "marker",
                                   where, "prompts.av")
    ar_template = map_placeholders(require(data, "prompts.ar", where, str), {"explanation": "explanation"},
                                   "explanation", where, "prompts.ar")
    mse_scale = resolve_scale(data.get("mse_scale", "sqrt_d_model"), d_model, where, "mse_scale")
    av_dir, ar_dir = root / "av", root / "ar"
    for sub in (av_dir, ar_dir):
        if not (sub / "config.json").exists():
            raise NLAError(f"{root}: missing merged model folder {sub.name}/ (with config.json)")
    check_width(d_model, [av_dir, ar_dir], where)
    n_layers = config_layers(av_dir)
    if not 0 <= layer < n_layers:
        raise NLAError(f"{where}: field 'layer' is {layer}, the AV has blocks 0..{n_layers - 1}")
    if inject_layer >= n_layers:
        raise NLAError(f"{where}: field 'injection.layer' is {inject_layer}, the AV has blocks 0..{n_layers - 1}")
    ar_layers = config_layers(ar_dir)
    if ar_layers < layer + 1:
        raise NLAError(f"{where}: field 'layer' is {layer} but the AR folder has only {ar_layers} blocks")

    tokenizer = load_tokenizer(str(av_dir))
    tokens = _marker(data, tokenizer, av_template, where)
    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    meta = BundleMeta(
        base_model=str(base_model or data.get("base_model") or av_dir.resolve()),
        layer_index=layer,
        d_model=d_model,
        n_layers=n_layers,
        # The scale is unused by additive injection; √d is recorded so a later switch to
        # replace mode starts from the DESIGN default rather than from 1.
        injection=InjectionSettings("add", float(d_model) ** 0.5, inject_layer, float(coef)),
        tokens=tokens,
        prompt_templates={"av": av_template, "ar": ar_template},
        mse_scale=mse_scale,
        extra={"imported_from": {"layout": FORMAT, "path": str(root)}},
    )
    av_model, _ = load_model(str(av_dir), dtype=torch_dtype, device=dev)
    trunk = load_trunk(str(ar_dir), layer if ar_layers > layer + 1 else None, torch_dtype)
    head = load_linear(find_head_file(ar_dir), d_model, d_model)
    return assemble(meta, av_model, trunk, tokenizer, head, dev, str(where))
