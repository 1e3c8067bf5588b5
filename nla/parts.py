"""What a loader hands to ``NLA.from_parts``: the bundle sidecar and the loaded halves (docs/design.md §7).

Every layout (ours and each publisher's, :mod:`nla.interop`) is read into the same parts, and
the one class that builds an NLA from them is :class:`nla.bundle.NLA`. This module sits below
both: it imports neither, so importers never build an ``NLA`` themselves and ``nla.bundle``
imports the loader table one way only.

* :class:`BundleMeta` — the ``nla_meta.yaml`` of our bundle as a dataclass (re-exported by
  :mod:`nla.bundle`); every importer converts its publisher's sidecar into one.
* :class:`NLAParts` — meta + tokenizer + the loaded AV model, AR trunk and value head.
* :class:`UniversalParts` — a shared-trunk NLA's parts plus per-model maps (§9).
* :func:`read_bundle` — our own bundle folder read as parts.
* :func:`check_tokens`, :func:`apply_prompt_format` — what every load does to the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nla.errors import NLAError
from nla.meta import META_NAME, read_yaml, require
from nla.models.injection import MarkerTokens
from nla.models.prompts import encode_rendered, render_chat, user_content
from nla.models.verbalizer import InjectionSettings
from nla.names import BUNDLE_KIND, BUNDLE_SCHEMA_VERSION, MEAN_VECTOR_FILE, VALUE_HEAD_FILE


@dataclass
class BundleMeta:
    base_model: str
    layer_index: int
    d_model: int
    n_layers: int
    injection: InjectionSettings
    tokens: MarkerTokens
    prompt_templates: dict[str, str]
    mse_scale: float
    dataset: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    av_format: str = "full"
    ar_format: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from nla.names import VERSION as __version__

        return {
            "kind": BUNDLE_KIND,
            "schema_version": BUNDLE_SCHEMA_VERSION,
            "base_model": self.base_model,
            "layer_index": self.layer_index,
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "injection": self.injection.to_dict(),
            "tokens": self.tokens.to_dict(),
            "prompt_templates": dict(self.prompt_templates),
            "mse_scale": self.mse_scale,
            "dataset": self.dataset,
            "training": self.training,
            "av": {"format": self.av_format},
            "ar": {"format": self.ar_format},
            "extra": self.extra,
            "nla_version": __version__,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path) -> BundleMeta:
        kind = require(data, "kind", where, str)
        if kind != BUNDLE_KIND:
            raise NLAError(f"{where}: field 'kind' is {kind!r}, expected {BUNDLE_KIND!r} (use `nla import` for other layouts)")
        version = require(data, "schema_version", where, int)
        if version != BUNDLE_SCHEMA_VERSION:
            raise NLAError(f"{where}: unknown schema_version {version} (this nla reads {BUNDLE_SCHEMA_VERSION})")
        inj = require(data, "injection", where, dict)
        mode = require(data, "injection.mode", where, str)
        if mode not in ("replace", "add"):
            raise NLAError(f"{where}: field 'injection.mode' has invalid value {mode!r}")
        tokens = MarkerTokens(
            require(data, "tokens.marker", where, str),
            require(data, "tokens.marker_id", where, int),
            require(data, "tokens.left_id", where, int),
            require(data, "tokens.right_id", where, int),
        )
        templates = require(data, "prompt_templates", where, dict)
        for key in ("av", "ar"):
            require(data, f"prompt_templates.{key}", where, str)
        return cls(
            base_model=require(data, "base_model", where, str),
            layer_index=require(data, "layer_index", where, int),
            d_model=require(data, "d_model", where, int),
            n_layers=require(data, "n_layers", where, int),
            injection=InjectionSettings(
                mode=mode,
                scale=float(require(data, "injection.scale", where, (int, float), positive=True)),
                layer=int(inj.get("layer", 1)),
                coef=float(inj.get("coef", 1.0)),
            ),
            tokens=tokens,
            prompt_templates={"av": templates["av"], "ar": templates["ar"]},
            mse_scale=float(data.get("mse_scale", require(data, "d_model", where, int) ** 0.5)),
            dataset=data.get("dataset") or {},
            training=data.get("training") or {},
            av_format=(data.get("av") or {}).get("format", "full"),
            ar_format=(data.get("ar") or {}).get("format", "full"),
            extra=data.get("extra") or {},
        )


@dataclass
class NLAParts:
    """Everything ``NLA.from_parts`` needs, loaded but not yet checked against each other.

    A pair has ``av_model``, ``trunk`` and ``head``; a single-role half (``role`` "av" or
    "ar") has only its own. ``where`` is the file errors name; ``field_names`` maps our token
    field names to the layout's spellings, so a marker error names the field as the user's
    own file spells it.
    """

    meta: BundleMeta
    tokenizer: Any
    device: torch.device
    where: str
    av_model: Any = None
    trunk: Any = None
    head: nn.Linear | None = None
    mean_vector: torch.Tensor | None = None
    field_names: dict[str, str] = field(default_factory=dict)
    role: str | None = None
    is_trainable: bool = False
    # Our bundles hold the AV and AR base weights once (nla.models.sharing); imported pairs,
    # whose AR trunks are merged copies, were never shared and keep that.
    share_base: bool = False


@dataclass
class UniversalParts:
    """A universal NLA's parts (docs/design.md §9): the shared trunk's parts, the anchor tag,
    per-model ``(enc, dec)`` maps and per-model notes."""

    trunk: NLAParts
    anchor: str
    maps: dict[str, tuple[nn.Linear, nn.Linear]]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


def check_tokens(tokenizer: Any, tokens: MarkerTokens, av_template: str, where: str,
                 field_names: dict[str, str] | None = None) -> None:
    """The sidecar's marker ids must be what the live tokenizer produces (docs/design.md §4).

    ``field_names`` (ours → theirs) renames the fields in the error for an imported sidecar.
    """
    try:
        ids = tokenizer.encode(tokens.marker, add_special_tokens=False)
        if list(ids) != [tokens.marker_id]:
            raise NLAError(f"{where}: field 'tokens.marker_id' is {tokens.marker_id} but the tokenizer encodes "
                           f"{tokens.marker!r} as {list(ids)}")
        prompt = encode_rendered(tokenizer, render_chat(tokenizer, user_content(av_template, tokens.marker)))
        hits = [i for i, t in enumerate(prompt) if t == tokens.marker_id]
        if len(hits) != 1:
            raise NLAError(f"{where}: the AV prompt holds the marker {len(hits)} times, expected once")
        p = hits[0]
        if prompt[p - 1] != tokens.left_id:
            raise NLAError(f"{where}: field 'tokens.left_id' is {tokens.left_id}, the live tokenizer gives {prompt[p - 1]}")
        if prompt[p + 1] != tokens.right_id:
            raise NLAError(f"{where}: field 'tokens.right_id' is {tokens.right_id}, the live tokenizer gives "
                           f"{prompt[p + 1]}")
    except NLAError as exc:
        if not field_names:
            raise
        message = str(exc)
        for ours, theirs in field_names.items():
            message = message.replace(f"'{ours}'", f"'{theirs}'")
        raise NLAError(message) from None


def apply_prompt_format(tokenizer: Any, meta: BundleMeta) -> None:
    """An imported AV trained on a raw prompt (no chat turn) keeps its recorded template.

    ``extra.av_chat_template`` is a Jinja chat template written by the importer (e.g. BOS +
    the user text as is, docs/interop.md); the verbalizer renders prompts through it.
    """
    template = meta.extra.get("av_chat_template")
    if isinstance(template, str):
        tokenizer.chat_template = template


def read_bundle(path: str | Path, *, dtype: str | torch.dtype = "float32", device: str | None = None,
                is_trainable: bool = False) -> NLAParts:
    """Our bundle folder (``kind: nla_bundle``) as parts: sidecar, tokenizer, AV, AR trunk, head, μ."""
    from safetensors.torch import load_file

    from nla.models.loading import (
        load_model,
        load_tokenizer,
        parse_dtype,
        pick_device,
        resolve_model_path,
    )
    from nla.models.reconstructor import load_trunk

    root = Path(path)
    meta_path = root / META_NAME
    meta = BundleMeta.from_dict(read_yaml(meta_path), meta_path)
    dev = pick_device(device)
    torch_dtype = parse_dtype(dtype)
    tokenizer = load_tokenizer(meta.base_model) if meta.av_format == "peft" or not (root / "av" / "tokenizer_config.json").exists() \
        else load_tokenizer(str(root / "av"))
    # Checked here too (NLA.from_parts checks again): a wrong marker fails before any weights load.
    apply_prompt_format(tokenizer, meta)
    check_tokens(tokenizer, meta.tokens, meta.prompt_templates["av"], str(meta_path))
    av_dir, ar_dir = root / "av", root / "ar"
    for sub in (av_dir, ar_dir):
        if not sub.is_dir():
            raise NLAError(f"{root}: missing folder {sub.name}/")
    if (av_dir / "adapter_config.json").exists():
        from peft import PeftModel

        base, _ = load_model(meta.base_model, dtype=torch_dtype, device=dev)
        av_model = PeftModel.from_pretrained(base, str(av_dir), is_trainable=is_trainable)
    else:
        av_model, _ = load_model(str(av_dir), dtype=torch_dtype, device=dev)
    if (ar_dir / "adapter_config.json").exists():
        from peft import PeftModel

        trunk = load_trunk(resolve_model_path(meta.base_model), meta.layer_index, torch_dtype)
        trunk = PeftModel.from_pretrained(trunk, str(ar_dir), is_trainable=is_trainable)
    else:
        trunk = load_trunk(str(ar_dir), None, torch_dtype)
    head_file = ar_dir / VALUE_HEAD_FILE
    if not head_file.exists():
        raise NLAError(f"{ar_dir}: missing {VALUE_HEAD_FILE}")
    # Kept apart from the trunk: PEFT knows nothing of the value head.
    tensors = load_file(str(head_file))
    if "weight" not in tensors or tuple(tensors["weight"].shape) != (meta.d_model, meta.d_model):
        raise NLAError(f"{head_file}: expected a 'weight' of shape [{meta.d_model}, {meta.d_model}]")
    # Imported heads may carry a bias (published `linear_head.pt` layouts).
    head = nn.Linear(meta.d_model, meta.d_model, bias="bias" in tensors, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"].float())
        if head.bias is not None:
            head.bias.copy_(tensors["bias"].float())
    mean = load_file(str(root / MEAN_VECTOR_FILE))["mean"].float() if (root / MEAN_VECTOR_FILE).exists() else None
    return NLAParts(meta, tokenizer, dev, str(meta_path), av_model=av_model, trunk=trunk, head=head,
                    mean_vector=mean, is_trainable=is_trainable, share_base=True)
