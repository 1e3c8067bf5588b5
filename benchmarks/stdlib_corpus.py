"""A second offline corpus the embedded default never trained on: standard-library docstrings.

The default NLA trains on ``pydoc_data.topics`` (the language reference). This writes the
docstrings of standard-library modules, classes and functions — the same language, another
register (API documentation rather than the reference manual) — as a JSONL corpus, one
document per module, so ``nla extract`` + ``nla eval`` can show how far the NLA generalises:

    .venv/bin/python benchmarks/stdlib_corpus.py --out out/stdlib.jsonl
    nla extract --corpus out/stdlib.jsonl --out out/stdlib_data --docs 120 --positions-per-doc 4 \\
        --seq-len 256 --split eval=1.0
    nla eval --nla runs/default/sft --data out/stdlib_data --split eval --out out/stdlib_eval ...

Deterministic: modules in sorted order, members in definition order; modules that print,
need a display or are missing on this platform are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "pydoc_data"}


def module_text(name: str, min_chars: int) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = importlib.import_module(name)
    except Exception:  # any import failure just means "not on this platform"
        return None
    parts = [inspect.getdoc(mod) or ""]
    for attr, value in vars(mod).items():
        if attr.startswith("_") or getattr(value, "__module__", None) != name:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            doc = inspect.getdoc(value)
            if doc:
                parts.append(f"{attr}: {doc}")
    text = "\n\n".join(p for p in parts if p.strip())
    return text if len(text) >= min_chars else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSONL file to write (fields id, text)")
    ap.add_argument("--min-chars", type=int, default=1500, help="skip modules with less documentation")
    args = ap.parse_args()
    names = sorted(n for n in sys.stdlib_module_names if n not in SKIP and not n.startswith("_"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w") as f:
        for name in names:
            text = module_text(name, args.min_chars)
            if text:
                f.write(json.dumps({"id": name, "text": text}) + "\n")
                n += 1
    print(f"{out}: {n} modules")


if __name__ == "__main__":
    main()
