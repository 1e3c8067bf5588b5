"""Shared fixtures: no network, tiny models, small datasets built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# The same examples on every run: a property test that fails in CI fails the same way here.
settings.register_profile("nla", derandomize=True)
settings.load_profile("nla")

# Tests never touch a hub: a lookup would hang or fail on an offline CI machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_ARCHS = ["gemma", "gpt2", "llama", "qwen2", "qwen3"]


def make_dataset(out: Path, arch: str = "llama", docs: int = 40, **overrides: object) -> Path:
    """Extract a small activation dataset from the built-in corpus with a tiny model."""
    from nla.data.extract import ExtractConfig, extract

    cfg = ExtractConfig(
        out=str(out), model=f"tiny:{arch}", layer=None, docs=docs, positions_per_doc=4,
        min_position=8, seq_len=128, batch_size=8, device="cpu",
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    extract(cfg)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-document tiny:llama dataset (layer 2 of 4), shared read-only by tests."""
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny_llama")
