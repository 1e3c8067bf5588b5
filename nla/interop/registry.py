"""Released NLAs by name (``nla/releases.yaml``), layout detection, and hub fetching.

``load_release(x)`` accepts a registry name, a local folder of any known layout, or a hub repo
id; every route ends in the importer of the detected layout (a table, like SAELens' loaders).
The hub is used only through ``huggingface_hub.snapshot_download`` restricted to the release's
subfolder; with no network the error says so and how to pass a local folder instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from nla.errors import NLAError
from nla.interop.common import first_line
from nla.meta import META_NAME, read_yaml

LAYOUTS = ("bundle", "paper", "nanonla", "peft_pair", "universal")
REGISTRY_FILE = Path(__file__).resolve().parent.parent / "releases.yaml"


@dataclass(frozen=True)
class Release:
    name: str
    layout: str
    repo_id: str
    base_model: str
    layer: int
    subfolder: str | None = None
    ar_repo_id: str | None = None
    ar_subfolder: str | None = None
    status: str = "example"
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
        for field, kind in (("layout", str), ("repo_id", str), ("base_model", str), ("layer", int)):
            if not isinstance(entry.get(field), kind):
                raise NLAError(f"{where}: missing or invalid field {field!r}")
        if entry["layout"] not in LAYOUTS:
            raise NLAError(f"{where}: field 'layout' is {entry['layout']!r}, expected one of {', '.join(LAYOUTS)}")
        if entry["layout"] == "paper" and not entry.get("ar_repo_id") and not entry.get("ar_subfolder"):
            raise NLAError(f"{where}: a paper release needs field 'ar_repo_id' or 'ar_subfolder'")
        out[str(name)] = Release(
            name=str(name), layout=entry["layout"], repo_id=entry["repo_id"], base_model=entry["base_model"],
            layer=entry["layer"], subfolder=entry.get("subfolder"), ar_repo_id=entry.get("ar_repo_id"),
            ar_subfolder=entry.get("ar_subfolder"), status=str(entry.get("status", "example")),
            notes=" ".join(str(entry.get("notes", "")).split()),
        )
    return out


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


def detect_layout(path: str | Path) -> str:
    """Which published layout a local folder holds (one of :data:`LAYOUTS`)."""
    root = Path(path)
    if not root.is_dir():
        raise NLAError(f"{root}: not a folder")
    meta = root / META_NAME
    if meta.exists():
        data = read_yaml(meta)
        kind, fmt = data.get("kind"), data.get("format")
        if kind == "nla_bundle":
            return "bundle"
        if kind == "nla_model":
            return "paper"
        if fmt == "nanonla":
            return "nanonla"
        if kind == "nla_peft_pair":
            return "peft_pair"
        if kind == "nla_universal":
            return "universal"
        raise NLAError(f"{meta}: unknown layout (field 'kind' is {kind!r}, 'format' is {fmt!r})")
    from nla.interop.paper import is_paper_dir

    if is_paper_dir(root / "av") and is_paper_dir(root / "ar"):
        return "paper"
    raise NLAError(f"{root}: not a known NLA layout (no {META_NAME}; see docs/interop.md for the layouts)")


def _importer(layout: str) -> Callable[..., Any]:
    from nla.interop import nanonla, paper, peft_pair, universal

    def bundle(path: Path, **kw: Any) -> Any:
        from nla.bundle import NLA

        return NLA.from_pretrained(path, dtype=kw.get("dtype", "float32"), device=kw.get("device"))

    table: dict[str, Callable[..., Any]] = {
        "bundle": bundle, "paper": paper.load, "nanonla": nanonla.load,
        "peft_pair": peft_pair.load, "universal": universal.load,
    }
    return table[layout]


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
        opts = {}
        if rel.layout == "paper":
            ar_path = fetch(rel.ar_repo_id or rel.repo_id, rel.ar_subfolder, what)
            opts = {"ar": ar_path, "base_model": rel.base_model}
        return root, rel.layout, opts
    if text.count("/") == 1 and not text.startswith((".", "/")) and not os.path.exists(text):
        root = fetch(text)
        layout = detect_layout(root)
        opts = {}
        if layout == "paper" and ar is None and text.endswith("-av"):
            opts = {"ar": fetch(text[:-3] + "-ar", what=f"AR half of {text}")}
        elif ar is not None:
            opts = {"ar": Path(ar)}
        return root, layout, opts
    names = ", ".join(sorted(known))
    raise NLAError(f"{text!r} is not a folder, a known release ({names}) or a hub repo id (owner/name)")


def load_release(source: str | Path, *, dtype: str | torch.dtype = "float32", device: str | None = None,
                 **options: Any) -> Any:
    """An :class:`NLA` from a release name, local folder or hub id, whatever its layout.

    A universal bundle loads as its shared-trunk NLA here; use
    :meth:`UniversalNLA.from_pretrained` for the per-model maps.
    """
    obj = import_layout(source, dtype=dtype, device=device, **options)
    return getattr(obj, "nla", obj)


def import_layout(source: str | Path, out: str | Path | None = None, *, layout: str | None = None,
                  dtype: str | torch.dtype = "float32", device: str | None = None, **options: Any) -> Any:
    """Load ``source`` with its layout's importer; with ``out``, also write our bundle there.

    Returns an :class:`NLA` (a :class:`UniversalNLA` for universal bundles).
    """
    ar = options.pop("ar", None)
    root, detected, opts = locate(source, ar)
    if layout is not None and layout != detected:
        if layout not in LAYOUTS:
            raise NLAError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
        raise NLAError(f"{root}: asked for layout {layout!r} but the folder holds the {detected!r} layout")
    opts.update({k: v for k, v in options.items() if v is not None})
    obj = _importer(detected)(root, dtype=dtype, device=device, **opts)
    if out is not None:
        if Path(out).resolve() == root.resolve():
            raise NLAError(f"--out {out} is the source folder; write the bundle somewhere else")
        obj.save_pretrained(out)
    return obj


def releases_table(entries: dict[str, Release]) -> str:
    rows = [("NAME", "LAYOUT", "STATUS", "BASE MODEL", "LAYER", "HUB")]
    for r in entries.values():
        hub = r.repo_id + (f"/{r.subfolder}" if r.subfolder else "") + (f" + {r.ar_repo_id}" if r.ar_repo_id else "")
        rows.append((r.name, r.layout, r.status, r.base_model, str(r.layer), hub))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def dump(entries: dict[str, Release]) -> str:
    return yaml.safe_dump({n: r.__dict__ for n, r in entries.items()}, sort_keys=False)
