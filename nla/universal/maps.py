"""A universal bundle's per-model maps on disk, and the bundle read as parts (docs/design.md §9).

``adapters/<tag>/{enc,dec}.safetensors`` beside our bundle, listed in ``extra.universal`` of
its sidecar. Kept apart from :class:`nla.universal.bundle.UniversalNLA` so that the loader
table (:mod:`nla.interop.registry`) can read a universal bundle as parts without importing the
class that builds from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nla.errors import NLAError
from nla.interop.common import load_linear, sidecar
from nla.meta import META_NAME, require
from nla.names import ADAPTERS_DIR as ADAPTERS
from nla.parts import UniversalParts, read_bundle

ENC_FILE = "enc.safetensors"
DEC_FILE = "dec.safetensors"


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


def read_maps(root: Path, tags: list[Any], anchor: str, d_shared: int, where: Path) -> dict[str, tuple[nn.Linear, nn.Linear]]:
    maps: dict[str, tuple[nn.Linear, nn.Linear]] = {}
    for tag in tags:
        if not isinstance(tag, str):
            raise NLAError(f"{where}: field 'tags' has invalid entry {tag!r}")
        folder = root / ADAPTERS / tag
        enc_file, dec_file = folder / ENC_FILE, folder / DEC_FILE
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


def read_universal(path: str | Path, *, dtype: str | torch.dtype = "float32", device: str | None = None
                   ) -> UniversalParts:
    """Our universal bundle as parts: the trunk bundle's, the anchor, the maps, per-model notes."""
    root = Path(path)
    data = sidecar(root)
    where = root / META_NAME
    info = require(data, "extra.universal", where, dict)
    trunk = read_bundle(root, dtype=dtype, device=device)
    tags = require(data, "extra.universal.tags", where, list)
    anchor = require(data, "extra.universal.anchor", where, str)
    maps = read_maps(root, tags, anchor, trunk.meta.d_model, where)
    return UniversalParts(trunk, anchor, maps, info.get("models") or {})
