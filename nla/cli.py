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
    "serve": "nla.serve.cli",
    "search": "nla.search",
    "steer": "nla.steer",
    "import": "nla.interop.cli",
    "releases": "nla.interop.cli",
    "universal": "nla.universal.cli",
    "run": "nla.pipeline",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
        print(f"nla {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nla {args.command}: interrupted; finished work is saved, re-run to resume", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
