"""NLAs published as one half only: an AV that can verbalize, or an AR that can reconstruct.

The object is :class:`nla.bundle.SingleRoleNLA`, built by ``NLA.from_parts`` from parts whose
``role`` is ``"av"`` or ``"ar"`` (the paper and nanoNLA importers return such parts for a lone
half). This module reads the half bundle that ``SingleRoleNLA.save_pretrained`` writes
(``kind: nla_single_role_bundle``: our bundle sidecar plus ``role``, and only ``av/`` or
``ar/``), as parts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nla.errors import NLAError
from nla.meta import META_NAME, read_yaml
from nla.names import BUNDLE_KIND, SINGLE_ROLE_KIND, VALUE_HEAD_FILE
from nla.parts import BundleMeta, NLAParts

KIND = SINGLE_ROLE_KIND


def load(path: str | Path, *, dtype: str | torch.dtype = "float32", device: str | None = None) -> NLAParts:
    """The parts of a half bundle written by :meth:`nla.bundle.SingleRoleNLA.save_pretrained`."""
    from nla.interop.common import load_av, load_linear
    from nla.models.loading import load_tokenizer, parse_dtype, pick_device
    from nla.models.reconstructor import load_trunk

    root = Path(path)
    where = root / META_NAME
    data = read_yaml(where)
    role = data.get("role")
    if data.get("kind") != KIND or role not in ("av", "ar"):
        raise NLAError(f"{where}: not a single-role bundle (field 'role' is {role!r})")
    meta = BundleMeta.from_dict({**data, "kind": BUNDLE_KIND}, where)
    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    folder = root / role
    if not folder.is_dir():
        raise NLAError(f"{root}: missing folder {role}/")
    tokenizer = load_tokenizer(str(folder))
    if role == "av":
        return NLAParts(meta, tokenizer, dev, str(where), av_model=load_av(folder, meta.base_model, torch_dtype, dev),
                        role="av")
    trunk = load_trunk(str(folder), None, torch_dtype)
    head = load_linear(folder / VALUE_HEAD_FILE, meta.d_model, meta.d_model)
    return NLAParts(meta, tokenizer, dev, str(where), trunk=trunk, head=head, role="ar")
