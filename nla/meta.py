"""Sidecars (``nla_meta.yaml``): reading, writing and validation with errors that name the field.

The sidecar is the contract between stages: token ids, templates, scales and layer are read
from it and checked, never re-derived silently (a re-derived marker id that differs from the
one used in training is exactly the silent failure this prevents).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml

from nla.errors import NLAError
from nla.names import DATASET_KIND, DATASET_SCHEMA_VERSION, META_NAME, write_text_atomic

__all__ = ["DATASET_KIND", "DATASET_SCHEMA_VERSION", "META_NAME", "DatasetMeta", "read_bytes", "read_yaml", "redact_secrets",
           "require", "write_yaml"]


def read_bytes(path: Path, expected: str = "a file") -> bytes:
    """A file's bytes; missing, a folder or unreadable is one line naming the path."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NLAError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise NLAError(f"{path}: is a folder, expected {expected}") from None
    except PermissionError:
        raise NLAError(f"{path}: permission denied") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = read_bytes(path, "a YAML file").decode("utf-8")
    except UnicodeDecodeError:
        raise NLAError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise NLAError(f"{path}: malformed YAML{where} ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NLAError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


REDACTED = "REDACTED"
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without its secrets: user-info (``user:KEY@``) and every query value
    (``?api-key=KEY``) are replaced, the fragment dropped. Endpoints take keys in both places,
    and which query parameter is a key cannot be told from its name, so none is kept."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme or not parts.netloc:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED) for k, _ in pairs]) if pairs else REDACTED
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redact_text(text: str) -> str:
    """Every URL inside ``text`` redacted (error messages quote URLs and servers echo them)."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def redact_secrets(data: Any) -> Any:
    """A copy of ``data`` (dicts, lists, strings) with every URL in it redacted."""
    if isinstance(data, dict):
        return {k: redact_secrets(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_secrets(v) for v in data]
    if isinstance(data, str) and "://" in data:
        return redact_text(data)
    return data


def write_yaml(path: str | Path, data: dict[str, Any]) -> None:
    """Atomic write: a kill mid-write leaves the old file, never half a sidecar.

    URLs are redacted on the way (docs/guarantees.md, "Secrets"): every sidecar and saved
    config goes through here, so an API key inside a ``--base-url`` never reaches disk.
    """
    path = Path(path)
    if path.is_dir():
        raise NLAError(f"{path}: is a folder, expected a YAML file path")
    write_text_atomic(path, yaml.safe_dump(redact_secrets(data), sort_keys=False, allow_unicode=True))


def read_sidecar(path: str | Path, kind: str, missing: str) -> dict[str, Any]:
    """A sidecar of the given ``kind``; ``missing`` is the one-line error when the file is absent."""
    path = Path(path)
    if not path.exists():
        raise NLAError(missing)
    data = read_yaml(path)
    if data.get("kind") != kind:
        raise NLAError(f"{path}: field 'kind' is {data.get('kind')!r}, expected {kind!r}")
    return data


def dig(data: Any, dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None where a step is missing or not a mapping."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def require(data: dict[str, Any], dotted: str, where: str | Path, kind: type | tuple = object,
            positive: bool = False) -> Any:
    """``data['a']['b']`` for ``'a.b'``, or an error naming the missing/invalid field.

    A number must be finite (a NaN scale in a sidecar would inject NaN); ``positive``: and > 0.
    """
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise NLAError(f"{where}: missing field {dotted!r}")
        node = node[part]
    if not isinstance(node, kind) or (kind is int and isinstance(node, bool)):
        raise NLAError(f"{where}: field {dotted!r} has invalid value {node!r}")
    if isinstance(node, (int, float)) and not isinstance(node, bool) and (
            not math.isfinite(node) or (positive and node <= 0)):
        raise NLAError(f"{where}: field {dotted!r} has invalid value {node!r}"
                       + (" (expected a positive number)" if positive else " (expected a finite number)"))
    return node


@dataclass
class DatasetMeta:
    """The activation dataset sidecar (docs/design.md §3)."""

    base_model: str
    layer_index: int
    d_model: int
    n_layers: int
    corpus: str
    sampling: dict[str, Any]
    split_fractions: dict[str, float]
    kind: str = DATASET_KIND
    schema_version: int = DATASET_SCHEMA_VERSION
    rows: int = 0
    complete: bool = False
    norm_stats: dict[str, float] = field(default_factory=dict)
    injection_scale: float | None = None
    mean_vector: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """What must match for an existing dataset to be resumed instead of refused."""
        return {
            "base_model": self.base_model,
            "layer_index": self.layer_index,
            "corpus": self.corpus,
            "sampling": self.sampling,
            "split_fractions": self.split_fractions,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str | Path) -> DatasetMeta:
        kind = data.get("kind", DATASET_KIND)
        if kind != DATASET_KIND:
            raise NLAError(f"{where}: kind is {kind!r}, expected {DATASET_KIND!r}")
        version = data.get("schema_version", DATASET_SCHEMA_VERSION)
        if version != DATASET_SCHEMA_VERSION:
            raise NLAError(f"{where}: unknown schema_version {version!r} (this nla reads {DATASET_SCHEMA_VERSION})")
        require(data, "layer_index", where, int)
        require(data, "d_model", where, int)
        if data.get("injection_scale") is not None:
            require(data, "injection_scale", where, (int, float), positive=True)
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        known.setdefault("base_model", "unknown")
        known.setdefault("n_layers", -1)
        known.setdefault("corpus", "unknown")
        known.setdefault("sampling", {})
        known.setdefault("split_fractions", {})
        meta = cls(**known)
        meta.extra.update(extra)
        return meta
