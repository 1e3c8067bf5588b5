"""The paper's checkpoints (kitft/natural_language_autoencoders): release and training sidecars.

Each of the pair is a full Hugging Face model folder with its own ``nla_meta.yaml``. Two
writers exist and both are read (fields as their code spells them):

* release sidecars (``kitft/nla-qwen2.5-7b-L20-av`` / ``-ar``): ``role: av | ar`` (optional in
  older files), ``prompt_templates.av / .ar``, ``extraction_layer_index`` and/or
  ``critic.extraction_layer_index``;
* training sidecars (their ``nla/config.py`` ``write_model_sidecar``): ``role: actor | critic``,
  ``stage``, ``base_checkpoint``, ``prompt_templates.actor / .critic``,
  ``critic.extraction_layer_index`` (schema 2) or ``critic.num_hidden_layers`` (schema 1, also
  spelled ``ar.num_hidden_layers`` in their docs; despite the name it holds K), and legacy
  extras (top-level ``layer``, ``training.num_layers``) that are read when present.

Common fields: ``kind: nla_model``, ``d_model``, ``extraction: {injection_scale, mse_scale}``
(number, ``sqrt_d_model``, or null = raw; critics carry null), ``tokens: {injection_char,
injection_token_id, injection_left_neighbor_id, injection_right_neighbor_id,
critic_suffix_ids}``.

Inference recipe (their ``nla_inference.py``, what the import reproduces): the AV prompt is
the actor template formatted with the injection char, rendered through the chat template
with a generation prompt; the embedding output at the (id + both neighbours) marker is
replaced by ``v * s / ||v||``. The AR folder is the base cut to ``K + 1`` blocks with no final
norm; its input is the critic template formatted with the whole explanation (no cut),
tokenized with special tokens, read at the last token and passed through
``value_head.safetensors`` (``Linear(d, d)``, no bias). ``explain`` reads activations from
``base_checkpoint`` (or the registry's / ``--base-model``'s base), never from the AV.
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
    find_head_file,
    find_partner,
    load_linear,
    map_placeholders,
    resolve_scale,
    sidecar,
)
from nla.meta import META_NAME, dig, require
from nla.models.injection import MarkerTokens
from nla.models.verbalizer import InjectionSettings
from nla.parts import BundleMeta, NLAParts

KIND = "nla_model"
SCHEMA_VERSIONS = (1, 2)
ROLES = {"av": "av", "actor": "av", "ar": "ar", "critic": "ar"}
# Where each writer put K (first hit wins; all present values must agree).
LAYER_FIELDS = ("critic.extraction_layer_index", "critic.num_hidden_layers", "ar.num_hidden_layers",
                "extraction_layer_index", "extraction.layer_index", "layer")


def _role(root: Path, data: dict[str, Any]) -> str:
    """``av`` or ``ar``: release files say av/ar, training files actor/critic."""
    role = data.get("role")
    if role is not None:
        if role not in ROLES:
            raise NLAError(f"{root / META_NAME}: field 'role' has invalid value {role!r} "
                           f"(expected one of {', '.join(ROLES)})")
        return ROLES[role]
    # Older sidecars have no role: the AR is the folder that carries a value head.
    return "ar" if (root / "value_head.safetensors").exists() else "av"


def layer_fields(data: dict[str, Any], label: str) -> dict[str, Any]:
    """Every spelling of K present in one sidecar, keyed ``field (label)`` for error messages."""
    return {f"{name} ({label})": dig(data, name) for name in LAYER_FIELDS}


def is_paper_dir(root: Path) -> bool:
    if not (root / META_NAME).exists():
        return False
    try:
        return sidecar(root).get("kind") == KIND
    except NLAError:
        return False


def resolve_pair(path: Path, ar: Path | None = None) -> tuple[Path | None, Path | None]:
    """``(av_dir, ar_dir)`` from a pair folder (``av/`` + ``ar/``), or one half and its sibling.

    A half with no sibling gives ``None`` for the other: it loads as a single-role NLA.
    """
    if ar is not None:
        return path, ar
    if is_paper_dir(path / "av") and is_paper_dir(path / "ar"):
        return path / "av", path / "ar"
    role = _role(path, sidecar(path))
    try:
        other: Path | None = find_partner(path, role, is_paper_dir, "paper checkpoint")
    except NLAError:
        other = None
    return (path, other) if role == "av" else (other, path)


def _template(data: dict[str, Any], where: Path, new: str, old: str) -> str | None:
    templates = data.get("prompt_templates") or {}
    if not isinstance(templates, dict):
        raise NLAError(f"{where}: field 'prompt_templates' has invalid value {templates!r}")
    a, b = templates.get(new), templates.get(old)
    if a is not None and b is not None and a != b:
        raise NLAError(f"{where}: contradictory fields: prompt_templates.{new} and prompt_templates.{old} differ")
    value = a if a is not None else b
    if value is not None and not isinstance(value, str):
        raise NLAError(f"{where}: field 'prompt_templates.{new}' has invalid value {value!r}")
    return value


def _check_header(data: dict[str, Any], where: Path) -> None:
    kind = require(data, "kind", where, str)
    if kind != KIND:
        raise NLAError(f"{where}: field 'kind' is {kind!r}, expected {KIND!r}")
    # Training sidecars written before schema_version existed have none: they are schema 1.
    version = data.get("schema_version", 1)
    if version not in SCHEMA_VERSIONS:
        raise NLAError(f"{where}: field 'schema_version' is {version!r}, this importer reads "
                       f"{' or '.join(map(str, SCHEMA_VERSIONS))}")


def read_meta(av_dir: Path, ar_dir: Path, base_model: str | None = None,
              injection_scale: float | str | None = None) -> tuple[BundleMeta, list[int] | None]:
    """The pair's two sidecars merged into our :class:`BundleMeta` (every conflict named)."""
    av_where, ar_where = av_dir / META_NAME, ar_dir / META_NAME
    av, ar = sidecar(av_dir), sidecar(ar_dir)
    _check_header(av, av_where)
    _check_header(ar, ar_where)
    if _role(av_dir, av) != "av":
        raise NLAError(f"{av_where}: field 'role' is {av.get('role')!r}, expected 'av'")
    if _role(ar_dir, ar) != "ar":
        raise NLAError(f"{ar_where}: field 'role' is {ar.get('role')!r}, expected 'ar'")
    d_model = check_equal({"d_model (AV)": av.get("d_model"), "d_model (AR)": ar.get("d_model")}, av_where)
    if not isinstance(d_model, int) or isinstance(d_model, bool) or d_model <= 0:
        raise NLAError(f"{av_where}: field 'd_model' has invalid value {d_model!r}")
    check_width(d_model, [av_dir, ar_dir], av_where)
    layer = check_equal({**layer_fields(ar, "AR"), **layer_fields(av, "AV")}, ar_where)
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise NLAError(f"{ar_where}: field 'critic.extraction_layer_index' has invalid value {layer!r}")
    # The AR is the base cut after block K: K + 1 blocks. Anything else is an off-by-one
    # between the two halves (hidden_states[K] vs block K), which reconstructs the wrong layer.
    ar_layers = config_layers(ar_dir)
    if ar_layers != layer + 1:
        raise NLAError(f"{ar_where}: field 'critic.extraction_layer_index' is {layer} but the AR config has "
                       f"num_hidden_layers={ar_layers} (expected {layer + 1})")
    raw_scale = injection_scale if injection_scale is not None else require(av, "extraction.injection_scale", av_where)
    if raw_scale is None or raw_scale in ("raw", "none"):
        # Their config reads null as "inject the raw vector"; every released AV has a number.
        raise NLAError(f"{av_where}: field 'extraction.injection_scale' is null (raw, unscaled injection), which "
                       f"nla does not reproduce; pass the scale the AV was trained with (injection_scale=...)")
    scale = resolve_scale(raw_scale, d_model, av_where, "extraction.injection_scale")
    mse_raw = (ar.get("extraction") or {}).get("mse_scale", (av.get("extraction") or {}).get("mse_scale", "sqrt_d_model"))
    if mse_raw is None:
        mse_raw = "sqrt_d_model"  # raw-MSE training; our metrics are direction-only either way
    mse_scale = resolve_scale(mse_raw, d_model, av_where, "extraction.mse_scale")
    tok = require(av, "tokens", av_where, dict)
    tokens = MarkerTokens(
        require(av, "tokens.injection_char", av_where, str),
        require(av, "tokens.injection_token_id", av_where, int),
        require(av, "tokens.injection_left_neighbor_id", av_where, int),
        require(av, "tokens.injection_right_neighbor_id", av_where, int),
    )
    ar_tok = ar.get("tokens") or {}
    if "injection_token_id" in ar_tok and ar_tok["injection_token_id"] != tokens.marker_id:
        raise NLAError(f"{ar_where}: contradictory fields: tokens.injection_token_id is {ar_tok['injection_token_id']} "
                       f"here and {tokens.marker_id} in the AV sidecar")
    av_tmpl = _template(av, av_where, "av", "actor")
    if av_tmpl is None:
        raise NLAError(f"{av_where}: missing field 'prompt_templates.av'")
    ar_tmpl_own, ar_tmpl_av = _template(ar, ar_where, "ar", "critic"), _template(av, av_where, "ar", "critic")
    if ar_tmpl_own is not None and ar_tmpl_av is not None and ar_tmpl_own != ar_tmpl_av:
        raise NLAError(f"{ar_where}: contradictory fields: prompt_templates.ar differs between the AV and AR sidecars")
    ar_tmpl = ar_tmpl_own if ar_tmpl_own is not None else ar_tmpl_av
    if ar_tmpl is None:
        raise NLAError(f"{ar_where}: missing field 'prompt_templates.ar'")
    av_template = map_placeholders(av_tmpl, {"injection_char": "marker"}, "marker", av_where, "prompt_templates.av")
    ar_template = map_placeholders(ar_tmpl, {"explanation": "explanation"}, "explanation", ar_where,
                                   "prompt_templates.ar")
    suffix = ar_tok.get("critic_suffix_ids", tok.get("critic_suffix_ids"))
    if suffix is not None and not (isinstance(suffix, list) and all(isinstance(i, int) for i in suffix)):
        raise NLAError(f"{ar_where}: field 'tokens.critic_suffix_ids' has invalid value {suffix!r}")
    # explain() reads activations from this model: the AV itself is fine-tuned, so it is never
    # the fallback. Unknown stays "" and explain() asks for --base-model.
    recorded = {"base_checkpoint (AV)": av.get("base_checkpoint"), "base_checkpoint (AR)": ar.get("base_checkpoint"),
                "base_model (AV)": av.get("base_model"), "base_model (AR)": ar.get("base_model")}
    base = base_model or (check_equal(recorded, av_where) if any(v is not None for v in recorded.values()) else "")
    meta = BundleMeta(
        base_model=str(base),
        layer_index=layer,
        d_model=d_model,
        n_layers=config_layers(av_dir),
        injection=InjectionSettings("replace", scale, 1, 1.0),
        tokens=tokens,
        prompt_templates={"av": av_template, "ar": ar_template},
        mse_scale=mse_scale,
        extra={"imported_from": {"layout": "paper", "av": str(av_dir), "ar": str(ar_dir),
                                 "stage": av.get("stage")}},
    )
    return meta, suffix


def read_half_meta(folder: Path, role: str, base_model: str | None = None,
                   injection_scale: float | str | None = None) -> tuple[BundleMeta, list[int] | None]:
    """One half's sidecar as our :class:`BundleMeta` (the other half's fields left empty)."""
    where = folder / META_NAME
    data = sidecar(folder)
    _check_header(data, where)
    d_model = require(data, "d_model", where, int)
    check_width(d_model, [folder], where)
    layer = check_equal(layer_fields(data, role.upper()), where)
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise NLAError(f"{where}: field 'critic.extraction_layer_index' has invalid value {layer!r}")
    tok = data.get("tokens") or {}
    suffix = tok.get("critic_suffix_ids")
    if role == "av":
        raw = injection_scale if injection_scale is not None else require(data, "extraction.injection_scale", where)
        if raw is None or raw in ("raw", "none"):
            raise NLAError(f"{where}: field 'extraction.injection_scale' is null (raw, unscaled injection), which "
                           f"nla does not reproduce; pass the scale the AV was trained with (injection_scale=...)")
        scale = resolve_scale(raw, d_model, where, "extraction.injection_scale")
        tokens = MarkerTokens(require(data, "tokens.injection_char", where, str),
                              require(data, "tokens.injection_token_id", where, int),
                              require(data, "tokens.injection_left_neighbor_id", where, int),
                              require(data, "tokens.injection_right_neighbor_id", where, int))
        raw_av = _template(data, where, "av", "actor")
        if raw_av is None:
            raise NLAError(f"{where}: missing field 'prompt_templates.av'")
        av_template = map_placeholders(raw_av, {"injection_char": "marker"}, "marker", where, "prompt_templates.av")
        ar_template = ""
    else:
        ar_layers = config_layers(folder)
        if ar_layers != layer + 1:
            raise NLAError(f"{where}: field 'critic.extraction_layer_index' is {layer} but the AR config has "
                           f"num_hidden_layers={ar_layers} (expected {layer + 1})")
        scale = math.sqrt(d_model)
        # An AR needs no marker; an empty one keeps the sidecar's shape.
        tokens = MarkerTokens(str(tok.get("injection_char", "")), int(tok.get("injection_token_id", -1)),
                              int(tok.get("injection_left_neighbor_id", -1)), int(tok.get("injection_right_neighbor_id", -1)))
        raw_ar = _template(data, where, "ar", "critic")
        if raw_ar is None:
            raise NLAError(f"{where}: missing field 'prompt_templates.ar'")
        av_template = ""
        ar_template = map_placeholders(raw_ar, {"explanation": "explanation"}, "explanation", where,
                                       "prompt_templates.ar")
    mse_raw = (data.get("extraction") or {}).get("mse_scale", "sqrt_d_model")
    mse_scale = resolve_scale("sqrt_d_model" if mse_raw is None else mse_raw, d_model, where, "extraction.mse_scale")
    base = base_model or data.get("base_checkpoint") or data.get("base_model") or ""
    meta = BundleMeta(
        base_model=str(base), layer_index=layer, d_model=d_model,
        n_layers=config_layers(folder) if role == "av" else -1,
        injection=InjectionSettings("replace", scale, 1, 1.0), tokens=tokens,
        prompt_templates={"av": av_template, "ar": ar_template}, mse_scale=mse_scale,
        extra={"imported_from": {"layout": "paper", role: str(folder), "stage": data.get("stage")},
               "single_role": role},
    )
    return meta, suffix


def _check_suffix(tokenizer: Any, ar_template: str, suffix: list[int] | None, where: Path) -> None:
    """The AR reads the last token: the sidecar pins which ids end its input."""
    if not suffix:
        return
    ids = tokenizer.encode(ar_template.replace("{explanation}", "a probe explanation"), add_special_tokens=True)
    if list(ids[-len(suffix):]) != list(suffix):
        raise NLAError(f"{where}: field 'tokens.critic_suffix_ids' is {suffix} but the live tokenizer ends the AR "
                       f"input with {list(ids[-len(suffix):])}")


def load(path: str | Path, *, ar: str | Path | None = None, base_model: str | None = None,
         injection_scale: float | str | None = None, dtype: str | torch.dtype = "float32",
         device: str | None = None) -> NLAParts:
    """The parts of a paper checkpoint pair (either half, or a folder holding both)."""
    from nla.models.loading import load_model, load_tokenizer, parse_dtype, pick_device
    from nla.models.reconstructor import load_trunk

    av_dir, ar_dir = resolve_pair(Path(path), Path(ar) if ar is not None else None)
    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    if av_dir is None or ar_dir is None:
        # One role published (or at hand): it still verbalizes or reconstructs on its own.
        role, folder = ("av", av_dir) if ar_dir is None else ("ar", ar_dir)
        assert folder is not None
        meta, suffix = read_half_meta(folder, role, base_model, injection_scale)
        tokenizer = load_tokenizer(str(folder))
        if role == "av":
            model, _ = load_model(str(folder), dtype=torch_dtype, device=dev)
            return NLAParts(meta, tokenizer, dev, str(folder / META_NAME), av_model=model,
                            field_names=PAPER_TOKEN_FIELDS, role="av")
        _check_suffix(tokenizer, meta.prompt_templates["ar"], suffix, folder / META_NAME)
        head = load_linear(find_head_file(folder, "value_head.safetensors"), meta.d_model, meta.d_model)
        return NLAParts(meta, tokenizer, dev, str(folder / META_NAME),
                        trunk=load_trunk(str(folder), None, torch_dtype), head=head, role="ar")
    meta, suffix = read_meta(av_dir, ar_dir, base_model, injection_scale)
    tokenizer = load_tokenizer(str(av_dir))
    _check_suffix(tokenizer, meta.prompt_templates["ar"], suffix, ar_dir / META_NAME)
    av_model, _ = load_model(str(av_dir), dtype=torch_dtype, device=dev)
    trunk = load_trunk(str(ar_dir), None, torch_dtype)
    head = load_linear(find_head_file(ar_dir, "value_head.safetensors"), meta.d_model, meta.d_model)
    return NLAParts(meta, tokenizer, dev, str(av_dir / META_NAME), av_model=av_model, trunk=trunk, head=head,
                    field_names=PAPER_TOKEN_FIELDS)
