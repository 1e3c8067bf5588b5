"""Names every stage agrees on, and the one atomic file writer (docs/design.md §3, §7).

A file name or column name spelled in two places drifts apart silently (a bundle saved under one
spelling, looked for under another); here each is defined once. Standard library only, so any
module (sidecar readers, the CLI's ``--help``) can import it without pulling in torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

VERSION = "0.1.0"  # the package version (`nla.__version__`), written into every sidecar and report

# ---------------------------------------------------------------- files (docs/design.md §3, §7)
META_NAME = "nla_meta.yaml"  # the sidecar of a dataset or a bundle
MEAN_VECTOR_FILE = "mean_vector.safetensors"  # μ of §6, in a dataset and in a bundle
VALUE_HEAD_FILE = "value_head.safetensors"  # the AR's head, in ar/ (§5)
ADAPTERS_DIR = "adapters"  # a universal bundle's per-model maps (§9), also in AlexWortega's layout
METRICS_FILE = "metrics.json"  # `nla eval`'s record
SAMPLES_FILE = "samples.jsonl"  # `nla eval`'s per-row samples

# ---------------------------------------------------------------- sidecar kinds
DATASET_KIND = "nla_dataset"
DATASET_SCHEMA_VERSION = 1
BUNDLE_KIND = "nla_bundle"
BUNDLE_SCHEMA_VERSION = 1
SINGLE_ROLE_KIND = "nla_single_role_bundle"  # our bundle with one half (nla.bundle.SingleRoleNLA)
EVAL_KIND = "nla_eval"
EVAL_SCHEMA_VERSION = 1  # bump on any change to metrics.json that breaks a reader

# ---------------------------------------------------------------- dataset columns (§3)
SPLITS = ("av_sft", "ar_sft", "rl", "eval")
TRAINING_SPLITS = ("av_sft", "ar_sft", "rl")  # μ is computed over these, never over eval
VECTOR_COLUMN = "activation_vector"


# ---------------------------------------------------------------- atomic writes
def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary sibling and rename it over ``path``: a kill mid-write leaves
    the old file or the new one, never half of one (and no temporary file on a full disk)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> None:
    """``json.dumps(data, indent=2, **dumps)`` written atomically (:func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(data, **({"indent": 2} | dumps)))
