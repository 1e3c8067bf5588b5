"""Dataclass configs: per-field help, CLI flags, ``--config file.yaml``, saved next to outputs.

Every stage has one config dataclass. Each field is declared with :func:`opt`, whose help text
becomes the ``--help`` line, so documentation and behaviour cannot drift apart. Precedence:
flags given on the command line > values in ``--config`` YAML > dataclass defaults.

The contract at the boundary (docs/design.md §2, "Key invariants"): every value read from a
flag or a YAML file goes through :func:`coerce` (types: ``1e-4`` is a float even though YAML 1.1
reads it as a string; ``"false"`` is *not* a bool) and every resolved config through
:func:`validate` (ranges, finiteness, choices, required fields, devices that exist). Both raise
:class:`NLAError` with one line naming the field, so a typo never trains the default schedule
and a wrong type never turns a stage on.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nla.errors import NLAError
from nla.meta import read_yaml, write_yaml
from nla.names import DATASET_KIND, MEAN_VECTOR_FILE, META_NAME

T = TypeVar("T")

_UNSET = object()


@dataclass(frozen=True)
class Check:
    """A range or choice constraint on one field (``None``: no bound)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None

    def problem(self, value: Any) -> str | None:
        if self.choices is not None and value not in self.choices:
            return f"expected one of {', '.join(map(str, self.choices))}, got {value!r}"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        if self.ge is not None and value < self.ge:
            return f"must be at least {self.ge:g}, got {value!r}"
        if self.gt is not None and not value > self.gt:
            return f"must be greater than {self.gt:g}, got {value!r}"
        if self.le is not None and value > self.le:
            return f"must be at most {self.le:g}, got {value!r}"
        if self.lt is not None and not value < self.lt:
            return f"must be less than {self.lt:g}, got {value!r}"
        return None


def opt(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, choices: tuple[Any, ...] | list[Any] | None = None,
        required: bool = False, **kwargs: Any) -> Any:
    """A config field with its help text (shown by ``--help``) and its constraint.

    ``required``: the value must be given (a non-empty string or list); the default only marks "unset".
    A field without ``ge``/``gt``/``le``/``lt``/``choices`` falls back to :data:`CONVENTIONS`.
    """
    meta: dict[str, Any] = {"help": help, "required": required}
    if any(b is not None for b in (ge, gt, le, lt, choices)):
        meta["check"] = Check(ge, gt, le, lt, tuple(choices) if choices is not None else None)
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


# One table of the constraints that every config shares by field name, so a field called `lr`
# means "> 0" in every stage without each stage repeating it (and without a stage forgetting it).
# A field's own opt(ge=..., ...) overrides its entry here. Fields that several stages share as a
# group (device, dtype, seed, LoRA, sampling, corpus: nla/config_fields.py) carry their checks
# on the group's field instead.
_AT_LEAST_1 = {
    "seq_len", "positions_per_doc", "batch_size", "grad_accum", "steps", "max_steps", "ar_max_steps",
    "max_new_tokens", "default_new_tokens", "group_size", "max_n", "concurrency", "max_tokens", "max_length",
    "max_rows", "updates_per_batch", "ar_steps", "rows", "dec_rows",
    "max_batch_rows", "max_body_bytes", "max_text_chars", "max_positions", "max_vectors", "max_texts", "log_every",
    "stop_after_steps",
}
_AT_LEAST_0 = {
    "max_retries", "eval_rows", "save_every", "eval_every", "keep_checkpoints", "warmup_steps", "best_of",
    "bootstrap", "min_position", "judge_rows", "html_samples", "torch_threads", "backoff", "weight_decay",
    "kl_coef", "max_grad_norm", "length_penalty", "temperature", "max_wait_ms", "ridge", "dec_ridge",
    "price_in", "price_out", "limit", "examples", "seed",
}
_FRACTIONS = {"warmup_ratio", "min_lr_ratio", "collapse_threshold"}
DTYPE_CHOICES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def convention(name: str) -> Check | None:
    """The shared constraint of a field called ``name`` (see the table above)."""
    if name == "lr" or name.endswith("_lr") or name in ("epochs", "clip_eps", "timeout", "timeout_s"):
        return Check(gt=0)
    if name in _AT_LEAST_1 or name.endswith("_batch_size"):
        return Check(ge=1)
    if name in _AT_LEAST_0:
        return Check(ge=0)
    if name in _FRACTIONS:
        return Check(ge=0, le=1)
    if name == "lora_dropout":
        return Check(ge=0, lt=1)
    if name == "n_candidates":
        return Check(ge=2)
    if name == "port":
        return Check(ge=0, le=65535)  # 0: any free port
    return None


# ---------------------------------------------------------------- types
def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None`` annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _type_name(tp: Any) -> str:
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is list or tp is list:
        return "a list"
    if typing.get_origin(tp) is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` as type ``tp``, or an :class:`NLAError` ``"NAME: expected ..., got ..."``.

    Strings are parsed for numbers (flags arrive as strings, and YAML 1.1 reads ``1e-4`` as one),
    never for booleans: ``rl: "false"`` is a mistake to report, not a value to guess at.
    """
    inner, optional = _base_type(tp)
    if value is None:
        if optional:
            return None
        raise NLAError(f"{name}: expected {_type_name(inner)}, got null")
    origin = typing.get_origin(inner)
    if origin is typing.Literal:
        choices = typing.get_args(inner)
        if value not in choices:
            raise NLAError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if inner is bool:
        if isinstance(value, bool):
            return value
    elif inner in (int, float):
        # An int is a float, a float is not an int; YAML 1.1 reads `1e-4` as a string, so numbers
        # given as text are parsed (docs/design.md §1, "Configs are typed"). bool is never a number.
        numeric = (int,) if inner is int else (int, float)
        if isinstance(value, numeric) and not isinstance(value, bool):
            return inner(value)
        if isinstance(value, str):
            try:
                return inner(value.strip())
            except ValueError:
                pass
    elif inner is str:
        if isinstance(value, str):
            return value
    elif origin is list or inner is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(inner) or (Any,)
            return [coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    elif origin is dict or inner is dict:
        if isinstance(value, dict):
            return value
    else:
        return value  # Any and other annotations: taken as given
    raise NLAError(f"{name}: expected {_type_name(inner)}, got {value!r}")


# ---------------------------------------------------------------- flags
def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field; defaults are left unset so we can tell what the user actually gave.

    Flag values stay strings here: :func:`resolve_config` coerces them with the same rules as
    YAML values, so both sources give the same one-line error for the same mistake.
    """
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", metavar="YAML", help="read settings from a YAML file (flags override it)")
    # Inherited field groups (nla/config_fields.py) come first in a dataclass; --help lists the
    # stage's own settings first, then the shared ones (a stable sort keeps each part's order).
    own = set(inspect.get_annotations(cls))
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        help_text = f.metadata.get("help", "")
        if default is not None and default != "" and tp is not bool:
            help_text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": _UNSET, "help": help_text.replace("%", "%%")
                              if "%%" not in help_text else help_text}
        check = f.metadata.get("check") or convention(f.name)
        if check is not None and check.choices is not None:
            kw["metavar"] = "{" + ",".join(map(str, check.choices)) + "}"
        if tp is bool:
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag_name(f.name), nargs="*", **kw)
        elif typing.get_origin(tp) is dict or tp is dict:
            continue  # structured fields come from YAML only
        else:
            parser.add_argument(flag_name(f.name), **kw)


# ---------------------------------------------------------------- validation
def check_device(device: str | None, name: str = "device", available: bool = True) -> None:
    """A device that does not exist is a one-line error here, not a CUDA traceback mid-run.

    ``available=False`` checks the spelling only (planning a GPU run on a laptop is fine).
    """
    if device in (None, "", "auto", "cpu"):
        return
    import torch

    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise NLAError(f"{name}: unknown device {device!r} (cpu, cuda, cuda:N, mps or auto)") from None
    if dev.type not in ("cuda", "mps", "cpu"):
        raise NLAError(f"{name}: unsupported device {device!r} (cpu, cuda, cuda:N, mps or auto)")
    if not available:
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise NLAError(f"{name}: {device!r} requested but CUDA is not available here (use cpu or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise NLAError(f"{name}: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise NLAError(f"{name}: 'mps' requested but MPS is not available here (use cpu or auto)")


def validate(config: Any, where: str = "config", labels: dict[str, str] | None = None,
             devices: bool = True, partial: bool = False) -> None:
    """Every field's type, range, finiteness and requiredness, in one place for every config.

    ``labels`` names where each given value came from (``--lr``, ``run.yaml: lr``), so the error
    points at the line or flag to fix. ``devices=False``: a device's spelling is checked, not
    whether it exists here (``nla run --dry-run`` plans GPU runs anywhere). ``partial=True``: a
    section of a recipe file, whose required settings come from the command line later.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        label = (labels or {}).get(f.name, f"{where}: {f.name}")
        coerce(value, hints[f.name], label)
        if f.metadata.get("required") and not partial and (value is None or value == "" or value == []):
            raise NLAError(f"{where}: {f.name} is required (give {flag_name(f.name)})")
        if isinstance(value, float) and not math.isfinite(value):
            raise NLAError(f"{label}: must be a finite number, got {value!r}")
        if isinstance(value, list):
            for item in value:
                if isinstance(item, float) and not math.isfinite(item):
                    raise NLAError(f"{label}: must hold finite numbers, got {item!r}")
        if value is None:
            continue
        check = f.metadata.get("check") or convention(f.name)
        problem = check.problem(value) if check is not None else None
        if problem:
            raise NLAError(f"{label}: {problem}")
        if f.name == "device":
            check_device(value, label, available=devices)
    extra = getattr(config, "check", None)
    if callable(extra):
        extra()  # cross-field rules of this config (each raises NLAError naming its fields)


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "config", devices: bool = True,
                     partial: bool = False) -> T:
    """A validated ``cls`` from a mapping: unknown keys, wrong types and bad ranges are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise NLAError(f"{where}: unknown setting {unknown[0]!r} for {cls.__name__}")
    values = {k: coerce(v, hints[k], f"{where}: {k}") for k, v in data.items()}
    try:
        config = cls(**values)
    except TypeError as exc:
        raise NLAError(f"{where}: {exc}") from None
    validate(config, where, devices=devices, partial=partial)
    return config


# YAML sections that feed a command under another name (`nla run` files call RL's `rl_train`).
SECTION_ALIASES: dict[str, tuple[str, ...]] = {"rl": ("rl", "rl_train")}


def _section_of(data: dict[str, Any], section: str | None) -> dict[str, Any]:
    for name in SECTION_ALIASES.get(section or "", (section,) if section else ()):
        if isinstance(data.get(name), dict):
            return data[name]
    return data


def resolve_config(cls: type[T], args: argparse.Namespace, section: str | None = None) -> T:
    """defaults < YAML (the whole file, or its ``section`` mapping) < explicit flags.

    Every key of the YAML mapping must be a setting of ``cls`` (a typo is an error, never a
    silently ignored line); values from both sources are coerced and validated alike.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    path = getattr(args, "config", None)
    where = "flags"
    if path:
        data = _section_of(read_yaml(path), section)
        unknown = sorted(set(data) - names)
        if unknown:
            raise NLAError(f"{path}: unknown setting {unknown[0]!r} for {cls.__name__}")
        for k, v in data.items():
            labels[k] = f"{path}: {k}"
            values[k] = coerce(v, hints[k], labels[k])
        where = str(path)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        given = getattr(args, f.name, _UNSET)
        if given is not _UNSET:
            labels[f.name] = flag_name(f.name)
            values[f.name] = coerce(given, hints[f.name], labels[f.name])
    try:
        config = cls(**values)
    except TypeError as exc:
        raise NLAError(f"{where}: {exc}") from None
    validate(config, where, labels)
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Record the resolved config next to a stage's output (secrets are never config fields)."""
    write_yaml(path, config_to_dict(config))


# ---------------------------------------------------------------- the output guard
# What a bundle folder holds (nla/bundle.py, NLA.save_pretrained): a writer that swaps a whole
# bundle folder in may replace these and nothing else.
BUNDLE_ENTRIES = ("av", "ar", META_NAME, MEAN_VECTOR_FILE)
# Our own temporary names (atomic writes, the pipeline's stamp): never "someone else's files".
_OWN_TEMPS = (".bundle.tmp", ".nla_stage.json", ".*.tmp*")


def _dataset_sidecar(out: Path) -> bool:
    meta = out / META_NAME
    if not meta.is_file():
        return False
    try:
        return read_yaml(meta).get("kind") == DATASET_KIND  # a bundle's sidecar says nla_bundle
    except NLAError:
        return False


def claim_output(out: str | Path, *, command: str, force: bool, owned: tuple[str, ...],
                 resume: bool = False, config_file: str | None = None, settings: dict[str, Any] | None = None,
                 free: frozenset[str] | set[str] = frozenset(), coexist: bool = True) -> None:
    """The one output guard every writer calls before it writes anything (docs/guarantees.md).

    * ``out`` naming a file, or a folder holding an activation dataset: always refused.
    * An empty or missing folder: fine.
    * This command's own run (``config_file`` there, written by the same config class): with
      ``resume``, every setting outside ``free`` must match (the changed one is named); without
      it, refused unless ``force``, which removes the run's own entries (``owned``: file names or
      glob patterns) so no stale checkpoint or metric survives into the new run.
    * Anything else in the folder: refused unless ``force``; ``force`` removes only ``owned``
      entries and keeps the rest, or (``coexist=False``: writers that swap the whole folder in)
      is refused as well while the folder holds entries the command did not write.
    """
    import fnmatch
    import shutil

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NLAError(f"{out}: is a file; --out must name a folder")
    if not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir() if not any(fnmatch.fnmatch(p.name, t) for t in _OWN_TEMPS))
    if not entries:
        return
    if _dataset_sidecar(out):
        raise NLAError(f"{out}: holds an activation dataset; nla {command} never writes into one (choose another --out)")

    def ours(name: str) -> bool:
        return any(fnmatch.fnmatch(name, pattern) for pattern in owned)

    foreign = [e for e in entries if not ours(e)]
    saved = out / config_file if config_file else None
    if saved is not None and saved.is_file():
        old = read_yaml(saved)
        new = config_to_dict_safe(settings or {})
        alien = sorted(set(old) - set(new) - {"targets"})
        if settings is not None and alien:
            raise NLAError(f"{out}: holds a run of another command (its {config_file} has {alien[0]!r}); "
                           "choose another --out")
        if resume:
            for key in sorted(set(old) | set(new)):
                if key in free or key == "targets":
                    continue
                if old.get(key) != new.get(key):
                    raise NLAError(f"{out}: the run was started with {key}={old.get(key)!r}, this resume asks for "
                                   f"{new.get(key)!r}; resume with the same settings, or pass --force without "
                                   "--resume to start over")
            return
        if not force:
            raise NLAError(f"{out}: an nla {command} run is already there; pass --resume to continue it or --force to "
                           "start it over")
    elif resume and not foreign:
        return  # an interrupted run that had not saved its settings yet: continue into it
    elif not force:
        shown = ", ".join(foreign[:3] or entries[:3]) + (", …" if len(foreign or entries) > 3 else "")
        raise NLAError(f"{out}: exists and is not empty ({shown}) and is not an output of nla {command}; choose "
                       "another --out or pass --force (which replaces only what this command writes)")
    if foreign and not coexist:
        raise NLAError(f"{out}: holds files nla {command} did not write ({', '.join(foreign[:3])}); it replaces "
                       "whole folders, so choose another --out")
    for name in entries:
        if ours(name):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def config_to_dict_safe(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they are saved (URLs redacted), so a comparison sees what the file holds."""
    from nla.meta import redact_secrets

    return redact_secrets(dict(settings))


def claim_bundle_folder(out: str | Path, *, command: str, force: bool) -> None:
    """:func:`claim_output` for writers that swap a whole bundle folder in (init, import).

    A folder that already holds a bundle is replaced as a whole with ``force``; any other
    non-empty folder is refused even with it (its files would go with the swap).
    """
    from nla.meta import META_NAME

    meta = Path(out) / META_NAME
    holds_bundle = False
    if meta.is_file():
        try:
            holds_bundle = str(read_yaml(meta).get("kind", "")).endswith("bundle")
        except NLAError:
            holds_bundle = False
    if holds_bundle and not force:
        raise NLAError(f"{out}: exists and is not empty (it holds a bundle); pass --force to replace it")
    claim_output(out, command=command, force=force, owned=("*",) if holds_bundle else BUNDLE_ENTRIES,
                 coexist=False)
