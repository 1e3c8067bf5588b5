"""The paper's released checkpoints (e.g. ``kitft/nla-qwen2.5-7b-L20-av`` / ``-ar``).

Each of the pair is a full Hugging Face model folder with its own ``nla_meta.yaml``::

    kind: nla_model
    schema_version: 2
    role: av | ar                       # optional in older files
    d_model: 3584
    extraction_layer_index: 20          # K = output of decoder block K (AR: also critic.extraction_layer_index)
    extraction: {injection_scale: 150.0 | sqrt_d_model, mse_scale: 59.87 | sqrt_d_model}
    tokens: {injection_char, injection_token_id, injection_left_neighbor_id,
             injection_right_neighbor_id, critic_suffix_ids (optional)}
    prompt_templates: {av: "...{injection_char}...", ar: "...{explanation}..."}
                      # older files: actor / critic

Inference recipe (what the import must reproduce): the AV prompt is the ``av`` template
formatted with the injection char, rendered through the chat template with a generation
prompt; the embedding at the (id + both neighbours) marker is replaced by ``v * s / ||v||``.
The AR folder is the base model cut to ``K + 1`` blocks with no final norm; its input is the
``ar`` template formatted with the explanation, tokenized with special tokens, read at the last
token and passed through ``value_head.safetensors`` (``Linear(d, d)``, no bias).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nla.errors import NLAError
from nla.interop.common import (
    assemble,
    check_equal,
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

KIND = "nla_model"
SCHEMA_VERSION = 2
FIELD_NAMES = {"tokens.marker_id": "tokens.injection_token_id", "tokens.left_id": "tokens.injection_left_neighbor_id",
               "tokens.right_id": "tokens.injection_right_neighbor_id"}


def _role(root: Path, data: dict[str, Any]) -> str:
    role = data.get("role")
    if role is not None:
        if role not in ("av", "ar"):
            raise NLAError(f"{root / META_NAME}: field 'role' has invalid value {role!r} (expected av or ar)")
        return str(role)
    # Older sidecars have no role: the AR is the folder that carries a value head.
    return "ar" if (root / "value_head.safetensors").exists() else "av"


def is_paper_dir(root: Path) -> bool:
    if not (root / META_NAME).exists():
        return False
    try:
        return sidecar(root).get("kind") == KIND
    except NLAError:
        return False


def resolve_pair(path: Path, ar: Path | None = None) -> tuple[Path, Path]:
    """``(av_dir, ar_dir)`` from a pair folder (``av/`` + ``ar/``), or one half and its sibling."""
    if ar is not None:
        return path, ar
    if is_paper_dir(path / "av") and is_paper_dir(path / "ar"):
        return path / "av", path / "ar"
    role = _role(path, sidecar(path))
    name = path.name
    other_role = "ar" if role == "av" else "av"
    candidates = []
    for suffix_from, suffix_to in ((f"-{role}", f"-{other_role}"), (f"_{role}", f"_{other_role}")):
        if name.endswith(suffix_from):
            candidates.append(path.with_name(name[: -len(suffix_from)] + suffix_to))
    if name == role:
        candidates.append(path.with_name(other_role))
    for cand in candidates:
        if is_paper_dir(cand):
            return (path, cand) if role == "av" else (cand, path)
    raise NLAError(f"{path}: this is the {role.upper()} half of a paper checkpoint pair; pass the "
                   f"{other_role.upper()} folder too (ar=... / --ar DIR), or put both as av/ and ar/ in one folder")


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
    version = require(data, "schema_version", where, int)
    if version != SCHEMA_VERSION:
        raise NLAError(f"{where}: field 'schema_version' is {version}, this importer reads {SCHEMA_VERSION}")


def read_meta(av_dir: Path, ar_dir: Path, base_model: str | None = None) -> tuple[Any, list[int] | None]:
    """The pair's two sidecars merged into our :class:`BundleMeta` (every conflict named)."""
    from nla.bundle import BundleMeta

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
    critic: dict[str, Any] = ar["critic"] if isinstance(ar.get("critic"), dict) else {}
    layer = check_equal({
        "extraction_layer_index (AV)": av.get("extraction_layer_index"),
        "extraction_layer_index (AR)": ar.get("extraction_layer_index"),
        "critic.extraction_layer_index": critic.get("extraction_layer_index"),
    }, ar_where)
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise NLAError(f"{ar_where}: field 'critic.extraction_layer_index' has invalid value {layer!r}")
    # The AR is the base cut after block K: K + 1 blocks. Anything else is an off-by-one
    # between the two halves (hidden_states[K] vs block K), which reconstructs the wrong layer.
    ar_layers = config_layers(ar_dir)
    if ar_layers != layer + 1:
        raise NLAError(f"{ar_where}: field 'critic.extraction_layer_index' is {layer} but the AR config has "
                       f"num_hidden_layers={ar_layers} (expected {layer + 1})")
    scale = resolve_scale(require(av, "extraction.injection_scale", av_where), d_model, av_where,
                          "extraction.injection_scale")
    mse_raw = (av.get("extraction") or {}).get("mse_scale", (ar.get("extraction") or {}).get("mse_scale", "sqrt_d_model"))
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
    base = base_model or av.get("base_model") or ar.get("base_model") or str(av_dir.resolve())
    meta = BundleMeta(
        base_model=str(base),
        layer_index=layer,
        d_model=d_model,
        n_layers=config_layers(av_dir),
        injection=InjectionSettings("replace", scale, 1, 1.0),
        tokens=tokens,
        prompt_templates={"av": av_template, "ar": ar_template},
        mse_scale=mse_scale,
        extra={"imported_from": {"layout": "paper", "av": str(av_dir), "ar": str(ar_dir)}},
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
         dtype: str | torch.dtype = "float32", device: str | None = None) -> Any:
    """An :class:`NLA` from a paper checkpoint pair (either half, or a folder holding both)."""
    from nla.models.loading import load_model, load_tokenizer, parse_dtype, pick_device
    from nla.models.reconstructor import load_trunk

    av_dir, ar_dir = resolve_pair(Path(path), Path(ar) if ar is not None else None)
    meta, suffix = read_meta(av_dir, ar_dir, base_model)
    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    tokenizer = load_tokenizer(str(av_dir))
    _check_suffix(tokenizer, meta.prompt_templates["ar"], suffix, ar_dir / META_NAME)
    av_model, _ = load_model(str(av_dir), dtype=torch_dtype, device=dev)
    trunk = load_trunk(str(ar_dir), None, torch_dtype)
    head = load_linear(find_head_file(ar_dir, "value_head.safetensors"), meta.d_model, meta.d_model)
    return assemble(meta, av_model, trunk, tokenizer, head, dev, str(av_dir / META_NAME), field_names=FIELD_NAMES)
