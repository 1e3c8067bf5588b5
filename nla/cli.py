"""The `nla` command: one subcommand per pipeline stage.

Each stage module exposes ``register(subparsers)``; errors a user can fix (:class:`NLAError`)
print as one line naming the cause, with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from nla.errors import NLAError

# Stage modules, in pipeline order; each adds its own subcommand(s).
COMMAND_MODULES = [
    "nla.data.extract",
    "nla.label.runner",
    "nla.bundle_cli",
    "nla.interop.cli",
    "nla.train.cli",
    "nla.eval.cli",
    "nla.serve.cli",
    "nla.universal.cli",
    "nla.pipeline",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nla",
        description="Natural Language Autoencoders: verbalize LLM activations and reconstruct them.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Offline by default: the embedded models need no hub, and a stray lookup would hang.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except NLAError as exc:
        print(f"nla {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nla {args.command}: interrupted; finished work is saved, re-run to resume", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
