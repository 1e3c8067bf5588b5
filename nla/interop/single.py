"""NLAs published as one half only: an AV that can verbalize, or an AR that can reconstruct.

A publisher may release only one role (or a user may have only one of the two repos). Such a
folder loads as a :class:`SingleRoleNLA`: the half that is there works exactly as in a pair;
the other half's methods stop with one line saying which folder to add (``--ar DIR``).
Saved, it is a half bundle (``kind: nla_single_role_bundle``: our bundle sidecar plus
``role``, and only ``av/`` or ``ar/``), which :func:`load` reads back.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from nla.bundle import NLA, BundleMeta, save_value_head, swap_in
from nla.errors import NLAError
from nla.meta import META_NAME, read_yaml, write_yaml
from nla.models.reconstructor import Reconstructor
from nla.models.verbalizer import Verbalization, Verbalizer
from nla.names import VALUE_HEAD_FILE

KIND = "nla_single_role_bundle"


class SingleRoleNLA(NLA):
    """An :class:`NLA` with one half: ``role`` is ``"av"`` (verbalize, explain) or ``"ar"`` (reconstruct)."""

    def __init__(self, meta: BundleMeta, role: str, tokenizer: Any, av_model: Any = None,
                 reconstructor: Reconstructor | None = None):
        if role not in ("av", "ar") or (av_model is None) == (reconstructor is None):
            raise NLAError("a single-role NLA holds exactly one of an AV or an AR")
        self.meta = meta
        self.role = role
        self.tokenizer = tokenizer
        self.av_model = av_model
        self.ar = reconstructor  # type: ignore[assignment]
        self.mean_vector = None
        self._base = None
        self._shared = []
        self.verbalizer = (Verbalizer(av_model, tokenizer, meta.tokens, meta.prompt_templates["av"], meta.injection,
                                      meta.d_model) if av_model is not None else None)  # type: ignore[assignment]

    @property
    def device(self) -> torch.device:
        module = self.av_model if self.av_model is not None else self.ar
        return next(module.parameters()).device

    def _missing(self, what: str) -> NLAError:
        other = "ar" if self.role == "av" else "av"
        source = (self.meta.extra.get("imported_from") or {}).get(self.role, "this folder")
        hint = f"--ar DIR (ar=...) with {source}" if other == "ar" else f"the AV folder as SOURCE and {source} as --ar"
        return NLAError(f"{what} needs the {other.upper()}, and this NLA is {self.role.upper()}-only; "
                        f"import the pair: {hint}")

    def share_frozen_base(self) -> int:
        return 0

    def verbalize(self, vectors: torch.Tensor, n: int = 1, **generate_kwargs: Any) -> list[list[Verbalization]]:
        if self.verbalizer is None:
            raise self._missing("verbalize")
        return super().verbalize(vectors, n=n, **generate_kwargs)

    def reconstruct(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        if self.ar is None:
            raise self._missing("reconstruct")
        return super().reconstruct(texts, batch_size=batch_size)

    def round_trip(self, vectors: torch.Tensor, **generate_kwargs: Any) -> Any:
        raise self._missing("round_trip")

    def explain(self, text: str | list[dict[str, str]], positions: list[int] | None = None,
                **generate_kwargs: Any) -> list[dict[str, Any]]:
        """AV-only: the explanations of the base model's block-K states (no reconstruction)."""
        if self.verbalizer is None:
            raise self._missing("explain")
        if not isinstance(text, str):
            raise NLAError("explain on a single-role NLA takes plain text, not a chat transcript")
        ids, states = self.base_states(text)
        positions = list(range(len(ids))) if positions is None else positions
        for p in positions:
            if not -len(ids) <= p < len(ids):
                raise NLAError(f"position {p} is out of range: the text has {len(ids)} tokens")
        positions = [p % len(ids) for p in positions]
        answers = [outs[0] for outs in self.verbalize(states[positions], n=1, **generate_kwargs)]
        return [{"position": p, "token": self.tokenizer.decode([ids[p]]),
                 "context": self.tokenizer.decode(ids[: p + 1], skip_special_tokens=True),
                 "explanation": a.explanation, "raw": a.raw} for p, a in zip(positions, answers)]

    def save_pretrained(self, path: str | Path) -> None:
        """A half bundle, written to ``path.tmp`` then swapped in (never half a folder)."""
        root = Path(path)
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.av_model is not None:
            getattr(self.av_model, "module", self.av_model).save_pretrained(tmp / "av")
            self.tokenizer.save_pretrained(tmp / "av")
        else:
            assert self.ar is not None
            trunk: Any = self.ar.trunk
            trunk.save_pretrained(tmp / "ar")
            self.tokenizer.save_pretrained(tmp / "ar")
            save_value_head(self.ar.value_head, tmp / "ar")
        data = self.meta.to_dict()
        data.update(kind=KIND, role=self.role)
        write_yaml(tmp / META_NAME, data)
        swap_in(tmp, root)


def build(meta: BundleMeta, role: str, tokenizer: Any, model: Any, head: Any, device: torch.device,
          where: str, field_names: dict[str, str] | None = None) -> SingleRoleNLA:
    """A :class:`SingleRoleNLA` from a loaded half (the AV's marker checked live first)."""
    from nla.bundle import apply_prompt_format
    from nla.interop.common import check_marker

    apply_prompt_format(tokenizer, meta)
    if role == "av":
        check_marker(tokenizer, meta, where, field_names)
        model.to(device).eval()
        return SingleRoleNLA(meta, "av", tokenizer, av_model=model)
    ar = Reconstructor(model, tokenizer, meta.prompt_templates["ar"])
    ar.add_special_tokens = bool(meta.extra.get("ar_add_special_tokens", True))
    ar.value_head = head
    ar.to(device).eval()
    return SingleRoleNLA(meta, "ar", tokenizer, reconstructor=ar)


def load(path: str | Path, *, dtype: str | torch.dtype = "float32", device: str | None = None) -> SingleRoleNLA:
    """A half bundle written by :meth:`SingleRoleNLA.save_pretrained`."""
    from nla.interop.common import load_av, load_linear
    from nla.models.loading import load_tokenizer, parse_dtype, pick_device
    from nla.models.reconstructor import load_trunk

    root = Path(path)
    where = root / META_NAME
    data = read_yaml(where)
    role = data.get("role")
    if data.get("kind") != KIND or role not in ("av", "ar"):
        raise NLAError(f"{where}: not a single-role bundle (field 'role' is {role!r})")
    meta = BundleMeta.from_dict({**data, "kind": "nla_bundle"}, where)
    torch_dtype, dev = parse_dtype(dtype), pick_device(device)
    folder = root / role
    if not folder.is_dir():
        raise NLAError(f"{root}: missing folder {role}/")
    tokenizer = load_tokenizer(str(folder))
    if role == "av":
        model = load_av(folder, meta.base_model, torch_dtype, dev)
        return build(meta, "av", tokenizer, model, None, dev, str(where))
    trunk = load_trunk(str(folder), None, torch_dtype)
    head = load_linear(folder / VALUE_HEAD_FILE, meta.d_model, meta.d_model)
    return build(meta, "ar", tokenizer, trunk, head, dev, str(where))
