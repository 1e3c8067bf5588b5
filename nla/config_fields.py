"""The field groups that several stage configs share, declared once (issue 16, item 2).

A stage config inherits the groups it uses (``class ExtractConfig(CorpusFields, RuntimeFields)``),
so a setting such as ``device`` has one name, one default, one help line and one check in every
command, and a field added to a group here reaches every stage that has the group. Inheriting
keeps each config flat: the YAML keys, flags and saved ``*_config.yaml`` are the field names,
exactly as if the stage declared them itself. A stage whose default really differs (``nla eval``
writes longer answers) redeclares that one field, which keeps its place and its check.

Checks live on the fields (``opt(ge=..., choices=...)``), and :func:`nla.config.validate` applies
them whether the value came from a flag, a YAML file or the Python API; devices are checked
there too (``nla.config.check_device``). ``nla <stage> --help`` lists each group under its own
heading, after the stage's own settings (:func:`nla.config.add_config_args`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nla.config import DTYPE_CHOICES, opt


def override(group: type, name: str, default: Any, help: str | None = None) -> Any:
    """``group``'s field ``name`` with this stage's own default (and help): the check stays the group's.

    For the few stages whose default really differs (``nla eval`` writes longer answers than RL
    samples); redeclaring the field with ``opt()`` would drop the group's range check.
    """
    base = group.__dataclass_fields__[name]  # type: ignore[attr-defined]
    meta = {**base.metadata, **({"help": help} if help is not None else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# Generation backends of `train rl`, `eval` and `serve` (nla/train/generation.py runs them).
BACKENDS = ("transformers", "vllm")


@dataclass
class DeviceFields:
    """device"""

    device: str = opt("auto", help="cpu, cuda, cuda:N, mps or auto (auto: cuda when available; under "
                                   "`accelerate launch`: each process's own device)")


@dataclass
class ModelFields(DeviceFields):
    """model loading"""

    dtype: str = opt("float32", help="dtype the models are loaded in (vectors are always kept in fp32)",
                     choices=DTYPE_CHOICES)


@dataclass
class SeedFields:
    """seed"""

    seed: int = opt(0, help="seed of every random choice (rows, positions, data order, sampling): the same "
                            "seed repeats a run", ge=0)


@dataclass
class RuntimeFields(ModelFields, SeedFields):
    """runtime: device, dtype, seed"""


@dataclass
class LoRAFields:
    """LoRA"""

    lora_r: int = opt(16, help="LoRA rank", ge=1)
    lora_alpha: int = opt(32, help="LoRA alpha (the update is scaled by alpha / r)", ge=1)


@dataclass
class AnswerFields:
    """AV answers"""

    max_new_tokens: int = opt(64, help="most tokens the AV writes per explanation", ge=1)


@dataclass
class SamplingFields(AnswerFields):
    """sampling"""

    temperature: float = opt(1.0, help="sampling temperature (0: greedy)", ge=0)
    top_p: float = opt(1.0, help="nucleus sampling threshold", gt=0, le=1)


@dataclass
class BackendFields:
    """generation backend"""

    generation_backend: str = opt("transformers", help="'transformers' (KV cache + injection hook) or 'vllm'",
                                  choices=BACKENDS)
    vllm_gpu_memory_utilization: float = opt(0.3, help="fraction of GPU memory vLLM may take", ge=0, le=1)


@dataclass
class ProgressFields:
    """progress"""

    progress: bool = opt(True, help="show a progress bar")


@dataclass
class LoggingFields(ProgressFields):
    """logging"""

    tensorboard: bool = opt(False, help="also log to TensorBoard (OUT/tensorboard) if installed")
    wandb: bool = opt(False, help="also log to Weights & Biases if installed (key from WANDB_API_KEY)")
    wandb_project: str = opt("nla", help="W&B project")


@dataclass
class CorpusFields:
    """corpus"""

    corpus: str = opt("builtin", help="'builtin', a text/JSONL/Parquet file, a folder of .txt files, or "
                                      "hf:NAME[:CONFIG[:SPLIT]] (streamed)")
    text_column: str = opt("text", help="text column of JSONL/Parquet/HF corpora")
    id_column: str = opt("id", help="document id column of JSONL/Parquet/HF corpora (row number if absent)")
    docs: int | None = opt(None, help="use only the first N documents", ge=1)
    split: str = opt("av_sft=0.4,ar_sft=0.3,rl=0.2,eval=0.1", help="document-level split fractions")
    docs_per_shard: int = opt(256, help="documents per Parquet shard (the unit of resume)", ge=1)
