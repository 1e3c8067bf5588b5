"""Released NLAs by name (``nla/releases.yaml``), layout detection, and hub fetching.

:func:`load_parts` accepts a registry name, a local folder of any known layout, or a hub repo
id; every route ends in one loader of :data:`LOADERS`, a flat table from layout name to a
function returning parts (like SAELens' loaders). The objects are built from the parts by
``NLA.from_parts`` (:mod:`nla.bundle`, which imports this module, never the reverse) and by
:mod:`nla.interop.load`. Facts a layout's files do not record (nanoNLA's additive
injection, Solshine's AR read-out block, anicka's training depth) come from the registry
entry's ``options`` or from explicit flags, never from a guess.

The hub is used only through ``huggingface_hub.snapshot_download`` restricted to the
release's subfolder; with no network the error says so and how to pass a local folder.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nla.errors import NLAError
from nla.interop import anicka, nanonla, paper, single, solshine, universal
from nla.interop.common import first_line, is_adapter_dir, partner_candidates
from nla.meta import META_NAME, read_yaml
from nla.parts import NLAParts, UniversalParts, read_bundle
from nla.universal.maps import read_universal

REGISTRY_FILE = Path(__file__).resolve().parent.parent / "releases.yaml"
PAIRED = ("paper", "nanonla", "solshine", "anicka")


def _load_bundle(path: Path, *, dtype: str | torch.dtype = "float32", device: str | None = None
                 ) -> NLAParts | UniversalParts:
    # A universal bundle is our bundle plus adapters/ and extra.universal: read as a plain
    # NLA it would be written back without its per-model maps.
    if (read_yaml(path / META_NAME).get("extra") or {}).get("universal"):
        return read_universal(path, dtype=dtype, device=device)
    return read_bundle(path, dtype=dtype, device=device)


# Layout name → loader returning parts; ``NLA.from_parts`` (or ``UniversalNLA.from_parts``)
# builds the object, never the loader.
LOADERS: dict[str, Callable[..., NLAParts | UniversalParts]] = {
    "bundle": _load_bundle,
    "paper": paper.load,
    "nanonla": nanonla.load,
    "solshine": solshine.load,
    "anicka": anicka.load,
    "universal": universal.load,
    "single": single.load,
}
LAYOUTS = tuple(LOADERS)


@dataclass(frozen=True)
class Release:
    name: str
    layout: str
    repo_id: str
    base_model: str
    layer: int
    publisher: str = ""
    subfolder: str | None = None
    ar_repo_id: str | None = None
    ar_subfolder: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


def releases(path: str | Path | None = None) -> dict[str, Release]:
    """The registry, validated entry by entry (a broken entry names itself and its field)."""
    path = Path(path) if path is not None else REGISTRY_FILE
    data = read_yaml(path)
    entries = data.get("releases")
    if not isinstance(entries, dict):
        raise NLAError(f"{path}: missing field 'releases'")
    out: dict[str, Release] = {}
    for name, entry in entries.items():
        where = f"{path}: release {name!r}"
        if not isinstance(entry, dict):
            raise NLAError(f"{where} is not a mapping")
        for fld, kind in (("layout", str), ("repo_id", str), ("base_model", str), ("layer", int)):
            if not isinstance(entry.get(fld), kind) or (kind is int and isinstance(entry.get(fld), bool)):
                raise NLAError(f"{where}: missing or invalid field {fld!r}")
        if entry["layout"] not in LOADERS:
            raise NLAError(f"{where}: field 'layout' is {entry['layout']!r}, expected one of {', '.join(LOADERS)}")
        if entry["layout"] in PAIRED and not entry.get("ar_repo_id") and not entry.get("ar_subfolder"):
            raise NLAError(f"{where}: a {entry['layout']} release needs field 'ar_repo_id' or 'ar_subfolder'")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise NLAError(f"{where}: field 'options' must be a mapping")
        accepted = _accepted(entry["layout"])
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise NLAError(f"{where}: field 'options' has {unknown}, which the {entry['layout']} importer does not "
                           f"take ({', '.join(sorted(accepted))})")
        out[str(name)] = Release(
            name=str(name), layout=entry["layout"], repo_id=entry["repo_id"], base_model=entry["base_model"],
            layer=entry["layer"], publisher=str(entry.get("publisher", "")), subfolder=entry.get("subfolder"),
            ar_repo_id=entry.get("ar_repo_id"), ar_subfolder=entry.get("ar_subfolder"), options=dict(options),
            notes=" ".join(str(entry.get("notes", "")).split()),
        )
    return out


def _accepted(layout: str) -> set[str]:
    params = inspect.signature(LOADERS[layout]).parameters
    return {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} - {"dtype", "device"}


def _offline_help(what: str, repo_id: str, reason: str) -> NLAError:
    return NLAError(
        f"{what} needs the Hugging Face hub (repo {repo_id}), which is not reachable here ({reason}); "
        f"download it where the hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass the "
        f"folder instead: NLA.from_pretrained('DIR') or `nla import DIR --out RUN`"
    )


def fetch(repo_id: str, subfolder: str | None = None, what: str | None = None) -> Path:
    """A local snapshot of ``repo_id`` (only ``subfolder`` when given); the folder to import."""
    from huggingface_hub import snapshot_download

    what = what or f"hub repo {repo_id}"
    patterns = [f"{subfolder.strip('/')}/*", f"{subfolder.strip('/')}/**"] if subfolder else None
    try:
        local = snapshot_download(repo_id=repo_id, allow_patterns=patterns)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        raise _offline_help(what, repo_id, "HF_HUB_OFFLINE is set" if offline else first_line(exc)) from None
    path = Path(local) / subfolder if subfolder else Path(local)
    if not path.is_dir():
        raise NLAError(f"{what}: subfolder {subfolder!r} not found in hub repo {repo_id}")
    return path


def _by_sidecar(root: Path, data: dict[str, Any]) -> str:
    kind = data.get("kind")
    meta = root / META_NAME
    if kind == "nla_bundle":
        return "bundle"
    if kind == single.KIND:
        return "single"
    if kind == universal.KIND:
        return "universal"
    if kind == universal.AR_KIND:
        raise NLAError(f"{meta}: the AR half of a universal NLA (kind {kind!r}); pass the release folder above it, "
                       f"whose nla_meta.yaml has kind {universal.KIND!r}")
    if kind == nanonla.KIND:
        if nanonla.is_nanonla_dir(root):
            return "nanonla"
        raise NLAError(f"{meta}: a dataset sidecar (kind 'nla_dataset') with no model weights next to it: "
                       f"a dataset, not an NLA")
    if kind == paper.KIND:
        if solshine.is_solshine_sidecar(data):
            return "solshine"
        return "anicka" if is_adapter_dir(root) else "paper"
    raise NLAError(f"{meta}: unknown layout (field 'kind' is {kind!r}; known: nla_bundle, nla_model, nla_dataset "
                   f"next to weights, nla_model_universal)")


def detect_layout(path: str | Path) -> str:
    """Which published layout a local folder holds (one of :data:`LAYOUTS`)."""
    root = Path(path)
    if not root.is_dir():
        raise NLAError(f"{root}: not a folder")
    if (root / META_NAME).exists():
        return _by_sidecar(root, read_yaml(root / META_NAME))
    if paper.is_paper_dir(root / "av") and paper.is_paper_dir(root / "ar"):
        return "paper"
    if nanonla.is_nanonla_dir(root / "av") and nanonla.is_nanonla_dir(root / "ar"):
        return "nanonla"
    if solshine.is_ar_dir(root):
        return "solshine"
    if (root / "av" / META_NAME).exists() and is_adapter_dir(root / "av"):
        return _by_sidecar(root / "av", read_yaml(root / "av" / META_NAME))
    raise NLAError(f"{root}: not a known NLA layout (no {META_NAME}; see docs/interop.md for the layouts)")


def _is_local(source: str) -> bool:
    return os.path.isdir(source)


def locate(source: str | Path, ar: str | Path | None = None) -> tuple[Path, str, dict[str, Any]]:
    """``(folder, layout, importer options)`` for a name, local folder or hub repo id."""
    text = str(source)
    if _is_local(text):
        opts: dict[str, Any] = {"ar": Path(ar)} if ar is not None else {}
        return Path(text), detect_layout(text), opts
    known = releases()
    if text in known:
        rel = known[text]
        what = f"release {rel.name!r}"
        root = fetch(rel.repo_id, rel.subfolder, what)
        opts = dict(rel.options)
        if rel.layout in PAIRED:
            opts["ar"] = fetch(rel.ar_repo_id or rel.repo_id, rel.ar_subfolder, what)
        if rel.layout in ("paper", "nanonla", "solshine", "anicka", "universal"):
            opts.setdefault("base_model", rel.base_model)
        return root, rel.layout, opts
    if text.count("/") == 1 and not text.startswith((".", "/")) and not os.path.exists(text):
        root = fetch(text)
        layout = detect_layout(root)
        opts = {}
        if ar is not None:
            opts = {"ar": Path(ar)}
        elif layout in PAIRED:
            # Two hub repos: the other half's name follows the publisher's -av / -ar convention.
            as_av, as_ar = partner_candidates(Path(text), "av"), partner_candidates(Path(text), "ar")
            if as_av:
                opts = {"ar": fetch(as_av[0].as_posix(), what=f"AR half of {text}")}
            elif as_ar:
                root, opts = fetch(as_ar[0].as_posix(), what=f"AV half of {text}"), {"ar": root}
        return root, layout, opts
    names = ", ".join(sorted(known))
    raise NLAError(f"{text!r} is not a folder, a known release ({names}) or a hub repo id (owner/name)")


def load_parts(source: str | Path, *, layout: str | None = None, dtype: str | torch.dtype = "float32",
               device: str | None = None, **options: Any) -> tuple[Path, NLAParts | UniversalParts]:
    """``(folder, parts)`` for a release name, local folder or hub id, by its layout's loader.

    Options a layout does not take are an error naming them, not silently dropped.
    """
    if layout is not None and layout not in LOADERS:
        raise NLAError(f"unknown layout {layout!r}; choose one of {', '.join(LOADERS)}")
    ar = options.pop("ar", None)
    root, detected, opts = locate(source, ar)
    if layout is not None and layout != detected:
        raise NLAError(f"{root}: asked for layout {layout!r} but the folder holds the {detected!r} layout")
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    opts.update(given)
    accepted = _accepted(detected)
    unknown = sorted(set(opts) - accepted)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise NLAError(f"{root}: {flags} does not apply to the {detected} layout (it takes "
                       f"{', '.join('--' + k.replace('_', '-') for k in sorted(accepted)) or 'no options'})")
    return root, LOADERS[detected](root, dtype=dtype, device=device, **opts)


def nla_parts(parts: NLAParts | UniversalParts) -> NLAParts:
    """The parts of the NLA itself: a universal NLA's are its shared trunk's."""
    return parts.trunk if isinstance(parts, UniversalParts) else parts


def releases_table(entries: dict[str, Release]) -> str:
    rows = [("NAME", "LAYOUT", "BASE MODEL", "LAYER", "HUB", "NOTE")]
    for r in entries.values():
        hub = r.repo_id + (f"/{r.subfolder}" if r.subfolder else "")
        if r.ar_repo_id and r.ar_repo_id != r.repo_id:
            hub += f" + {r.ar_repo_id}"
        elif r.ar_subfolder:
            hub += f" (+ {r.ar_subfolder}/)"
        rows.append((r.name, r.layout, r.base_model, str(r.layer), hub, r.notes))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths)), row[-1]]).rstrip() for row in rows)

