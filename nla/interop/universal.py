"""Cross-architecture universal NLAs: one AV/AR trunk, per-model linear maps (docs/design.md §9).

:class:`UniversalNLA` is the object (our bundle stores it as ``kind: nla_bundle`` with
``extra.universal: {d_shared, anchor, tags, models}`` and ``adapters/<tag>/{enc,dec}.safetensors``).

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
from typing import Any

import torch
from torch import nn

from nla.errors import NLAError
from nla.interop.common import (
    assemble,
    load_av,
    load_linear,
    map_placeholders,
    resolve_scale,
    sidecar,
)
from nla.meta import META_NAME, require

KIND = "nla_model_universal"
AR_KIND = "nla_ar_universal"
ADAPTERS = "adapters"
POOL_WEIGHTS = "adapters.safetensors"
POOL_META = "meta.json"
# train_ar_multi.py's CRITIC_TEMPLATE, used when a release ships no ar/nla_meta.yaml.
CRITIC_TEMPLATE = "Summary of the following text: <text>{z}</text> <summary>"


def identity_map(d: int) -> nn.Linear:
    layer = nn.Linear(d, d, bias=False, dtype=torch.float32)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(d))
    return layer


def save_map(layer: nn.Linear, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {"weight": layer.weight.detach().float().cpu().contiguous()}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def read_map(path: Path) -> nn.Linear:
    """A map whose shape comes from the file (its width is checked by the caller)."""
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice("weight").get_shape()
    except Exception as exc:
        raise NLAError(f"{path}: cannot read a 'weight' tensor ({str(exc).splitlines()[0]})") from None
    return load_linear(path, int(shape[1]), int(shape[0]))


# Older name, still imported by nla/universal/cli.py.
_read_map = read_map


class UniversalNLA:
    """A shared-trunk NLA plus ``enc_M``/``dec_M`` maps: verbalize and reconstruct in model M's space.

    ``verbalize(tag, h_M)`` injects ``enc_M(h_M)`` with the tag given to the AV as text;
    ``reconstruct(tag, texts)`` returns ``dec_M(AR(texts))`` in M's native space.
    """

    def __init__(self, nla: Any, anchor: str, maps: dict[str, tuple[nn.Linear, nn.Linear]],
                 models: dict[str, dict[str, Any]] | None = None):
        self.nla = nla
        self.anchor = anchor
        self.maps: dict[str, tuple[nn.Linear, nn.Linear]] = {}
        self.models = dict(models or {})
        for tag, (enc, dec) in maps.items():
            self.add_model(tag, enc, dec)
        if anchor not in self.maps:
            self.add_model(anchor, identity_map(self.d_shared), identity_map(self.d_shared))

    @property
    def d_shared(self) -> int:
        return int(self.nla.meta.d_model)

    @property
    def tags(self) -> list[str]:
        return list(self.maps)

    def add_model(self, tag: str, enc: nn.Linear, dec: nn.Linear, info: dict[str, Any] | None = None) -> None:
        """Register (or replace) model ``tag``'s maps; only these two change when a model is added."""
        if not tag or "/" in tag or tag.startswith("."):
            raise NLAError(f"invalid model tag {tag!r} (used as a folder name)")
        d = self.d_shared
        if enc.out_features != d or dec.in_features != d or enc.in_features != dec.out_features:
            raise NLAError(f"model {tag!r}: enc is {enc.in_features}→{enc.out_features} and dec is "
                           f"{dec.in_features}→{dec.out_features}; expected d_M→{d} and {d}→d_M")
        self.maps[tag] = (enc.float().eval(), dec.float().eval())
        if info is not None:
            self.models[tag] = dict(info)

    def _maps(self, tag: str) -> tuple[nn.Linear, nn.Linear]:
        if tag not in self.maps:
            raise NLAError(f"unknown model tag {tag!r}; this bundle has {', '.join(self.maps)}")
        return self.maps[tag]

    @torch.no_grad()
    def encode(self, tag: str, vectors: torch.Tensor) -> torch.Tensor:
        enc, _ = self._maps(tag)
        vectors = torch.as_tensor(vectors).float()
        if vectors.ndim == 1:
            vectors = vectors.unsqueeze(0)
        if vectors.shape[-1] != enc.in_features:
            raise NLAError(f"model {tag!r} has width {enc.in_features}, got vectors of width {vectors.shape[-1]}")
        return enc.to(vectors.device)(vectors)

    @torch.no_grad()
    def decode(self, tag: str, shared: torch.Tensor) -> torch.Tensor:
        _, dec = self._maps(tag)
        shared = torch.as_tensor(shared).float()
        return dec.to(shared.device)(shared)

    def verbalize(self, tag: str, vectors: torch.Tensor, n: int = 1, **generate_kwargs: Any) -> list[list[Any]]:
        shared = self.encode(tag, vectors)
        return self.nla.verbalizer.generate(shared, n=n, tags=[tag] * len(shared), **generate_kwargs)

    def reconstruct(self, tag: str, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        return self.decode(tag, self.nla.reconstruct(list(texts), batch_size=batch_size))

    def round_trip(self, tag: str, vectors: torch.Tensor, **generate_kwargs: Any) -> tuple[list[str | None], torch.Tensor]:
        """``dec_M(AR(AV(enc_M(h_M))))``: explanations and reconstructions in M's space."""
        answers = [outs[0] for outs in self.verbalize(tag, vectors, n=1, **generate_kwargs)]
        texts = [a.explanation if a.explanation is not None else a.raw for a in answers]
        return [a.explanation for a in answers], self.reconstruct(tag, texts)

    # ---------------------------------------------------------------- files
    def save_pretrained(self, path: str | Path) -> None:
        """Our bundle + ``adapters/<tag>/{enc,dec}.safetensors`` + ``extra.universal``."""
        root = Path(path)
        self.nla.meta.extra["universal"] = {"d_shared": self.d_shared, "anchor": self.anchor, "tags": self.tags,
                                            "models": self.models}
        self.nla.save_pretrained(root)
        for tag, (enc, dec) in self.maps.items():
            save_map(enc, root / ADAPTERS / tag / "enc.safetensors")
            save_map(dec, root / ADAPTERS / tag / "dec.safetensors")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str | torch.dtype = "float32",
                        device: str | None = None) -> UniversalNLA:
        """Our universal bundle, or AlexWortega's published ``nla_model_universal`` layout."""
        root = Path(path)
        data = sidecar(root)
        if data.get("kind") == KIND:
            return load(root, dtype=dtype, device=device)
        from nla.bundle import NLA

        where = root / META_NAME
        info = require(data, "extra.universal", where, dict)
        nla = NLA.from_pretrained(root, dtype=dtype, device=device)
        tags = require(data, "extra.universal.tags", where, list)
        anchor = require(data, "extra.universal.anchor", where, str)
        return cls(nla, anchor, read_maps(root, tags, anchor, nla.meta.d_model, where), info.get("models") or {})


def read_maps(root: Path, tags: list[Any], anchor: str, d_shared: int, where: Path) -> dict[str, tuple[nn.Linear, nn.Linear]]:
    maps: dict[str, tuple[nn.Linear, nn.Linear]] = {}
    for tag in tags:
        if not isinstance(tag, str):
            raise NLAError(f"{where}: field 'tags' has invalid entry {tag!r}")
        folder = root / ADAPTERS / tag
        enc_file, dec_file = folder / "enc.safetensors", folder / "dec.safetensors"
        if not enc_file.exists() and not dec_file.exists() and tag == anchor:
            continue  # the anchor's space is the shared space
        for f in (enc_file, dec_file):
            if not f.exists():
                raise NLAError(f"{where}: field 'tags' lists {tag!r} but {f.relative_to(root)} is missing")
        enc, dec = read_map(enc_file), read_map(dec_file)
        if enc.out_features != d_shared or dec.in_features != d_shared or enc.in_features != dec.out_features:
            raise NLAError(f"{folder}: enc is {enc.in_features}→{enc.out_features}, dec {dec.in_features}→"
                           f"{dec.out_features}; expected d_M→{d_shared} and {d_shared}→d_M (field 'd_shared')")
        maps[tag] = (enc, dec)
    return maps


def read_pool(folder: Path, d_shared: int, where: Path) -> tuple[dict[str, tuple[nn.Linear, nn.Linear]], dict[str, int]]:
    """``ModelPoolAdapters`` files → ``{tag: (enc, dec)}`` and ``{tag: d_M}``."""
    import json

    from nla.interop.common import linear_from, read_tensors

    meta_path, weights = folder / POOL_META, folder / POOL_WEIGHTS
    for f in (meta_path, weights):
        if not f.exists():
            raise NLAError(f"{where}: missing {f.relative_to(folder.parent)}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise NLAError(f"{meta_path}: malformed JSON ({str(exc).splitlines()[0]})") from None
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
         dtype: str | torch.dtype = "float32", device: str | None = None) -> UniversalNLA:
    """A :class:`UniversalNLA` from AlexWortega's published universal layout."""
    import math

    from nla.bundle import BundleMeta
    from nla.interop.common import (
        PAPER_TOKEN_FIELDS,
        adapter_scaling,
        adapter_tensors,
        check_equal,
        identity_head,
        is_adapter_dir,
        merged_trunk,
    )
    from nla.models.injection import MarkerTokens
    from nla.models.layers import num_layers
    from nla.models.loading import canonical_spec, load_tokenizer, parse_dtype, pick_device
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
    nla = assemble(meta, av_model, trunk, tokenizer, identity_head(d_shared), dev, str(where),
                   field_names=PAPER_TOKEN_FIELDS)
    models = {tag: {"d_model": d_m, "trained": tag in (data.get("training_tags") or [])} for tag, d_m in dims.items()}
    return UniversalNLA(nla, anchor, maps, models)
