"""nla.data.store: fixed-size vector storage, the shard folder, the published single-file layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nla.data.store import (
    VECTOR_COLUMN,
    ActivationDataset,
    arrow_to_vectors,
    dataset_schema,
    make_table,
    nice_ceil,
    normalized_mean,
    sidecar_for_file,
    vectors_to_arrow,
    write_single_file,
)
from nla.errors import NLAError

finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(0, 7), st.integers(1, 9)), elements=finite32))
def test_vectors_round_trip(vectors: np.ndarray) -> None:
    column = vectors_to_arrow(vectors)
    assert pa.types.is_fixed_size_list(column.type) and column.type.list_size == vectors.shape[1]
    back = arrow_to_vectors(pa.chunked_array([column]), vectors.shape[1])
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back.reshape(vectors.shape), vectors)


@settings(max_examples=30, deadline=None)
@given(vectors=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5)), elements=finite32),
       chunks=st.integers(1, 3))
def test_round_trip_through_parquet_in_chunks(vectors: np.ndarray, chunks: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    table = make_table({"doc_id": [f"d{i}" for i in range(len(vectors))]}, vectors, vectors.shape[1])
    path = tmp_path_factory.mktemp("rt") / "t.parquet"
    pq.write_table(table, path, row_group_size=max(1, len(vectors) // chunks))
    back = pq.read_table(path)
    assert back.schema.field(VECTOR_COLUMN).type == pa.list_(pa.float32(), vectors.shape[1])
    np.testing.assert_array_equal(arrow_to_vectors(back.column(VECTOR_COLUMN)), vectors)


def test_torch_input_and_bad_shapes() -> None:
    t = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    np.testing.assert_array_equal(arrow_to_vectors(vectors_to_arrow(t)), t.float().numpy())
    with pytest.raises(NLAError, match="2-D"):
        vectors_to_arrow(np.zeros(3, np.float32))
    with pytest.raises(NLAError, match="d_model=4"):
        arrow_to_vectors(vectors_to_arrow(np.zeros((2, 3), np.float32)), 4)
    ragged = pa.array([[1.0, 2.0], [3.0]], pa.list_(pa.float32()))
    with pytest.raises(NLAError, match="different lengths"):
        arrow_to_vectors(ragged)
    empty = pa.chunked_array([], type=pa.list_(pa.float32(), 3))
    assert arrow_to_vectors(empty, 3).shape == (0, 3)
    assert arrow_to_vectors(pa.array([], pa.list_(pa.float32())), 3).shape == (0, 3)
    with pytest.raises(NLAError, match="1 null rows"):
        arrow_to_vectors(pa.array([[1.0, 2.0], None, [3.0, 4.0]], pa.list_(pa.float32(), 2)))


def test_schema_is_fixed_size_fp32() -> None:
    schema = dataset_schema(5)
    assert schema.field(VECTOR_COLUMN).type == pa.list_(pa.float32(), 5)
    assert schema.field("position").type == pa.int32()
    assert schema.names == ["doc_id", "position", "context", VECTOR_COLUMN, "split", "explanation"]
    table = make_table({"doc_id": ["a"], "position": [3]}, np.ones((1, 5), np.float32), 5)
    assert table.column("explanation").null_count == 1 and table.column("split").null_count == 1


@pytest.mark.parametrize(
    ("x", "want"),
    [(0.0, 1.0), (-3.0, 1.0), (float("inf"), 1.0), (float("nan"), 1.0), (1.0, 1.1), (7.3, 7.4),
     (9.95, 10.0), (99.0, 100.0), (123.4, 130.0), (0.0123, 0.013), (3.14159, 3.2), (58.0, 59.0)],
)
def test_nice_ceil(x: float, want: float) -> None:
    assert nice_ceil(x) == pytest.approx(want)


@settings(max_examples=100, deadline=None)
@given(st.floats(min_value=1e-12, max_value=1e12, allow_nan=False))
def test_nice_ceil_is_just_above(x: float) -> None:
    y = nice_ceil(x)
    assert x < y <= x * 1.2 + 1e-12
    # Two significant figures at most.
    mantissa = y / 10 ** np.floor(np.log10(y))
    assert abs(round(mantissa, 1) - mantissa) < 1e-6


# ------------------------------------------------------------------ published single-file layout
def _published(tmp_path: Path, fixed: bool, d: int = 6, n: int = 5) -> tuple[Path, np.ndarray]:
    """A file laid out like the paper's released data: variable- or fixed-size list vectors,
    integer doc ids, extra columns, and a nested ``extraction`` block in the sidecar."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, d)).astype(np.float32)
    vtype = pa.list_(pa.float32(), d) if fixed else pa.list_(pa.float32())
    table = pa.table({
        "doc_id": pa.array([10, 10, 11, 12, 12], pa.int64()),
        "activation_vector": pa.array(vectors.tolist(), vtype),
        "n_raw_tokens": pa.array([100] * n, pa.int32()),
        "detokenized_text_truncated": pa.array([f"text {i}" for i in range(n)]),
    })
    path = tmp_path / "base.parquet"
    pq.write_table(table, path)
    sidecar = {
        "kind": "nla_dataset",
        "schema_version": 1,
        "dataset_id": "base",
        "stage": "base",
        "row_count": n,
        "extraction": {"base_model": "Qwen/Qwen2.5-7B-Instruct", "d_model": d, "layer_index": 20,
                       "norm": "none", "corpus": "fineweb", "corpus_slice": {"start": 0, "end": 3},
                       "positions_per_doc": 2},
        "tokens": {"injection_char": "㈠", "injection_token_id": 151665},
        "prompt_templates": {"actor": "<concept>{injection_char}</concept>"},
    }
    Path(str(path) + ".nla_meta.yaml").write_text(yaml.safe_dump(sidecar, allow_unicode=True))
    return path, vectors


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed_list", "variable_list"])
def test_open_published_single_file(tmp_path: Path, fixed: bool) -> None:
    path, vectors = _published(tmp_path, fixed)
    assert sidecar_for_file(path) == Path(str(path) + ".nla_meta.yaml")
    ds = ActivationDataset.open(path)
    assert ds.is_single_file and ds.shards == [path]
    assert ds.d_model == 6 and ds.meta.layer_index == 20
    assert ds.meta.base_model == "Qwen/Qwen2.5-7B-Instruct"
    assert ds.meta.extra["tokens"]["injection_token_id"] == 151665
    assert len(ds) == 5 and ds.meta.rows == 5
    np.testing.assert_array_equal(ds.vectors().numpy(), vectors)
    rows = ds.rows()
    assert [r["doc_id"] for r in rows] == ["10", "10", "11", "12", "12"]
    assert {r["split"] for r in rows} == {"eval"}  # no split column: all held out
    assert ds.vectors("eval").shape == (5, 6) and ds.vectors("av_sft").shape == (0, 6)
    torch.testing.assert_close(ds.mean_vector(), normalized_mean(torch.from_numpy(vectors)))


def test_open_single_file_without_sidecar(tmp_path: Path) -> None:
    path, vectors = _published(tmp_path, fixed=False)
    Path(str(path) + ".nla_meta.yaml").unlink()
    ds = ActivationDataset.open(path)
    assert ds.d_model == 6 and ds.meta.layer_index == -1
    np.testing.assert_array_equal(ds.vectors().numpy(), vectors)


def test_write_single_file_round_trip(tmp_path: Path) -> None:
    vectors = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    table = make_table({"doc_id": ["a", "a", "b", "c"], "position": [5, 9, 7, 8],
                        "context": ["w", "x", "y", "z"], "split": ["av_sft", "av_sft", "rl", "eval"]},
                       vectors, 3)
    path = tmp_path / "mine.parquet"
    write_single_file(path, table, {"kind": "nla_dataset", "schema_version": 1, "d_model": 3,
                                    "layer_index": 2, "base_model": "tiny:llama"})
    assert (tmp_path / "mine.parquet.nla_meta.yaml").exists()
    ds = ActivationDataset.open(path)
    assert pq.read_schema(path).field(VECTOR_COLUMN).type == pa.list_(pa.float32(), 3)
    np.testing.assert_array_equal(ds.vectors(["av_sft", "rl"]).numpy(), vectors[:3])
    assert [r["position"] for r in ds.rows("eval")] == [8]
    ds.finalize_stats()
    again = ActivationDataset.open(path)
    assert again.meta.complete and again.meta.rows == 4
    assert again.meta.injection_scale == nice_ceil(float(np.linalg.norm(vectors, axis=1).mean()))
    assert again.meta.mean_vector and (tmp_path / again.meta.mean_vector).exists()


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(NLAError, match="dataset not found"):
        ActivationDataset.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NLAError, match="not an activation dataset"):
        ActivationDataset.open(tmp_path / "empty")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "t.parquet")
    with pytest.raises(NLAError, match="no 'activation_vector' column"):
        ActivationDataset.open(tmp_path / "t.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"\x00\x01 not parquet")
    with pytest.raises(NLAError, match=r"junk\.parquet: not a readable Parquet"):
        ActivationDataset.open(tmp_path / "junk.parquet")
    path, _ = _published(tmp_path, fixed=True)
    Path(str(path) + ".nla_meta.yaml").write_text("kind: nla_bundle\n")
    with pytest.raises(NLAError, match="kind is 'nla_bundle'"):
        ActivationDataset.open(path)
    Path(str(path) + ".nla_meta.yaml").write_text("d_model: [1\n")
    with pytest.raises(NLAError, match="malformed YAML"):
        ActivationDataset.open(path)


def test_shard_folder_dataset(tiny_dataset: Path) -> None:
    ds = ActivationDataset.open(tiny_dataset)
    assert not ds.is_single_file and ds.shards
    assert all(s.name.startswith("part-") for s in ds.shards)
    for shard in ds.shards:
        assert pq.read_schema(shard).field(VECTOR_COLUMN).type == pa.list_(pa.float32(), ds.d_model)
    table = ds.table()
    assert table.num_rows == len(ds) == ds.meta.rows
    parts = [ds.table(split=s).num_rows for s in ("av_sft", "ar_sft", "rl", "eval")]
    assert sum(parts) == table.num_rows
    vectors = ds.vectors()
    assert vectors.dtype == torch.float32 and vectors.shape == (len(ds), ds.d_model)
    norms = vectors.norm(dim=-1)
    assert ds.meta.norm_stats["mean"] == pytest.approx(float(norms.mean()), rel=1e-5)
