"""nla — Natural Language Autoencoders.

    from nla import NLA
    nla = NLA.from_pretrained("runs/default/bundle")
    nla.explain("The cat sat on the")        # explanations + round-trip FVE per token
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["NLA", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import nla` stays cheap (no torch) for the CLI's --help and for tools that only
    # read sidecars.
    if name == "NLA":
        from nla.bundle import NLA

        return NLA
    raise AttributeError(name)
