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
from typing import NoReturn

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
USER_OS_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR,
                  errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ENOENT}


def describe_os_error(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else "a file"
    cause = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        cause += " (free some space, or write elsewhere)"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        cause += " (choose a folder you can write to)"
    return f"{where}: {cause}"


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
        print(f"nla {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            raise
        print(f"nla {args.command}: error: {_one_line(describe_os_error(exc))}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # torch.save reports a failed write (full disk, unwritable folder) as a RuntimeError from
        # its C++ zip writer, without the path; say what it means instead of the C++ frames.
        if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
            raise
        print(f"nla {args.command}: error: writing a checkpoint failed (disk full or folder not writable?)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nla {args.command}: interrupted; finished work is saved, re-run to resume", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def _one_line(text: str) -> str:
    """The message on one line (a wrapped library message must not look like several errors),
    with any URL's user-info and query values redacted (they can hold API keys)."""
    from nla.meta import redact_text

    return redact_text(" ".join(text.split()))


if __name__ == "__main__":
    sys.exit(main())
