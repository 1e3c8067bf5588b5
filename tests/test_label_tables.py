"""Labels are their own output (docs/design.md §3, "Labels"): one table per teacher, joined by
(doc_id, position), never a mix, and datasets labelled the old way (in place) still open.

The two teachers are the offline lens teacher on the tiny llama and the fake OpenAI-compatible
server of nla/label/testing.py, whose answer is a known function of the passage
(``fake_features``), so every joined label can be checked against its own row's context.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla.cli import main
from nla.data.store import LABELS_META, ActivationDataset, LabelTable
from nla.errors import NLAError
from nla.label.prompt import format_explanation, parse_analysis
from nla.label.runner import LabelConfig, label
from nla.label.testing import FAKE_MODEL, FakeTeacherServer
from nla.meta import read_yaml, write_yaml

FAKE = f"openai:{FAKE_MODEL}"
FAKE_TABLE = f"openai-{FAKE_MODEL}"


@pytest.fixture
def data(tiny_dataset: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-tables")


def fake_label(context: str) -> str:
    from nla.label.testing import fake_features

    return format_explanation(fake_features(context))


def is_lens(text: str | None) -> bool:
    features = parse_analysis(f"<analysis>\n{text}\n</analysis>") if text is not None else None
    return features is not None and [f.split()[0] for f in features] == ["ends", "predicts", "about"]


def fake_cfg(data: Path | str, url: str, **kw: object) -> LabelConfig:
    base = dict(data=str(data), teacher=FAKE, base_url=f"{url}/v1", concurrency=8, backoff=0.02, progress=False)
    base.update(kw)
    return LabelConfig(**base)  # type: ignore[arg-type]


def lens_cfg(data: Path | str, **kw: object) -> LabelConfig:
    base = dict(data=str(data), teacher="lens", device="cpu", batch_size=64, progress=False)
    base.update(kw)
    return LabelConfig(**base)  # type: ignore[arg-type]


def digest(folder: Path) -> dict[str, str]:
    """The dataset's own files (its shards and sidecar), by content."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in (".parquet", ".yaml")
            and p.name != "label_config.yaml"}


def test_a_second_teacher_never_mixes_with_the_first(data: Path, api_key: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    before = digest(data)
    # Teacher one labels only part of the dataset: the old runner's second teacher then filled
    # the remaining rows of the same column, a silent mix.
    first = label(lens_cfg(data, limit=50))
    assert first.labelled == 50
    with FakeTeacherServer() as server:
        second = label(fake_cfg(data, server.url))
    assert second.todo == second.labelled == 160  # every row, not just the 110 lens left empty
    assert digest(data) == before, "labeling rewrote the dataset itself"

    lens = ActivationDataset.open(data, labels="lens").rows()
    fake = ActivationDataset.open(data / "labels" / FAKE_TABLE).rows()
    assert sum(r["explanation"] is not None for r in lens) == 50
    assert all(is_lens(r["explanation"]) for r in lens if r["explanation"] is not None)
    assert all(r["explanation"] == fake_label(r["context"]) for r in fake)
    assert (ActivationDataset.open(data, labels="lens").labeling or {})["teacher"] == "lens:tiny:llama"
    assert (ActivationDataset.open(data, labels=FAKE_TABLE).labeling or {})["teacher"] == FAKE

    # Two tables and none chosen: the dataset opens (vectors need no labels), but reading
    # explanations is one error naming both tables and how to choose.
    both = ActivationDataset.open(data)
    assert len(both.vectors()) == 160
    with pytest.raises(NLAError, match=r"2 labels tables: lens \(lens:tiny:llama\), openai-fake-teacher"):
        both.rows()
    capsys.readouterr()
    assert main(["train", "sft", "--data", str(data), "--model", "tiny:llama", "--out", str(data.parent / "r"),
                 "--device", "cpu", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "labels tables" in err and "--data" in err

    # Writing the fake teacher into the lens table is refused, naming both teachers...
    with FakeTeacherServer() as server:
        url = f"{server.url}/v1"
        args = ["label", "--data", str(data), "--teacher", FAKE, "--base-url", url, "--no-progress",
                "--out", str(data / "labels" / "lens")]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "lens:tiny:llama@lens-v2" in err and f"openai:{FAKE_MODEL}" in err and "--force" in err
        assert server.stats.total == 0
        assert sum(r["explanation"] is not None for r in ActivationDataset.open(data, labels="lens").rows()) == 50
        # ...and --force replaces the whole table: one teacher's labels only, never 50 + 110.
        assert main([*args, "--force"]) == 0
    forced = ActivationDataset.open(data, labels="lens")
    assert (forced.labeling or {})["teacher"] == FAKE
    assert all(r["explanation"] == fake_label(r["context"]) for r in forced.rows())


def test_join_gives_each_row_its_own_label(data: Path, api_key: None) -> None:
    with FakeTeacherServer() as server:
        label(fake_cfg(data, server.url, splits=["av_sft", "eval"]))
    table = data / "labels" / FAKE_TABLE
    # Rows are matched by (doc_id, position), not by order: reverse every part on disk.
    for part in table.glob("*.parquet"):
        t = pq.read_table(part)
        pq.write_table(t.take(pa.array(range(t.num_rows - 1, -1, -1))), part)
    ds = ActivationDataset.open(data)
    rows = ds.rows()
    assert len(rows) == 160
    for r in rows:
        want = fake_label(r["context"]) if r["split"] in ("av_sft", "eval") else None
        assert r["explanation"] == want, (r["doc_id"], r["position"])
    # The same columns, in the same order, as a dataset labelled in place.
    full = ds.table()
    assert full.column_names == ["doc_id", "position", "context", "activation_vector", "split", "explanation"]
    assert full.column("explanation").to_pylist() == [r["explanation"] for r in rows]
    # A column subset without the join keys, filtered by split, reads the same labels.
    only = ds.table(["explanation"], split="eval")
    assert only.column_names == ["explanation"]
    assert only.column("explanation").to_pylist() == [r["explanation"] for r in rows if r["split"] == "eval"]
    # Labels made for another extraction are refused, not joined onto the wrong passages.
    meta = read_yaml(data / "nla_meta.yaml")
    meta["sampling"]["seed"] = 123
    write_yaml(data / "nla_meta.yaml", meta)
    with pytest.raises(NLAError, match="another extraction"):
        ActivationDataset.open(data)


def test_resume_into_a_table_and_by_its_folder(data: Path, api_key: None) -> None:
    """A run stopped part way (here by --limit; test_label.py kills one with SIGKILL) resumes
    into the same table, given either the dataset or the table folder as --data."""
    out = data.parent / "elsewhere"
    with FakeTeacherServer() as server:
        assert label(fake_cfg(data, server.url, limit=70, out=str(out))).labelled == 70
        again = label(fake_cfg(out, server.url))
        assert again.todo == 90 and server.stats.total == 160
    rows = ActivationDataset.open(out).rows()
    assert all(r["explanation"] == fake_label(r["context"]) for r in rows)
    assert LabelTable.open(out).count() == 160
    assert not (data / "labels").exists()  # --out put the table elsewhere; the dataset knows nothing of it
    assert read_yaml(out / LABELS_META)["dataset"] == "../data"


def old_layout(data: Path, teacher: str) -> list[str]:
    """Label `data` the way `nla label` did before labels tables: the explanation column of each
    shard rewritten in place (read_shard → set_column → replace_shard) and `extra.labeling` in
    the dataset sidecar."""
    ds = ActivationDataset.open(data)
    written = []
    for shard, table in ds.iter_shards():
        texts = [f"- old label for {d} at {p}\n- second feature of the row" for d, p in
                 zip(table.column("doc_id").to_pylist(), table.column("position").to_pylist())]
        i = table.column_names.index("explanation")
        ds.replace_shard(shard, table.set_column(i, "explanation", pa.array(texts, pa.string())))
        written += texts
    ds.meta.extra["labeling"] = {"teacher": teacher, "prompt_version": "nla-teacher-v1", "rows_labelled": len(written)}
    ds.save_meta()
    return written


def test_a_dataset_labelled_in_place_still_opens(data: Path, api_key: None, capsys: pytest.CaptureFixture[str]) -> None:
    written = old_layout(data, "openai:old-teacher")
    ds = ActivationDataset.open(data)
    assert ds.labels is None and [r["explanation"] for r in ds.rows()] == written
    assert (ds.labeling or {})["teacher"] == "openai:old-teacher"
    # SFT reads it as before (one step is enough to show the labels reach the trainer).
    out = data.parent / "run"
    assert main(["train", "sft", "--data", str(data), "--model", "tiny:llama", "--out", str(out), "--device", "cpu",
                 "--max-steps", "1", "--ar-max-steps", "1", "--batch-size", "2", "--max-length", "160",
                 "--eval-every", "0", "--no-progress"]) == 0, capsys.readouterr().err
    # A new table on it is read instead of the column inside, never merged with it.
    with FakeTeacherServer() as server:
        label(fake_cfg(data, server.url, limit=10))
    assert "openai:old-teacher" in capsys.readouterr().err  # the note about the column inside
    rows = ActivationDataset.open(data).rows()
    assert sum(r["explanation"] is not None for r in rows) == 10
    assert all(r["explanation"] in (None, fake_label(r["context"])) for r in rows)
    assert ActivationDataset.open(data).table(["explanation"]).column("explanation").null_count == 150


def test_a_single_file_dataset_gets_its_table_beside_it(tiny_dataset: Path, tmp_path: Path, api_key: None) -> None:
    from nla.data.store import write_single_file

    source = ActivationDataset.open(tiny_dataset)
    path = tmp_path / "pub.parquet"
    write_single_file(path, source.table().drop(["explanation"]),
                      {"base_model": source.meta.base_model, "d_model": source.d_model, "layer_index": 2})
    with FakeTeacherServer() as server:
        label(fake_cfg(path, server.url, limit=40))
    assert (tmp_path / "pub.parquet.labels" / FAKE_TABLE / "pub.parquet").exists()
    rows = ActivationDataset.open(path).rows()
    assert sum(r["explanation"] is not None for r in rows) == 40
    assert all(r["explanation"] in (None, fake_label(r["context"])) for r in rows)
    assert pq.read_schema(path).names == source.table().drop(["explanation"]).column_names  # file untouched
