"""Cross-architecture universal NLAs: one AV/AR trunk, per-model linear maps (docs/design.md §9).

The object is :class:`nla.universal.bundle.UniversalNLA` (our universal bundle); this module
only imports the published layout, as parts.

:func:`load` imports AlexWortega's published universal NLA (AlexWortega/qwen3-1p7b-nla:
``train_av_multi``, ``train_ar_multi``, ``nla/enc_dec_adapters.py``; release e.g.
``AlexWortega/Qwen1.7bnla``)::

    ROOT/
      nla_meta.yaml        kind: nla_model_universal, av_base, d_shared, injection_scale
                           (sqrt_d_model), tokens {injection_char, injection_token_id,
                           injection_left_neighbor_id, injection_right_neighbor_id},
                           prompt_templates.actor ("…{model_tag}…{injection_char}…"),
                           training_tags, anchor_tag (v8 files: schema_version "v8_mixed", …)
      av/                  PEFT LoRA on av_base (task CAUSAL_LM, scaling alpha / r)
      ar/                  PEFT LoRA on their critic module (av_base cut to layer_index + 1
                           blocks, final norm removed); its value head is never saved, so it
                           is the identity it was initialised to
      ar/nla_meta.yaml     kind: nla_ar_universal, ar_base, layer_index, d_shared,
                           critic_template ("…{z}…"), training_tags, anchor_tag
      adapters/adapters.safetensors   encoders.<tag>.weight [d_shared, d_M],
                                      decoders.<tag>.weight [d_M, d_shared] (bias-free)
      adapters/meta.json              d_shared, model_dims, adapter_class (LinearAdapter)

Recipe reproduced: the AV prompt is the actor template with the model tag and injection
char, in the chat template with a generation prompt; the embedding at the marker becomes
``enc_M(h_M)`` normalised to √d_shared. The AR reads ``critic_template`` with the explanation,
encoded without special tokens, at the last token; ``dec_M`` maps it back to model M.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nla.errors import NLAError
from nla.interop.common import (
    load_av,
    map_placeholders,
    resolve_scale,
    sidecar,
)
from nla.meta import META_NAME, require
from nla.names import ADAPTERS_DIR as ADAPTERS
from nla.parts import BundleMeta, NLAParts, UniversalParts

KIND = "nla_model_universal"
AR_KIND = "nla_ar_universal"
POOL_WEIGHTS = "adapters.safetensors"
POOL_META = "meta.json"
# train_ar_multi.py's CRITIC_TEMPLATE, used when a release ships no ar/nla_meta.yaml.
CRITIC_TEMPLATE = "Summary of the following text: <text>{z}</text> <summary>"


def read_pool(folder: Path, d_shared: int, where: Path) -> tuple[dict[str, tuple[nn.Linear, nn.Linear]], dict[str, int]]:
    """``ModelPoolAdapters`` files → ``{tag: (enc, dec)}`` and ``{tag: d_M}``."""
    from nla.interop.common import linear_from, read_json, read_tensors

    meta_path, weights = folder / POOL_META, folder / POOL_WEIGHTS
    for f in (meta_path, weights):
        if not f.exists():
            raise NLAError(f"{where}: missing {f.relative_to(folder.parent)}")
    meta = read_json(meta_path)
    cls = meta.get("adapter_class", "LinearAdapter")
    if cls != "LinearAdapter":
        raise NLAError(f"{meta_path}: field 'adapter_class' is {cls!r}; only LinearAdapter (bias-free linear maps) "
                       f"is supported")
    if meta.get("d_shared") != d_shared:
        raise NLAError(f"{meta_path}: contradictory fields: d_shared is {meta.get('d_shared')!r} here and {d_shared} "
                       f"in {where.name}")
    dims = meta.get("model_dims")
    if not isinstance(dims, dict) or not dims:
        raise NLAError(f"{meta_path}: missing field 'model_dims'")
    tensors = read_tensors(weights)
    maps: dict[str, tuple[nn.Linear, nn.Linear]] = {}
    for tag, d_m in dims.items():
        enc_key, dec_key = f"encoders.{tag}.weight", f"decoders.{tag}.weight"
        for key in (enc_key, dec_key):
            if key not in tensors:
                raise NLAError(f"{weights}: field 'model_dims' lists {tag!r} but tensor {key!r} is missing")
        maps[str(tag)] = (linear_from({"weight": tensors[enc_key]}, int(d_m), d_shared, weights),
                          linear_from({"weight": tensors[dec_key]}, d_shared, int(d_m), weights))
    return maps, {str(k): int(v) for k, v in dims.items()}


def load(path: str | Path, *, base_model: str | None = None, layer: int | None = None,
         dtype: str | torch.dtype = "float32", device: str | None = None) -> UniversalParts:
    """The parts of AlexWortega's published universal layout; ``nla.universal.bundle.UniversalNLA.from_parts``
    (or ``UniversalNLA.from_pretrained``) makes the object."""
    import math

    from nla.interop.common import (
        PAPER_TOKEN_FIELDS,
        adapter_scaling,
        adapter_tensors,
        check_equal,
        is_adapter_dir,
        merged_trunk,
    )
    from nla.models.injection import MarkerTokens
    from nla.models.layers import num_layers
    from nla.models.loading import canonical_spec, load_tokenizer, parse_dtype, pick_device
    from nla.models.reconstructor import identity_head
    from nla.models.verbalizer import InjectionSettings

    root = Path(path)
    where = root / META_NAME
    data = sidecar(root)
    kind = require(data, "kind", where, str)
    if kind == AR_KIND:
        raise NLAError(f"{where}: the AR half of a universal NLA (kind {AR_KIND!r}); pass the release folder whose "
                       f"nla_meta.yaml has kind {KIND!r}")
    if kind != KIND:
        raise NLAError(f"{where}: field 'kind' is {kind!r}, expected {KIND!r}")
    av_dir, ar_dir = root / "av", root / "ar"
    for sub in (av_dir, ar_dir):
        if not is_adapter_dir(sub):
            raise NLAError(f"{root}: {sub.name}/ is not a PEFT adapter folder (no adapter_config.json)")
    ar_where = ar_dir / META_NAME
    ar_data = sidecar(ar_dir) if ar_where.exists() else {}
    if ar_data and ar_data.get("kind") != AR_KIND:
        raise NLAError(f"{ar_where}: field 'kind' is {ar_data.get('kind')!r}, expected {AR_KIND!r}")
    d_shared = check_equal({"d_shared": data.get("d_shared"), "ar d_shared": ar_data.get("d_shared")}, where)
    if not isinstance(d_shared, int) or d_shared <= 0:
        raise NLAError(f"{where}: field 'd_shared' has invalid value {d_shared!r}")
    trunk_spec = canonical_spec(base_model or check_equal({"av_base": data.get("av_base"),
                                                           "ar/nla_meta.yaml ar_base": ar_data.get("ar_base")}, where))
    recorded = ar_data.get("layer_index")
    if layer is not None and recorded is not None and layer != recorded:
        raise NLAError(f"{ar_where}: contradictory fields: layer_index is {recorded!r} but {layer} was given")
    k = layer if layer is not None else recorded
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise NLAError(f"{ar_where}: missing field 'layer_index' (the AR trunk's depth - 1): pass --layer K")
    anchor = require(data, "anchor_tag", where, str)
    scale = resolve_scale(data.get("injection_scale", "sqrt_d_model"), d_shared, where, "injection_scale")
    tokens = MarkerTokens(require(data, "tokens.injection_char", where, str),
                          require(data, "tokens.injection_token_id", where, int),
                          require(data, "tokens.injection_left_neighbor_id", where, int),
                          require(data, "tokens.injection_right_neighbor_id", where, int))
    templates = require(data, "prompt_templates", where, dict)
    raw_av = templates.get("av") or templates.get("actor")
    if not isinstance(raw_av, str):
        raise NLAError(f"{where}: missing field 'prompt_templates.actor'")
    av_template = map_placeholders(raw_av, {"injection_char": "marker", "model_tag": "tag"}, "marker", where,
                                   "prompt_templates.actor")
    # With no AR sidecar at all, the template is their trainer's constant (CRITIC_TEMPLATE);
    # a sidecar that is there but lacks the field is an error.
    raw_ar = ar_data.get("critic_template") if ar_data else CRITIC_TEMPLATE
    if raw_ar is None:
        raise NLAError(f"{ar_where}: missing field 'critic_template'")
    ar_template = map_placeholders(str(raw_ar), {"z": "explanation", "explanation": "explanation"}, "explanation",
                                   ar_where, "critic_template")
    maps, dims = read_pool(root / ADAPTERS, d_shared, where)
    if anchor not in maps:
        raise NLAError(f"{where}: field 'anchor_tag' is {anchor!r}, not in adapters/meta.json model_dims "
                       f"{sorted(maps)}")

    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    tokenizer = load_tokenizer(trunk_spec)
    av_model = load_av(av_dir, trunk_spec, torch_dtype, dev)
    n_layers = num_layers(av_model.config)
    if not 0 <= k < n_layers:
        raise NLAError(f"{ar_where}: field 'layer_index' is {k}, the trunk has blocks 0..{n_layers - 1}")
    trunk = merged_trunk(trunk_spec, k, adapter_tensors(ar_dir), adapter_scaling(ar_dir),
                         ar_dir / "adapter_model.safetensors", torch_dtype)
    meta = BundleMeta(
        base_model=trunk_spec, layer_index=k, d_model=d_shared, n_layers=n_layers,
        injection=InjectionSettings("replace", scale, 1, 1.0), tokens=tokens,
        prompt_templates={"av": av_template, "ar": ar_template}, mse_scale=math.sqrt(d_shared),
        av_format="peft", ar_format="full",
        extra={"imported_from": {"layout": "universal", "path": str(root)}, "ar_add_special_tokens": False},
    )
    trunk_parts = NLAParts(meta, tokenizer, dev, str(where), av_model=av_model, trunk=trunk,
                           head=identity_head(d_shared), field_names=PAPER_TOKEN_FIELDS)
    models = {tag: {"d_model": d_m, "trained": tag in (data.get("training_tags") or [])} for tag, d_m in dims.items()}
    return UniversalParts(trunk_parts, anchor, maps, models)
