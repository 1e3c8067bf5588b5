"""Where `nla` keeps converted models and other caches (override with ``NLA_CACHE``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("NLA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nla"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
