"""The release registry, layout detection, offline behaviour and `nla releases`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nla.errors import NLAError
from nla.interop import detect_layout, load_release, releases
from nla.interop.registry import releases as read_registry


def test_shipped_registry_lists_real_releases_only() -> None:
    """The paper's four pairs (kitft README) and the community releases of issue 18, nothing invented."""
    known = releases()
    paper = known["qwen2.5-7b-L20"]
    assert (paper.layout, paper.repo_id, paper.ar_repo_id, paper.layer) == (
        "paper", "kitft/nla-qwen2.5-7b-L20-av", "kitft/nla-qwen2.5-7b-L20-ar", 20)
    assert {r.repo_id for r in known.values() if r.layout == "paper"} == {
        "kitft/nla-qwen2.5-7b-L20-av", "kitft/nla-gemma3-12b-L32-av", "kitft/nla-gemma3-27b-L41-av",
        "kitft/Llama-3.3-70B-NLA-L53-av"}
    assert {r.layout for r in known.values()} == {"paper", "anicka", "solshine", "universal"}
    assert known["solshine-gemma-4-e2b-L23-v0.0.1"].options == {"ar_layer": 17}
    assert known["anicka-qwen2.5-7b-L20-v2"].options == {"depth_pct": 73}
    for r in known.values():
        assert r.notes and r.publisher and r.base_model
        assert not any(word in r.repo_id for word in ("nla-community", "example", "nanonla/"))


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{layout: paper, repo_id: a/b, base_model: m, layer: 3}", "ar_repo_id"),
        ("{layout: weird, repo_id: a/b, base_model: m, layer: 3}", "'layout'"),
        ("{layout: universal, repo_id: a/b, base_model: m}", "'layer'"),
        ("{layout: universal, repo_id: a/b, base_model: m, layer: 2, options: {depth_pct: 3}}", "depth_pct"),
    ],
)
def test_broken_registry_entry_names_the_field(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(f"releases:\n  x: {entry}\n")
    with pytest.raises(NLAError, match=message):
        read_registry(path)


@pytest.mark.parametrize("source", ["qwen2.5-7b-L20", "someone/some-nla-av"])
def test_offline_release_says_it_needs_the_hub(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nla import NLA

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NLAError) as err:
        NLA.from_pretrained(source)
    message = str(err.value)
    assert "needs the Hugging Face hub" in message and "local-dir" in message and "nla import DIR" in message
    assert "\n" not in message


def test_cli_offline_import_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "nla.cli", "import", "qwen2.5-7b-L20", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs the Hugging Face hub" in lines[0]


def test_unknown_sources_and_layouts(tmp_path: Path) -> None:
    with pytest.raises(NLAError, match="known release"):
        load_release("no-such-release")
    with pytest.raises(NLAError, match="not a known NLA layout"):
        detect_layout(tmp_path)
    (tmp_path / "nla_meta.yaml").write_text("kind: something_else\n")
    with pytest.raises(NLAError, match="'kind' is 'something_else'"):
        detect_layout(tmp_path)
    (tmp_path / "nla_meta.yaml").write_text("kind: nla_dataset\nschema_version: 1\n")
    with pytest.raises(NLAError, match="a dataset, not an NLA"):
        detect_layout(tmp_path)


def test_releases_command_lists_names(capsys: pytest.CaptureFixture[str]) -> None:
    from nla.cli import main

    assert main(["releases"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-7b-L20" in out and "kitft/nla-qwen2.5-7b-L20-av" in out and "Solshine/gemma-4-e2b" in out
    assert main(["releases", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["qwen2.5-7b-L20"]["layout"] == "paper"


def test_native_bundle_detected(tmp_path: Path) -> None:
    from nla import NLA
    from nla.interop import import_layout

    nla = NLA.initialize("tiny:gpt2", dtype="float32", device="cpu")
    nla.save_pretrained(tmp_path / "b")
    assert detect_layout(tmp_path / "b") == "bundle"
    again = import_layout(tmp_path / "b")
    assert again.meta.d_model == 32


def test_option_that_does_not_apply_is_named(tmp_path: Path) -> None:
    from nla import NLA
    from nla.interop import import_layout

    NLA.initialize("tiny:gpt2", dtype="float32", device="cpu").save_pretrained(tmp_path / "b")
    with pytest.raises(NLAError, match="--injection does not apply to the bundle layout"):
        import_layout(tmp_path / "b", injection="add")


def test_loader_table_is_flat_and_complete() -> None:
    from nla.interop import LOADERS

    assert set(LOADERS) == {"bundle", "paper", "nanonla", "anicka", "solshine", "universal", "single"}
    assert all(callable(f) for f in LOADERS.values())


@pytest.mark.parametrize(
    ("name", "role", "partner"),
    [
        ("kitft/nla-qwen2.5-7b-L20-av", "av", "kitft/nla-qwen2.5-7b-L20-ar"),
        ("kitft/Llama-3.3-70B-NLA-L53-ar", "ar", "kitft/Llama-3.3-70B-NLA-L53-av"),
        ("anicka/nla-qwen2.5-7b-L20-av-v2", "av", "anicka/nla-qwen2.5-7b-L20-ar-v2"),
        ("Solshine/gemma-4-e2b-nla-L23-ar-v0_0_1", "ar", "Solshine/gemma-4-e2b-nla-L23-av-v0_0_1"),
        ("runs/my-avocado_av", "av", "runs/my-avocado_ar"),
        ("pair/av", "av", "pair/ar"),
        ("anicka/nla-qwen3-4b-v2", "av", None),
    ],
)
def test_publishers_pair_names(name: str, role: str, partner: str | None) -> None:
    from nla.interop.common import partner_candidates

    got = [p.as_posix() for p in partner_candidates(Path(name), role)]
    assert got == ([partner] if partner else [])
