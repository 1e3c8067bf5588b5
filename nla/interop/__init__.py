"""Importers for the NLAs people publish, and the registry of released NLAs.

    from nla import NLA
    nla = NLA.from_pretrained("qwen2.5-7b-L20")          # a registry name (needs the hub)
    nla = NLA.from_pretrained("/data/nla-qwen2.5-7b-L20-av")   # a local folder, layout detected

One importer per publisher, each written from that publisher's own code: ``paper``
(kitft/natural_language_autoencoders), ``nanonla`` (ceselder/nanoNLA and forks), ``anicka``
(anicka-net/nla-at-home), ``solshine`` (SolshineCode/nla-gemma-4-e2b), ``universal``
(AlexWortega/qwen3-1p7b-nla), plus ``bundle`` (ours) and ``single`` (a half bundle). Each
returns parts (:mod:`nla.parts`); :mod:`nla.interop.registry` maps layout names to them and
:mod:`nla.interop.load` builds the objects. See docs/interop.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nla.interop.load import import_layout, load_release
    from nla.interop.registry import LAYOUTS, LOADERS, Release, detect_layout, load_parts, releases

__all__ = ["LAYOUTS", "LOADERS", "Release", "detect_layout", "import_layout", "load_parts", "load_release",
           "releases"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing one importer module (``nla.interop.common`` from
    # ``nla.universal.bundle``, say) does not first load the whole loader table and with it
    # modules that are still half-initialised further up the import.
    if name in ("import_layout", "load_release"):
        from nla.interop import load

        return getattr(load, name)
    if name in __all__:
        from nla.interop import registry

        return getattr(registry, name)
    raise AttributeError(name)
