"""nla — Natural Language Autoencoders.

    from nla import NLA
    nla = NLA.from_pretrained("runs/default/bundle")
    nla.explain("The cat sat on the")        # explanations + round-trip FVE per token
"""

from __future__ import annotations

import os
from typing import Any

# OpenMP threads that wait for work spin on their core by default. On a small machine with any
# other busy process, a spinning thread steals the core the other threads need and every matrix
# product waits for it: measured 5-7x slower with torch's 2 threads on a 2-core box beside one
# busy process, and no slower than 1 thread once waiting threads sleep (docs/benchmarks.md,
# "CPU threads"). Must be set before torch loads its OpenMP runtime; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from nla.names import VERSION as __version__

__all__ = ["NLA", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import nla` stays cheap (no torch) for the CLI's --help and for tools that only
    # read sidecars.
    if name == "NLA":
        from nla.bundle import NLA

        return NLA
    raise AttributeError(name)
