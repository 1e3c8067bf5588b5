"""Cross-architecture universal bundles: one AV/AR trunk, per-model linear maps (docs/design.md §9).

Published layout (see docs/interop.md)::

    ROOT/
      nla_meta.yaml            kind: nla_universal (below)
      av/                      PEFT adapter on the trunk model, or a full model folder
      ar/                      same, plus value_head.safetensors
      adapters/<tag>/enc.safetensors   ``weight`` [d_shared, d_M] (+ optional ``bias`` [d_shared])
      adapters/<tag>/dec.safetensors   ``weight`` [d_M, d_shared] (+ optional ``bias`` [d_M])

``nla_meta.yaml``::

    kind: nla_universal
    schema_version: 1
    trunk: Qwen/Qwen3-8B       # the shared AV/AR's base model
    d_shared: 4096             # = the trunk's width
    layer_index: 24            # K of the trunk (the AR is cut after block K)
    anchor: qwen3-8b           # its adapters may be absent (identity)
    tags: [qwen3-8b, llama3-8b, gemma2-9b]
    models: {llama3-8b: {model: meta-llama/Llama-3.1-8B, layer: 16, d_model: 4096}, ...}   # optional
    injection: {mode: replace, scale: sqrt_d_model}      # optional (default replace, √d_shared)
    tokens: {marker | injection_char, marker_id | injection_token_id, left_id, right_id}
    prompt_templates: {av: "...{tag}...{marker}...", ar: "...{explanation}..."}
                      # {model_tag} / {injection_char} are accepted spellings

Our own bundle stores the same thing as a ``kind: nla_bundle`` sidecar with
``extra.universal: {d_shared, anchor, tags, models}`` plus the same ``adapters/`` folder;
:class:`UniversalNLA` reads and writes that, and the universal-adapters stage builds on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nla.errors import NLAError
from nla.interop.common import (
    assemble,
    find_head_file,
    load_ar_trunk,
    load_av,
    load_linear,
    map_placeholders,
    resolve_scale,
    sidecar,
)
from nla.meta import META_NAME, require

KIND = "nla_universal"
SCHEMA_VERSION = 1
ADAPTERS = "adapters"


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


def _read_map(path: Path) -> nn.Linear:
    """A map whose shape comes from the file (its width is checked by the caller)."""
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shape = f.get_slice("weight").get_shape()
    except Exception as exc:
        raise NLAError(f"{path}: cannot read a 'weight' tensor ({str(exc).splitlines()[0]})") from None
    return load_linear(path, int(shape[1]), int(shape[0]))


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
        """Our universal bundle or the published ``nla_universal`` layout."""
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
        enc, dec = _read_map(enc_file), _read_map(dec_file)
        if enc.out_features != d_shared or dec.in_features != d_shared or enc.in_features != dec.out_features:
            raise NLAError(f"{folder}: enc is {enc.in_features}→{enc.out_features}, dec {dec.in_features}→"
                           f"{dec.out_features}; expected d_M→{d_shared} and {d_shared}→d_M (field 'd_shared')")
        maps[tag] = (enc, dec)
    return maps


def load(path: str | Path, *, dtype: str | torch.dtype = "float32", device: str | None = None) -> UniversalNLA:
    """A :class:`UniversalNLA` from the published ``nla_universal`` layout."""
    from nla.bundle import BundleMeta
    from nla.models.injection import MarkerTokens
    from nla.models.layers import num_layers
    from nla.models.loading import (
        canonical_spec,
        load_tokenizer,
        parse_dtype,
        pick_device,
        resolve_model_path,
    )
    from nla.models.verbalizer import InjectionSettings

    root = Path(path)
    where = root / META_NAME
    data = sidecar(root)
    kind = require(data, "kind", where, str)
    if kind != KIND:
        raise NLAError(f"{where}: field 'kind' is {kind!r}, expected {KIND!r}")
    version = require(data, "schema_version", where, int)
    if version != SCHEMA_VERSION:
        raise NLAError(f"{where}: field 'schema_version' is {version}, this importer reads {SCHEMA_VERSION}")
    trunk_spec = canonical_spec(require(data, "trunk", where, str))
    d_shared = require(data, "d_shared", where, int)
    layer = require(data, "layer_index", where, int)
    anchor = require(data, "anchor", where, str)
    tags = require(data, "tags", where, list)
    if anchor not in tags:
        raise NLAError(f"{where}: contradictory fields: 'anchor' {anchor!r} is not in 'tags' {tags}")
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise NLAError(f"{where}: field 'models' has invalid value {models!r}")
    inj = data.get("injection") or {}
    mode = inj.get("mode", "replace")
    if mode not in ("replace", "add"):
        raise NLAError(f"{where}: field 'injection.mode' has invalid value {mode!r}")
    scale = resolve_scale(inj.get("scale", "sqrt_d_model"), d_shared, where, "injection.scale")
    tok = require(data, "tokens", where, dict)

    def pick(ours: str, theirs: str) -> Any:
        if ours in tok and theirs in tok and tok[ours] != tok[theirs]:
            raise NLAError(f"{where}: contradictory fields: tokens.{ours} and tokens.{theirs} differ")
        return require(data, f"tokens.{ours}" if ours in tok else f"tokens.{theirs}", where,
                       str if ours == "marker" else int)

    tokens = MarkerTokens(pick("marker", "injection_char"), pick("marker_id", "injection_token_id"),
                          pick("left_id", "injection_left_neighbor_id"), pick("right_id", "injection_right_neighbor_id"))
    av_template = map_placeholders(require(data, "prompt_templates.av", where, str),
                                   {"marker": "marker", "injection_char": "marker", "tag": "tag", "model_tag": "tag"},
                                   "marker", where, "prompt_templates.av")
    ar_template = map_placeholders(require(data, "prompt_templates.ar", where, str), {"explanation": "explanation"},
                                   "explanation", where, "prompt_templates.ar")
    from transformers import AutoConfig

    n_layers = num_layers(AutoConfig.from_pretrained(resolve_model_path(trunk_spec), trust_remote_code=False))
    if not 0 <= layer < n_layers:
        raise NLAError(f"{where}: field 'layer_index' is {layer}, the trunk has blocks 0..{n_layers - 1}")
    meta = BundleMeta(
        base_model=trunk_spec, layer_index=layer, d_model=d_shared, n_layers=n_layers,
        injection=InjectionSettings(mode, scale, int(inj.get("layer", 1)), float(inj.get("coef", 1.0))),
        tokens=tokens, prompt_templates={"av": av_template, "ar": ar_template}, mse_scale=float(d_shared) ** 0.5,
        extra={"imported_from": {"layout": "universal", "path": str(root)}},
    )
    av_dir, ar_dir = root / "av", root / "ar"
    for sub in (av_dir, ar_dir):
        if not sub.is_dir():
            raise NLAError(f"{root}: missing folder {sub.name}/")
    meta.av_format = "peft" if (av_dir / "adapter_config.json").exists() else "full"
    meta.ar_format = "peft" if (ar_dir / "adapter_config.json").exists() else "full"
    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    tokenizer = load_tokenizer(trunk_spec if meta.av_format == "peft" else str(av_dir))
    av_model = load_av(av_dir, trunk_spec, torch_dtype, dev)
    trunk = load_ar_trunk(ar_dir, trunk_spec, layer, torch_dtype)
    head = load_linear(find_head_file(ar_dir, "value_head.safetensors"), d_shared, d_shared)
    nla = assemble(meta, av_model, trunk, tokenizer, head, dev, str(where))
    return UniversalNLA(nla, anchor, read_maps(root, tags, anchor, d_shared, where), models)
