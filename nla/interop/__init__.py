"""Importers for published NLA layouts, and the registry of released NLAs.

    from nla import NLA
    nla = NLA.from_pretrained("qwen2.5-7b-L20")          # a registry name (needs the hub)
    nla = NLA.from_pretrained("/data/nla-qwen2.5-7b-L20-av")   # a local folder, layout detected

Layouts: ``paper`` (the paper's AV/AR checkpoints), ``nanonla`` (merged weights, additive
injection), ``peft_pair`` (LoRA adapters + value head), ``universal`` (shared trunk + per-model
maps), ``bundle`` (ours). See docs/interop.md for each layout's files and fields.
"""

from nla.interop.registry import (
    LAYOUTS,
    Release,
    detect_layout,
    import_layout,
    load_release,
    releases,
)
from nla.interop.universal import UniversalNLA

__all__ = ["LAYOUTS", "Release", "UniversalNLA", "detect_layout", "import_layout", "load_release", "releases"]
