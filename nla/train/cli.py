"""`nla train`: one parser, one sub-subcommand per training method.

Each module in :data:`TRAIN_MODULES` exposes ``register_train(subparsers)`` and adds its own
subcommands (``av``, ``ar``, ``sft`` from :mod:`nla.train.sft`; ``rl`` from :mod:`nla.train.rl`).
"""

from __future__ import annotations

import importlib
from typing import Any

TRAIN_MODULES = [
    "nla.train.sft",
    "nla.train.rl",
]


def register(sub: Any) -> None:
    parser = sub.add_parser("train", help="train the AV and AR: av | ar | sft (both) | rl",
                            description="Train an NLA. Every method writes a complete bundle to --out, "
                            "checkpoints, metrics.jsonl and curves.png, and resumes with --resume.")
    methods = parser.add_subparsers(dest="train_method", metavar="METHOD")
    for name in TRAIN_MODULES:
        importlib.import_module(name).register_train(methods)

    def no_method(_args: Any) -> int:
        parser.print_help()
        return 1

    parser.set_defaults(func=no_method)
