"""The `nla` command: one subcommand per pipeline stage.

Each stage module exposes ``register(subparsers)``; errors a user can fix (:class:`NLAError`)
print as one line naming the cause, with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from nla.errors import NLAError

# Which module registers each subcommand, in pipeline order. Only the module of the command
# being run is imported: importing them all (FastAPI, accelerate, ...) costs seconds per call.
COMMANDS: dict[str, str] = {
    "extract": "nla.data.extract",
    "label": "nla.label.runner",
    "init": "nla.bundle_cli",
    "verbalize": "nla.bundle_cli",
    "reconstruct": "nla.bundle_cli",
    "train": "nla.train.cli",
    "eval": "nla.eval.cli",
    "bench": "nla.eval.bench",
    "serve": "nla.serve.cli",
    "search": "nla.search",
    "steer": "nla.steer",
    "publish": "nla.publish",
    "import": "nla.interop.cli",
    "releases": "nla.interop.cli",
    "universal": "nla.universal.cli",
    "run": "nla.pipeline",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``nla train sft: error: ...``), like every
    other error; ``--help`` still shows the full usage. Subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# OS errors a user fixes by freeing space, choosing another folder or fixing permissions: one
# line naming the path and the cause, not a traceback.
USER_OS_ERRORS = {errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                  errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ENOENT}


def describe_os_error(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else (_innermost_file(exc.__traceback__, writing=True)
                                                            or "a file")
    cause = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EFBIG):
        cause += " (free some space, or write elsewhere)"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        cause += " (choose a folder you can write to)"
    return f"{where}: {cause}"


# Readers' exceptions for a damaged file (Parquet, safetensors, JSON configs). They rarely say
# which file, so the innermost frame's path-like local that names an existing file is reported.
CORRUPT_ERRORS = {"ArrowInvalid", "ArrowIOError", "SafetensorError", "HeaderTooLarge", "JSONDecodeError",
                  "UnicodeDecodeError", "DecodeError"}
DATA_SUFFIXES = {".parquet", ".safetensors", ".json", ".jsonl", ".bin", ".npy", ".pt", ".yaml", ".model", ".txt"}


def _innermost_file(tb: Any, writing: bool = False) -> str | None:
    """The innermost path-like local naming a data file (``writing``: one being written)."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)) and len(str(value)) < 4096:
                try:
                    path = Path(value)
                    # A bare name ("model.safetensors") is a shard name, not where it goes.
                    if path.suffix in DATA_SUFFIXES and len(path.parts) > 1 and (
                            path.is_file() or (writing and path.parent.is_dir())):
                        return str(path)
                except (OSError, ValueError, TypeError):
                    continue
    return None


def corrupt_file_message(exc: BaseException) -> str | None:
    if type(exc).__name__ not in CORRUPT_ERRORS:
        return None
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    if "No space left" in first or "os error 28" in first:  # safetensors reports a failed write this way
        where = _innermost_file(exc.__traceback__, writing=True) or "a file"
        return f"{where}: No space left on device (free some space, or write elsewhere)"
    where = _innermost_file(exc.__traceback__) or "a file"
    return f"{where}: unreadable or corrupt ({first})"


def checkpoint_write_message(exc: BaseException) -> str | None:
    """torch.save reports a failed write (full disk, unwritable folder) as a RuntimeError from its
    C++ zip writer, without the path; say what it means instead of the C++ frames."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or ("inline_container" not in text and "PytorchStreamWriter" not in text):
        return None
    where = _innermost_file(exc.__traceback__)
    return f"{where or 'a checkpoint'}: writing failed (disk full or folder not writable?)"


def add_device_flag(p: argparse.ArgumentParser) -> None:
    """The ``--device`` flag of every command that loads a bundle itself: one name, default and help.

    The value goes to ``nla.config.check_device`` / ``resolve_device`` (``auto``: cuda when available).
    """
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="nla",
        description="Natural Language Autoencoders: verbalize LLM activations and reconstruct them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    words = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("-")]
    wanted = COMMANDS.get(words[0]) if words else None
    modules = [wanted] if wanted else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # The tokenizers' thread pool warns (and can deadlock) when a process forks after using it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except NLAError as exc:
        _error_line(args.command, str(exc))
        return 2
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        _error_line(args.command, describe_os_error(exc))
        return 2
    except Exception as exc:
        message = corrupt_file_message(exc) or checkpoint_write_message(exc)
        if message is None:
            raise
        _error_line(args.command, message)
        return 2
    except KeyboardInterrupt:
        print(f"nla {args.command}: interrupted; finished work is saved, re-run to resume", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def _error_line(command: str, message: str) -> None:
    # A progress bar cut short by the error has no newline yet: close it, so the error gets
    # a line of its own.
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()
    print(f"nla {command}: error: {_one_line(message)}", file=sys.stderr)


def _one_line(text: str) -> str:
    """The message on one line (a wrapped library message must not look like several errors),
    with any URL's user-info and query values redacted (they can hold API keys)."""
    from nla.meta import redact_text

    return redact_text(" ".join(text.split()))


if __name__ == "__main__":
    sys.exit(main())
