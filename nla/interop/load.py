"""A source's parts built into objects: :func:`load_release` and :func:`import_layout`.

The loaders (:data:`nla.interop.registry.LOADERS`) return parts; this is where the interop
API turns them into an :class:`~nla.bundle.NLA` (``NLA.from_parts``) or, for a universal NLA,
a :class:`~nla.universal.bundle.UniversalNLA`, and where ``nla import`` writes our bundle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nla.bundle import NLA
from nla.errors import NLAError
from nla.interop.registry import load_parts, nla_parts
from nla.parts import UniversalParts
from nla.universal.bundle import UniversalNLA


def load_release(source: str | Path, *, dtype: str | torch.dtype = "float32", device: str | None = None,
                 **options: Any) -> NLA:
    """An :class:`NLA` from a release name, local folder or hub id, whatever its layout.

    A universal NLA loads as its shared-trunk NLA here; use
    :meth:`UniversalNLA.from_pretrained` for the per-model maps.
    """
    _, parts = load_parts(source, dtype=dtype, device=device, **options)
    return NLA.from_parts(nla_parts(parts))


def import_layout(source: str | Path, out: str | Path | None = None, *, layout: str | None = None,
                  dtype: str | torch.dtype = "float32", device: str | None = None, **options: Any) -> Any:
    """Load ``source`` with its layout's loader; with ``out``, also write our bundle there.

    Returns an :class:`NLA` (a :class:`UniversalNLA` for universal NLAs). Options a layout
    does not take are an error naming them, not silently dropped.
    """
    root, parts = load_parts(source, layout=layout, dtype=dtype, device=device, **options)
    obj: NLA | UniversalNLA = UniversalNLA.from_parts(parts) if isinstance(parts, UniversalParts) \
        else NLA.from_parts(parts)
    if out is not None:
        if Path(out).resolve() == root.resolve():
            raise NLAError(f"--out {out} is the source folder; write the bundle somewhere else")
        if nla_parts(parts).meta.extra.get("ar_final_norm"):
            raise NLAError(f"{root}: ar_meta.json has final_norm_stripped: false (an AR that reads after the "
                           f"final norm), which our bundle cannot store; load it directly with "
                           f"NLA.from_pretrained('{root}', injection=...) instead of writing a bundle")
        obj.save_pretrained(out)
    return obj
