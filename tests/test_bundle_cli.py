"""`nla init`, `nla verbalize`, `nla reconstruct` run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def nla(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nla.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess[str], match: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert match in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = nla("init", "--model", "tiny:qwen3", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "untrained bundle for tiny:qwen3, layer 2" in proc.stdout
    assert (out / "nla_meta.yaml").exists()
    return out


def test_verbalize_vectors(run: Path, tmp_path: Path) -> None:
    torch.save(torch.randn(2, 64), tmp_path / "v.pt")
    proc = nla("verbalize", "--nla", run, "--vectors", tmp_path / "v.pt", "--max-new-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    # A random model's raw text may hold newlines itself: look for the row prefixes only.
    assert proc.stdout.startswith("[0] ") and "\n[1] " in proc.stdout
    assert "[2]" not in proc.stdout


def test_verbalize_text_position_json(run: Path) -> None:
    proc = nla("verbalize", "--nla", run, "--text", "The for statement iterates.", "--position", "2",
               "--max-new-tokens", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 1 and rows[0]["position"] == 2
    assert {"token", "context", "explanation", "raw", "mse_nrm", "cosine"} <= set(rows[0])


def test_reconstruct_json(run: Path, tmp_path: Path) -> None:
    proc = nla("reconstruct", "--nla", run, "a loop", "a function", "--json", "--out", tmp_path / "r.safetensors")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["text"] for r in rows] == ["a loop", "a function"]
    assert len(rows[0]["vector"]) == 64
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "r.safetensors"))["vectors"]
    assert torch.allclose(saved, torch.tensor([r["vector"] for r in rows]))


def test_bad_input_gives_one_line_and_exit_2(run: Path, tmp_path: Path) -> None:
    torch.save(torch.randn(2, 63), tmp_path / "narrow.pt")
    _one_line_error(nla("verbalize", "--nla", run, "--vectors", tmp_path / "narrow.pt"),
                    "vector width 63 does not match the model's d_model=64")
    _one_line_error(nla("verbalize", "--nla", run, "--vectors", tmp_path / "narrow.pt", "--position", "1"),
                    "--position needs --text")
    _one_line_error(nla("init", "--model", "tiny:qwen3", "--out", run), "exists and is not empty")
