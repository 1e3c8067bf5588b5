"""nanoNLA checkpoints (ceselder/nanoNLA and its forks senku14x/nanoNLA, syvb/nanoNLA).

What their trainer (``nla/train_sft.py``) writes, and what this importer reads::

    NAME-av/    the AV: a full causal-LM folder, or a PEFT adapter folder over the base
                + nla_meta.yaml: the *dataset* sidecar copied next to the weights
    NAME-ar/    the AR, one of
                  (a) full: the critic backbone cut to K + 1 blocks (config.json,
                      *.safetensors) + value_head.safetensors (``weight`` [d, d], no bias)
                  (b) LoRA: ar_lora_value_head.safetensors (``backbone.model.layers.N…
                      lora_A/B.default.weight`` + ``value_head.weight``) + ar_meta.json
                      (``ar_num_layers``, ``lora_r``, ``lora_alpha``, ``target_modules``,
                      ``quant``, ``final_norm_stripped``; absent in older files = True,
                      pre-2026-06 checkpoints wrote False: the final norm was kept)
                + the same nla_meta.yaml

The sidecar is the dataset's (``nla/datagen/sidecar.py``): ``kind: nla_dataset``,
``schema_version: 1``, ``extraction: {base_model, d_model, layer_index, …}``, ``tokens:
{injection_char, injection_token_id, injection_left_neighbor_id,
injection_right_neighbor_id, critic_suffix_ids}``, ``prompt_templates: {actor, critic}``. It
has no role (the AR is the folder with a value head) and it does **not** record the
injection: nanoNLA trains Karvonen additive injection (``h + ||h|| v/||v||`` at the output of
block 1), the paper's datagen writes the same sidecar for replace-at-embedding AVs. So the
injection must be given (registry entry, ``injection="add"`` / ``--injection add``); with none
the import stops instead of guessing.

Recipe reproduced (``nla/train_sft.py``, ``nla_inference.py``): the AV prompt is the actor
template in the chat template with a generation prompt, encoded without special tokens; the
AR input is the critic template, encoded with ``add_special_tokens=False`` and read at its
last token. Their critic feeds the value head ``normalize(h, √d)``; with their bias-free head
that changes the output's norm only, not its direction, and every metric here is
direction-only (reconstructions equal theirs up to a positive per-row factor).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nla.errors import NLAError
from nla.interop.common import (
    PAPER_TOKEN_FIELDS,
    check_equal,
    check_width,
    config_layers,
    find_partner,
    folder_tokenizer,
    is_adapter_dir,
    linear_from,
    load_av,
    load_linear,
    map_placeholders,
    merged_trunk,
    read_json,
    read_tensors,
    resolve_scale,
    sidecar,
)
from nla.meta import META_NAME, require
from nla.models.injection import MarkerTokens
from nla.models.verbalizer import InjectionSettings
from nla.names import DATASET_KIND, VALUE_HEAD_FILE
from nla.parts import BundleMeta, NLAParts

KIND = DATASET_KIND
AR_LORA = "ar_lora_value_head.safetensors"
AR_META = "ar_meta.json"
INJECTIONS = {"add": "add", "additive": "add", "karvonen": "add", "replace": "replace"}


def is_ar_dir(root: Path) -> bool:
    return (root / VALUE_HEAD_FILE).exists() or (root / AR_LORA).exists()


def is_nanonla_dir(root: Path) -> bool:
    """A dataset sidecar next to weights (a dataset folder has parquet files, not weights)."""
    if not (root / META_NAME).exists():
        return False
    try:
        kind = sidecar(root).get("kind")
    except NLAError:
        return False
    has_weights = (root / "config.json").exists() or is_adapter_dir(root) or (root / AR_LORA).exists()
    return kind == KIND and has_weights


def resolve_pair(path: Path, ar: Path | None = None) -> tuple[Path | None, Path | None]:
    """``(av_dir, ar_dir)``; a half with no sibling gives ``None`` for the other (single role)."""
    if ar is not None:
        return path, ar
    if is_nanonla_dir(path / "av") and is_nanonla_dir(path / "ar"):
        return path / "av", path / "ar"
    role = "ar" if is_ar_dir(path) else "av"
    try:
        other: Path | None = find_partner(path, role, is_nanonla_dir, "nanoNLA")
    except NLAError:
        other = None
    return (path, other) if role == "av" else (other, path)


def _template(data: dict[str, Any], where: Path, ours: str, theirs: str) -> str:
    templates = data.get("prompt_templates") or {}
    value = templates.get(ours) if isinstance(templates, dict) else None
    if value is None and isinstance(templates, dict):
        value = templates.get(theirs)
    if not isinstance(value, str):
        raise NLAError(f"{where}: missing field 'prompt_templates.{theirs}'")
    return value


def read_meta(av_dir: Path, ar_dir: Path, *, injection: str | None, base_model: str | None = None,
              inject_layer: int | None = None, inject_coef: float | None = None,
              injection_scale: float | str | None = None, ar_only: bool = False) -> BundleMeta:
    """Both halves' sidecars (copies of one dataset sidecar) as our :class:`BundleMeta`.

    ``ar_only``: an AR with no AV (both arguments are the AR folder); the injection, which
    only the AV uses, is then not needed.
    """
    av_where, ar_where = av_dir / META_NAME, ar_dir / META_NAME
    av, ar = sidecar(av_dir), sidecar(ar_dir)
    for data, where in ((av, av_where), (ar, ar_where)):
        kind = require(data, "kind", where, str)
        if kind != KIND:
            raise NLAError(f"{where}: field 'kind' is {kind!r}, expected {KIND!r}")
        version = data.get("schema_version", 1)
        if version != 1:
            raise NLAError(f"{where}: field 'schema_version' is {version!r}, this importer reads 1")
    if is_ar_dir(av_dir) and not ar_only:
        raise NLAError(f"{av_dir}: holds a value head, so it is an AR folder; pass the AV folder as SOURCE")
    d_model = check_equal({"extraction.d_model (AV)": av.get("extraction", {}).get("d_model"),
                           "extraction.d_model (AR)": ar.get("extraction", {}).get("d_model")}, av_where)
    layer = check_equal({"extraction.layer_index (AV)": av.get("extraction", {}).get("layer_index"),
                         "extraction.layer_index (AR)": ar.get("extraction", {}).get("layer_index")}, av_where)
    for name, value in (("extraction.d_model", d_model), ("extraction.layer_index", layer)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise NLAError(f"{av_where}: field {name!r} has invalid value {value!r}")
    base = base_model or check_equal({"extraction.base_model (AV)": av.get("extraction", {}).get("base_model"),
                                      "extraction.base_model (AR)": ar.get("extraction", {}).get("base_model")},
                                     av_where)
    tokens = MarkerTokens(
        require(av, "tokens.injection_char", av_where, str),
        require(av, "tokens.injection_token_id", av_where, int),
        require(av, "tokens.injection_left_neighbor_id", av_where, int),
        require(av, "tokens.injection_right_neighbor_id", av_where, int),
    )
    ar_id = (ar.get("tokens") or {}).get("injection_token_id")
    if ar_id is not None and ar_id != tokens.marker_id:
        raise NLAError(f"{ar_where}: contradictory fields: tokens.injection_token_id is {ar_id} here and "
                       f"{tokens.marker_id} in the AV sidecar")
    av_template = map_placeholders(_template(av, av_where, "av", "actor"), {"injection_char": "marker"}, "marker",
                                   av_where, "prompt_templates.actor")
    ar_template = map_placeholders(_template(ar, ar_where, "ar", "critic"), {"explanation": "explanation"},
                                   "explanation", ar_where, "prompt_templates.critic")
    if injection is None and ar_only:
        injection = "replace"  # unused without an AV; recorded only to keep the sidecar's shape
    if injection is None:
        raise NLAError(f"{av_where}: the nanoNLA sidecar does not record the injection (field 'injection' is "
                       f"missing); nanoNLA trains additive injection at block 1: pass --injection add "
                       f"(injection='add'), or use its registry name")
    mode = INJECTIONS.get(str(injection).lower())
    if mode is None:
        raise NLAError(f"injection {injection!r} is not one of {', '.join(sorted(INJECTIONS))}")
    if mode == "add":
        scale = math.sqrt(d_model)  # unused by additive injection; recorded as the replace default
    else:
        raw = injection_scale if injection_scale is not None else av.get("extraction", {}).get("injection_scale")
        if raw is None and ar_only:
            raw = "sqrt_d_model"
        if raw is None:
            raise NLAError(f"{av_where}: replace injection needs the scale the AV was trained with; field "
                           f"'extraction.injection_scale' is missing: pass injection_scale=...")
        scale = resolve_scale(raw, d_model, av_where, "extraction.injection_scale")
    layer_add = 1 if inject_layer is None else int(inject_layer)
    coef = 1.0 if inject_coef is None else float(inject_coef)
    n_layers = config_layers(av_dir) if (av_dir / "config.json").exists() else None
    if n_layers is not None and not 0 <= layer < n_layers:
        raise NLAError(f"{av_where}: field 'extraction.layer_index' is {layer}, the AV has blocks 0..{n_layers - 1}")
    return BundleMeta(
        base_model=str(base),
        layer_index=layer,
        d_model=d_model,
        n_layers=n_layers if n_layers is not None else -1,
        injection=InjectionSettings(mode, scale, layer_add, coef),
        tokens=tokens,
        prompt_templates={"av": av_template, "ar": ar_template},
        mse_scale=math.sqrt(d_model),
        av_format="peft" if is_adapter_dir(av_dir) else "full",
        # nanoNLA encodes critic prompts with add_special_tokens=False (train_sft.py _ar_prepare_chunk).
        extra={"imported_from": {"layout": "nanonla", "av": str(av_dir), "ar": str(ar_dir), "injection": mode},
               "ar_add_special_tokens": False},
    )


def _ar_meta(ar_dir: Path) -> dict[str, Any]:
    path = ar_dir / AR_META
    if not path.exists():
        raise NLAError(f"{ar_dir}: {AR_LORA} without {AR_META} (needs ar_num_layers, lora_r, lora_alpha)")
    data = read_json(path)
    for name in ("ar_num_layers", "lora_r", "lora_alpha"):
        if not isinstance(data.get(name), (int, float)) or isinstance(data.get(name), bool):
            raise NLAError(f"{path}: missing or invalid field {name!r}")
    return data


def load_ar(ar_dir: Path, base: str, layer: int, d_model: int, dtype: torch.dtype) -> tuple[Any, Any, bool]:
    """``(trunk, head, final_norm_kept)`` for either AR form."""
    from nla.models.reconstructor import load_trunk

    if (ar_dir / VALUE_HEAD_FILE).exists():
        have = config_layers(ar_dir)
        if have < layer + 1:
            raise NLAError(f"{ar_dir / META_NAME}: field 'extraction.layer_index' is {layer} but the AR has only "
                           f"{have} blocks")
        trunk = load_trunk(str(ar_dir), layer if have > layer + 1 else None, dtype)
        return trunk, load_linear(ar_dir / VALUE_HEAD_FILE, d_model, d_model), False
    meta = _ar_meta(ar_dir)
    where = ar_dir / AR_META
    depth = int(meta["ar_num_layers"])
    if depth != layer + 1:
        raise NLAError(f"{where}: contradictory fields: ar_num_layers is {depth} but the sidecar's "
                       f"extraction.layer_index {layer} needs {layer + 1} blocks")
    keep_norm = meta.get("final_norm_stripped", True) is False
    tensors = read_tensors(ar_dir / AR_LORA)
    # inject_adapter_in_model(LoraConfig(use_rslora=True, …)): scaling = alpha / sqrt(r).
    scaling = float(meta["lora_alpha"]) / math.sqrt(float(meta["lora_r"]))
    trunk = merged_trunk(base, layer, tensors, scaling, ar_dir / AR_LORA, dtype, keep_final_norm=keep_norm)
    heads = {k.removeprefix("value_head."): v for k, v in tensors.items() if k.startswith("value_head.")}
    if "weight" not in heads:
        raise NLAError(f"{ar_dir / AR_LORA}: no 'value_head.weight' tensor")
    head = linear_from(heads, d_model, d_model, ar_dir / AR_LORA)
    return trunk, head, keep_norm


def load(path: str | Path, *, ar: str | Path | None = None, injection: str | None = None,
         base_model: str | None = None, inject_layer: int | None = None, inject_coef: float | None = None,
         injection_scale: float | str | None = None, dtype: str | torch.dtype = "float32",
         device: str | None = None) -> NLAParts:
    """The parts of a nanoNLA pair (either half, or a folder with ``av/`` and ``ar/``)."""
    from nla.models.loading import parse_dtype, pick_device

    av_dir, ar_dir = resolve_pair(Path(path), Path(ar) if ar is not None else None)
    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    if ar_dir is None:
        assert av_dir is not None
        # An AV with no AR: it still verbalizes (the injection must still be given).
        meta = read_meta(av_dir, av_dir, injection=injection, base_model=base_model, inject_layer=inject_layer,
                         inject_coef=inject_coef, injection_scale=injection_scale)
        meta.extra["single_role"] = "av"
        tokenizer = folder_tokenizer(av_dir, meta.base_model)
        model = load_av(av_dir, meta.base_model, torch_dtype, dev)
        if meta.n_layers < 0:
            from nla.models.layers import num_layers

            meta.n_layers = num_layers(model.config)
        return NLAParts(meta, tokenizer, dev, str(av_dir / META_NAME), av_model=model, field_names=PAPER_TOKEN_FIELDS,
                        role="av")
    if av_dir is None:
        meta = read_meta(ar_dir, ar_dir, injection=injection, base_model=base_model, ar_only=True)
        meta.extra["single_role"] = "ar"
        trunk, head, keep_norm = load_ar(ar_dir, meta.base_model, meta.layer_index, meta.d_model, torch_dtype)
        if keep_norm:
            meta.extra["ar_final_norm"] = True
        return NLAParts(meta, folder_tokenizer(ar_dir, meta.base_model), dev, str(ar_dir / META_NAME), trunk=trunk, head=head, role="ar")
    meta = read_meta(av_dir, ar_dir, injection=injection, base_model=base_model, inject_layer=inject_layer,
                     inject_coef=inject_coef, injection_scale=injection_scale)
    if (av_dir / "config.json").exists():
        check_width(meta.d_model, [av_dir], av_dir / META_NAME, "extraction.d_model")
    tokenizer = folder_tokenizer(av_dir, meta.base_model)
    av_model = load_av(av_dir, meta.base_model, torch_dtype, dev)
    if meta.n_layers < 0:
        from nla.models.layers import num_layers

        meta.n_layers = num_layers(av_model.config)
    trunk, head, keep_norm = load_ar(ar_dir, meta.base_model, meta.layer_index, meta.d_model, torch_dtype)
    if keep_norm:
        # Reproduced here, but our bundle stores AR trunks without a final norm: import_layout
        # refuses to write such an NLA rather than save one that reloads differently.
        meta.extra["ar_final_norm"] = True
    return NLAParts(meta, tokenizer, dev, str(av_dir / META_NAME), av_model=av_model, trunk=trunk, head=head,
                    field_names=PAPER_TOKEN_FIELDS)
