"""The universal bundle: one AV/AR trunk plus per-model linear maps (docs/design.md §9).

:class:`UniversalNLA` is our bundle (``kind: nla_bundle``) with ``extra.universal: {d_shared,
anchor, tags, models}`` in its sidecar and ``adapters/<tag>/{enc,dec}.safetensors`` beside it.
``from_pretrained`` reads our bundle through :func:`nla.universal.maps.read_universal` and
AlexWortega's published layout through its importer (:mod:`nla.interop.universal`); both
return parts and never build this class themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nla.bundle import NLA
from nla.errors import NLAError
from nla.interop.common import sidecar
from nla.interop.universal import KIND as PUBLISHED_KIND
from nla.interop.universal import load as load_published
from nla.models.reconstructor import identity_head
from nla.names import ADAPTERS_DIR as ADAPTERS
from nla.parts import UniversalParts
from nla.universal.maps import DEC_FILE, ENC_FILE, read_map, read_universal, save_map

# read_map / save_map are re-exported for the universal stage (nla.universal.cli).
__all__ = ["ADAPTERS", "UniversalNLA", "read_map", "save_map"]


class UniversalNLA:
    """A shared-trunk NLA plus ``enc_M``/``dec_M`` maps: verbalize and reconstruct in model M's space.

    ``verbalize(tag, h_M)`` injects ``enc_M(h_M)`` with the tag given to the AV as text;
    ``reconstruct(tag, texts)`` returns ``dec_M(AR(texts))`` in M's native space.
    """

    @classmethod
    def from_parts(cls, parts: UniversalParts) -> UniversalNLA:
        """The object from a loader's parts (:func:`nla.interop.universal.load`,
        :func:`nla.universal.maps.read_universal`): the trunk built by ``NLA.from_parts``."""
        return cls(NLA.from_parts(parts.trunk), parts.anchor, parts.maps, parts.models)

    def __init__(self, nla: Any, anchor: str, maps: dict[str, tuple[nn.Linear, nn.Linear]],
                 models: dict[str, dict[str, Any]] | None = None):
        self.nla = nla
        self.anchor = anchor
        self.maps: dict[str, tuple[nn.Linear, nn.Linear]] = {}
        self.models = dict(models or {})
        for tag, (enc, dec) in maps.items():
            self.add_model(tag, enc, dec)
        if anchor not in self.maps:
            self.add_model(anchor, identity_head(self.d_shared), identity_head(self.d_shared))

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
            save_map(enc, root / ADAPTERS / tag / ENC_FILE)
            save_map(dec, root / ADAPTERS / tag / DEC_FILE)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str | torch.dtype = "float32",
                        device: str | None = None) -> UniversalNLA:
        """Our universal bundle, or AlexWortega's published ``nla_model_universal`` layout."""
        root = Path(path)
        if sidecar(root).get("kind") == PUBLISHED_KIND:
            return cls.from_parts(load_published(root, dtype=dtype, device=device))
        return cls.from_parts(read_universal(root, dtype=dtype, device=device))
