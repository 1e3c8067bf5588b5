"""Importers for the NLAs people publish, and the registry of released NLAs.

    from nla import NLA
    nla = NLA.from_pretrained("qwen2.5-7b-L20")          # a registry name (needs the hub)
    nla = NLA.from_pretrained("/data/nla-qwen2.5-7b-L20-av")   # a local folder, layout detected

One importer per publisher, each written from that publisher's own code: ``paper``
(kitft/natural_language_autoencoders), ``nanonla`` (ceselder/nanoNLA and forks), ``anicka``
(anicka-net/nla-at-home), ``solshine`` (SolshineCode/nla-gemma-4-e2b), ``universal``
(AlexWortega/qwen3-1p7b-nla), plus ``bundle`` (ours). See docs/interop.md.
"""

from nla.interop.registry import (
    LAYOUTS,
    LOADERS,
    Release,
    detect_layout,
    import_layout,
    load_release,
    releases,
)

__all__ = ["LAYOUTS", "LOADERS", "Release", "detect_layout", "import_layout", "load_release",
           "releases"]
