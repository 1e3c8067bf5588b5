"""nla.data.corpus: every source kind, stable ids, and one-line errors that name the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla.data.corpus import builtin_documents, load_corpus
from nla.errors import NLAError

REPO = Path(__file__).resolve().parents[1]


def test_builtin_corpus() -> None:
    docs = builtin_documents()
    assert len(docs) > 200
    assert len({d.doc_id for d in docs}) == len(docs)
    assert all(d.doc_id.startswith("pydoc:") and d.text.strip() for d in docs)
    assert docs == builtin_documents(), "ids and order must not depend on the run"
    assert load_corpus("builtin", max_docs=5) == docs[:5]
    # Chunks are of similar size: long topics are cut, none is a giant.
    assert max(len(d.text) for d in docs) < 20_000


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("First document\nstill first.\n\n\n  \nSecond one.\n\nThird — ünïcode.\n", encoding="utf-8")
    docs = load_corpus(str(path))
    assert [d.text for d in docs] == ["First document\nstill first.", "Second one.", "Third — ünïcode."]
    assert [d.doc_id for d in docs] == ["notes.txt:0", "notes.txt:1", "notes.txt:2"]


def test_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha\n\nstill alpha")
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")  # not a text suffix: ignored
    docs = load_corpus(str(tmp_path))
    assert [(d.doc_id, d.text) for d in docs] == [("a.txt", "alpha\n\nstill alpha"), ("sub/b.md", "# beta")]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    rows = [{"id": "x1", "text": "one"}, {"id": "x2", "text": "  "}, {"text": "three", "other": 1}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_corpus(str(path))
    assert [(d.doc_id, d.text) for d in docs] == [("x1", "one"), ("c.jsonl:2", "three")]
    path2 = tmp_path / "d.jsonl"
    path2.write_text(json.dumps({"body": "hello", "key": 7}) + "\n")
    docs = load_corpus(str(path2), text_column="body", id_column="key")
    assert [(d.doc_id, d.text) for d in docs] == [("7", "hello")]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "content": ["a b", "c d", "e f"], "n": [1, 2, 3]}), path)
    docs = load_corpus(str(path), text_column="content", max_docs=2)
    assert [(d.doc_id, d.text) for d in docs] == [("1", "a b"), ("2", "c d")]


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name → (corpus path, expected message fragment)."""
    cases: dict[str, tuple[Path, str]] = {}

    def put(name: str, content: bytes, expect: str) -> None:
        path = tmp / name
        path.write_bytes(content)
        cases[name] = (path, expect)

    cases["missing.txt"] = (tmp / "missing.txt", "not found")
    put("empty.txt", b"", "empty")
    put("blank.txt", b" \n\n \n", "empty")
    put("empty.jsonl", b"\n", "empty")
    put("binary.txt", b"\x7fELF\x02\x01\x01\x00\x00\x00garbage", "binary")
    put("latin1.txt", "café au lait".encode("latin-1"), "not valid UTF-8")
    put("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n', "line 2 is not valid JSON")
    put("list.jsonl", b'["text"]\n', "line 1 is not a JSON object")
    put("wrongcol.jsonl", b'{"body": "x"}\n', "no column 'text'")
    put("number.jsonl", b'{"text": 5}\n', "non-text 'text'")
    put("garbage.parquet", b"PAR1\x00\x00garbage\xff\xfe", "not a readable Parquet")
    wrong = tmp / "wrongcol.parquet"
    pq.write_table(pa.table({"body": ["x"]}), wrong)
    cases["wrongcol.parquet"] = (wrong, "no column 'text'")
    empty_pq = tmp / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty_pq)
    cases["empty.parquet"] = (empty_pq, "empty")
    dup = tmp / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    cases["dup.jsonl"] = (dup, "appears twice")
    (tmp / "nofiles").mkdir()
    (tmp / "nofiles" / "data.bin").write_bytes(b"\x00")
    cases["nofiles"] = (tmp / "nofiles", "has no")
    return cases


def test_bad_input_errors_name_the_file(tmp_path: Path) -> None:
    for name, (path, expect) in _bad_inputs(tmp_path).items():
        with pytest.raises(NLAError) as err:
            load_corpus(str(path))
        message = str(err.value)
        assert name in message, (name, message)
        assert expect in message, (name, message)
        assert "\n" not in message, (name, message)


@pytest.mark.parametrize("name", ["binary.txt", "bad.jsonl"])
def test_bad_input_via_cli_is_one_line(tmp_path: Path, name: str) -> None:
    path, expect = _bad_inputs(tmp_path)[name]
    res = subprocess.run(
        [sys.executable, "-m", "nla.cli", "extract", "--model", "tiny:llama", "--corpus", str(path),
         "--out", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("nla extract: error: ") and name in lines[0] and expect in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not (tmp_path / "out").exists(), "a failed run must not leave an output folder"


def test_unknown_source_kind(tmp_path: Path) -> None:
    with pytest.raises(NLAError, match="corpus not found"):
        load_corpus(str(tmp_path / "nothing-here"))


# ---------------------------------------------------------------- hf: (streamed)
def _jsonl_shards(folder: Path, rows_per_shard: int, good_shards: int, bad_shards: int) -> None:
    """A local dataset folder of JSONL shards; the last ``bad_shards`` are not JSON at all."""
    folder.mkdir()
    n = 0
    for s in range(good_shards + bad_shards):
        path = folder / f"train-{s:05d}.jsonl"
        if s < good_shards:
            lines = []
            for _ in range(rows_per_shard):
                lines.append(json.dumps({"body": "" if n % 7 == 3 else f"document number {n}", "n": n}))
                n += 1
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            path.write_text("this shard is {not json and must never be read\n" * 50, encoding="utf-8")


def test_hf_source_streams_and_stops_after_the_documents_it_needs(tmp_path: Path) -> None:
    """``hf:FOLDER`` goes through ``datasets.load_dataset(..., streaming=True)`` (the packaged JSON
    builder on a local folder, as for a hub dataset). The shards after the first two are
    corrupt: loading the whole dataset fails on them, the streamed source never opens them."""
    import datasets

    folder = tmp_path / "corpus"
    _jsonl_shards(folder, rows_per_shard=20, good_shards=2, bad_shards=3)
    with pytest.raises(Exception):  # noqa: B017 - the materialising load is what must fail
        datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    docs = load_corpus(f"hf:{folder}", text_column="body", id_column="missing", max_docs=25)
    assert len(docs) == 25
    # Empty rows are skipped but keep their row number, so ids do not shift when text is empty.
    assert [d.doc_id for d in docs[:5]] == ["corpus:0", "corpus:1", "corpus:2", "corpus:4", "corpus:5"]
    assert docs[4].text == "document number 5"
    explicit = load_corpus(f"hf:{folder}::train", text_column="body", id_column="missing", max_docs=25)
    assert [d.text for d in explicit] == [d.text for d in docs]
    assert explicit[0].doc_id == "corpus::train:0"  # docs/formats.md: the source after its last /, then :<row>
    with_ids = load_corpus(f"hf:{folder}", text_column="body", id_column="n", max_docs=3)
    assert [d.doc_id for d in with_ids] == ["0", "1", "2"]
    # Asking for more than the good shards hold reaches a corrupt one: a one-line error.
    with pytest.raises(NLAError, match=r"^hf:.*reading row 40 failed"):
        load_corpus(f"hf:{folder}", text_column="body", max_docs=1000)


def test_hf_source_parses_config_and_split_and_names_bad_input(tmp_path: Path) -> None:
    from nla.data.corpus import parse_hf_source

    assert parse_hf_source("hf:org/name") == ("org/name", None, "train")
    assert parse_hf_source("hf:org/name:sample-10BT") == ("org/name", "sample-10BT", "train")
    assert parse_hf_source("hf:org/name:sample-10BT:validation") == ("org/name", "sample-10BT", "validation")
    assert parse_hf_source("hf:org/name::test") == ("org/name", None, "test")
    with pytest.raises(NLAError, match="expected hf:NAME"):
        parse_hf_source("hf:")
    with pytest.raises(NLAError, match="expected hf:NAME"):
        parse_hf_source("hf:a:b:c:d")
    folder = tmp_path / "c"
    _jsonl_shards(folder, rows_per_shard=5, good_shards=1, bad_shards=0)
    with pytest.raises(NLAError, match=r"no column 'text' .*body.*--text-column"):
        load_corpus(f"hf:{folder}")
    with pytest.raises(NLAError, match="cannot load dataset"):
        load_corpus(f"hf:{folder}::nosuchsplit", text_column="body")
    with pytest.raises(NLAError, match="cannot load dataset"):
        load_corpus(f"hf:{tmp_path / 'absent'}")
