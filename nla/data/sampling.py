"""Which rows a dataset holds: the split of each document and the positions sampled from it
(docs/design.md §3).

Both come from RNGs seeded by SHA-256 of ``(seed, purpose, doc_id)``, never Python's ``hash()``
(which changes per process), so a rerun, a resume or another rank picks the same rows. The
dataset reader (:mod:`nla.data.store`) uses the same split rule for published files that carry
none, which is why it lives below both the reader and ``nla extract``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np

from nla.errors import NLAError
from nla.names import SPLITS

T = TypeVar("T")


def parse_assignments(items: Iterable[str], flag: str, known: Sequence[str], convert: Callable[[str], T], *,
                      form: str, noun: str, value_kind: str) -> dict[str, T]:
    """``NAME=VALUE`` items of a flag → ``{name: value}``; a malformed item, an unknown name or a
    value ``convert`` refuses is a one-line error naming the flag (``--split``, ``--layers``)."""
    out: dict[str, T] = {}
    for item in items:
        if "=" not in item:
            raise NLAError(f"{flag}: {item!r} is not {form}")
        name, value = item.split("=", 1)
        name = name.strip()
        if name not in known:
            raise NLAError(f"{flag}: unknown {noun} {name!r} ({noun}s: {', '.join(known)})")
        try:
            out[name] = convert(value)
        except ValueError:
            raise NLAError(f"{flag}: {value!r} is not {value_kind}") from None
    return out


def parse_split(spec: str) -> dict[str, float]:
    fractions = parse_assignments(spec.split(","), "--split", SPLITS, float, form="NAME=FRACTION", noun="split",
                                  value_kind="a number")
    total = sum(fractions.values())
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise NLAError("--split: fractions must be non-negative and not all zero")
    # Rounded so the sidecar reads 0.4, not 0.4000000000000001.
    return {k: round(fractions.get(k, 0.0) / total, 12) for k in SPLITS}


def doc_seed(seed: int, doc_id: str, salt: str) -> int:
    """A stable 64-bit seed per document (Python's hash() changes per process)."""
    digest = hashlib.sha256(f"{seed}\x00{salt}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def assign_split(seed: int, doc_id: str, fractions: dict[str, float]) -> str:
    u = doc_seed(seed, doc_id, "split") / 2**64
    acc = 0.0
    for name in SPLITS:
        acc += fractions[name]
        if u < acc:
            return name
    return SPLITS[-1]


def sample_positions(
    seed: int, doc_id: str, special_mask: list[int], n: int, min_position: int
) -> list[int]:
    candidates = [p for p in range(min_position, len(special_mask)) if not special_mask[p]]
    if len(candidates) <= n:
        return candidates
    rng = np.random.default_rng(doc_seed(seed, doc_id, "positions"))
    return sorted(int(p) for p in rng.choice(candidates, size=n, replace=False))
