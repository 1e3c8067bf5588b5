"""The shared field groups (nla/config_fields.py): every stage config takes device, dtype, seed,
LoRA, sampling and corpus settings from one declaration, and a wrong value in any of them is a
one-line error naming the field, however the config was read."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest

from nla import config_fields as groups
from nla.config import config_from_dict, resolve_config
from nla.data.extract import ExtractConfig
from nla.errors import NLAError
from nla.eval.suite import EvalConfig
from nla.label.runner import LabelConfig
from nla.serve.app import ServeConfig
from nla.train.rl import RLConfig
from nla.train.sft import SFTConfig
from nla.universal.cli import (
    AddModelConfig,
    FitDecConfig,
    FitEncConfig,
    UniversalEvalConfig,
    UniversalTrainConfig,
)
from nla.universal.extract import UniversalExtractConfig

STAGES: list[type] = [ExtractConfig, UniversalExtractConfig, LabelConfig, SFTConfig, RLConfig, EvalConfig,
                      ServeConfig, FitEncConfig, FitDecConfig, UniversalEvalConfig, UniversalTrainConfig,
                      AddModelConfig]
GROUPS: list[type] = [g for g in vars(groups).values()
                      if isinstance(g, type) and dataclasses.is_dataclass(g) and g.__module__ == groups.__name__]
# A stage field that shares a group field's name but not its meaning, so it is not the group's.
NOT_THE_GROUPS = {
    (LabelConfig, "temperature"): "the teacher's sampling temperature (default 0.7), not the AV's",
    (ServeConfig, "max_new_tokens"): "the most a request may ask for, not the length of one answer",
    (EvalConfig, "split"): "the split to evaluate, not the split fractions of an extraction",
}
# Group fields a stage declares again, each for a reason written next to it in the stage.
OVERRIDES = {
    (SFTConfig, "dtype"): "mixed precision is bf16 autocast or none: a narrower choice",
    (RLConfig, "lora_r"): "0 means full fine-tuning with a frozen reference copy",
    (RLConfig, "max_new_tokens"): "its own help: a cut-off answer gets the invalid reward",
    (EvalConfig, "max_new_tokens"): "a longer default (96)",
}


def group_fields() -> dict[str, type]:
    """field name → the group that declares it first (the most basic one)."""
    owner: dict[str, type] = {}
    for group in GROUPS:
        for name in inspect.get_annotations(group):
            owner.setdefault(name, group)
    return owner


def field(cls: type, name: str) -> dataclasses.Field[Any]:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


@pytest.mark.parametrize("cls", STAGES, ids=lambda c: c.__name__)
def test_every_shared_field_of_a_stage_comes_from_its_group(cls: type) -> None:
    """A stage that has `device` (or `seed`, `lora_r`, `top_p`, ...) inherits the group that
    declares it, so a field added to that group reaches the stage; the stage declares a group
    field again only where OVERRIDES says why, and then keeps the group's check."""
    own = set(inspect.get_annotations(cls))
    for name, group in group_fields().items():
        if name not in {f.name for f in dataclasses.fields(cls)} or (cls, name) in NOT_THE_GROUPS:
            continue
        assert issubclass(cls, group), f"{cls.__name__}.{name} is not {group.__name__}'s"
        mine, theirs = field(cls, name), field(group, name)
        if name in own:
            assert (cls, name) in OVERRIDES, f"{cls.__name__} declares {name} again"
            continue
        assert mine.metadata == theirs.metadata and mine.default == theirs.default, (cls.__name__, name)


def test_the_runtime_groups_reach_every_stage_that_runs_a_model() -> None:
    """Every stage but the CPU least-squares fit (fit-enc) runs on a device; every stage that
    loads a model from a spec also has its dtype; the trainers share the LoRA group."""
    assert [c.__name__ for c in STAGES if not issubclass(c, groups.DeviceFields)] == ["FitEncConfig"]
    for cls in (ExtractConfig, UniversalExtractConfig, LabelConfig, SFTConfig, RLConfig, EvalConfig, ServeConfig,
                AddModelConfig):
        assert issubclass(cls, groups.ModelFields), cls.__name__
    for cls in (ExtractConfig, UniversalExtractConfig, SFTConfig, RLConfig, EvalConfig, AddModelConfig):
        assert issubclass(cls, groups.RuntimeFields), cls.__name__
    assert issubclass(SFTConfig, groups.LoRAFields) and issubclass(RLConfig, groups.LoRAFields)
    assert issubclass(RLConfig, groups.SamplingFields) and issubclass(EvalConfig, groups.SamplingFields)


def test_an_override_keeps_the_groups_check() -> None:
    eval_tokens, group_tokens = field(EvalConfig, "max_new_tokens"), field(groups.AnswerFields, "max_new_tokens")
    assert eval_tokens.default == 96 and eval_tokens.metadata["check"] == group_tokens.metadata["check"]
    with pytest.raises(NLAError, match=r"^config: max_new_tokens: must be at least 1, got 0$"):
        config_from_dict(EvalConfig, {"max_new_tokens": 0})


# (field, a value of the wrong type as YAML writes it, the error after "FILE: ")
WRONG_TYPES = [
    ("seed", "ten", "seed: expected an integer, got 'ten'"),
    ("device", "[cuda]", "device: expected a string, got ['cuda']"),
    ("dtype", "16", "dtype: expected a string, got 16"),
    ("lora_r", "8.5", "lora_r: expected an integer, got 8.5"),
    ("lora_alpha", "yes", "lora_alpha: expected an integer, got True"),  # YAML 1.1: yes is a bool
    ("top_p", "high", "top_p: expected a number, got 'high'"),
    ("max_new_tokens", "{a: 1}", "max_new_tokens: expected an integer, got {'a': 1}"),
    ("docs_per_shard", "1e3", "docs_per_shard: expected an integer, got '1e3'"),
    ("generation_backend", "[vllm]", "generation_backend: expected a string, got ['vllm']"),
    ("progress", '"false"', "progress: expected true or false, got 'false'"),
]


@pytest.mark.parametrize(("name", "text", "message"), WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_a_wrong_type_in_a_group_field_is_one_line_naming_it(name: str, text: str, message: str,
                                                              tmp_path: Path) -> None:
    """For every stage that has the field, read from a YAML file as `--config` reads it."""
    path = tmp_path / "stage.yaml"
    path.write_text(f"{name}: {text}\n")
    # Overrides declare their own type (SFT's dtype is a Literal, which names its choices instead).
    stages = [c for c in STAGES if name in {f.name for f in dataclasses.fields(c)}
              and (c, name) not in NOT_THE_GROUPS and (c, name) not in OVERRIDES]
    assert stages
    for cls in stages:
        with pytest.raises(NLAError) as err:
            resolve_config(cls, argparse.Namespace(config=str(path)))
        assert str(err.value) == f"{path}: {message}", cls.__name__


@pytest.mark.parametrize(("values", "message"), [
    ({"dtype": "float8"}, "dtype: expected one of float32, bfloat16, float16, fp32, bf16, fp16, got 'float8'"),
    ({"seed": -1}, "seed: must be at least 0, got -1"),
    ({"top_p": 0}, "top_p: must be greater than 0, got 0"),
    ({"vllm_gpu_memory_utilization": 1.5}, "vllm_gpu_memory_utilization: must be at most 1, got 1.5"),
    ({"generation_backend": "tgi"}, "generation_backend: expected one of transformers, vllm, got 'tgi'"),
    ({"lora_alpha": 0}, "lora_alpha: must be at least 1, got 0"),
])
def test_a_group_fields_range_is_checked_in_every_stage(values: dict[str, Any], message: str) -> None:
    (name,) = values
    for cls in STAGES:
        if name in {f.name for f in dataclasses.fields(cls)} and (cls, name) not in OVERRIDES:
            with pytest.raises(NLAError, match="^run.yaml: " + message.replace("(", r"\(").replace(")", r"\)")):
                config_from_dict(cls, values, where="run.yaml")


def test_help_lists_the_stages_own_settings_before_the_shared_ones() -> None:
    from nla.config import add_config_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, ExtractConfig)
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings]
    assert flags.index("--out") < flags.index("--next-tokens") < flags.index("--seed") < flags.index("--corpus")
    assert len(flags) == len(set(flags)) == len(dataclasses.fields(ExtractConfig)) + 2  # -h, --config


def _entries() -> list[tuple[Any, Any, str]]:
    from nla.data.extract import extract
    from nla.eval.suite import run_eval
    from nla.label.runner import label
    from nla.train.rl import RLTrainer
    from nla.train.sft import train_sft
    from nla.universal.cli import cmd_eval, cmd_fit_dec, cmd_fit_enc, train_universal
    from nla.universal.extract import universal_extract

    return [
        (extract, ExtractConfig(), "extract: out is required (give --out)"),
        (universal_extract, UniversalExtractConfig(out="u"), "universal extract: models is required (give --models)"),
        (label, LabelConfig(), "label: data is required (give --data)"),
        (train_sft, SFTConfig(data="d"), "train: out is required (give --out)"),
        (RLTrainer, RLConfig(nla="n", data="d"), "train rl: out is required (give --out)"),
        (run_eval, EvalConfig(nla="n", out="o"), "eval: data is required (give --data)"),
        (cmd_fit_enc, FitEncConfig(data="d"), "fit-enc: model is required (give --model)"),
        (cmd_fit_dec, FitDecConfig(nla="n", data="d"), "fit-dec: model is required (give --model)"),
        (cmd_eval, UniversalEvalConfig(nla="n"), "universal eval: data is required (give --data)"),
        (train_universal, UniversalTrainConfig(data="d"), "universal train: out is required (give --out)"),
        # A bad value of a shared field, given through the Python API, is refused the same way.
        (extract, ExtractConfig(out="o", docs_per_shard=0), "extract: docs_per_shard: must be at least 1, got 0"),
        (label, LabelConfig(data="d", dtype="fp8"), "label: dtype: expected one of"),
    ]


@pytest.mark.parametrize("index", range(12))
def test_entry_functions_check_their_config_before_any_work(index: int, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Called from Python (no flags, no YAML), each stage's entry function runs the same
    nla.config.validate as the CLI: a missing required setting is one line naming its flag, and
    nothing is written (the relative paths above would land in the working folder)."""
    monkeypatch.chdir(tmp_path)
    entries = _entries()
    assert len(entries) == 12
    fn, cfg, message = entries[index]
    with pytest.raises(NLAError) as err:
        fn(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
