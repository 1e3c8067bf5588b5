"""The activation dataset on disk (docs/design.md §3): Parquet shards + ``nla_meta.yaml``.

Vectors are stored as ``FixedSizeList<float32>[d]``: a variable-length list column silently
corrupts once a buffer passes 4 GiB, a fixed-size list has no offsets to overflow. Every shard
is written to a temporary name and renamed, so a kill leaves whole shards or none: a resumed
stage trusts whatever shards it finds.

Also reads and writes the single-file layout published with the paper's code: one Parquet file
with an ``activation_vector`` column and a ``<file>.nla_meta.yaml`` sidecar.

Teacher labels are their own output (docs/design.md §3, "Labels"): a labels table is a folder of
``(doc_id, position, explanation)`` Parquet parts, one per dataset shard, with an
``nla_labels.yaml`` sidecar naming the teacher. The reader joins the selected table into the
``explanation`` column, so every consumer sees the columns it always saw, and two teachers'
labels can never share one column.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from nla.errors import NLAError
from nla.meta import META_NAME, DatasetMeta, read_sidecar, read_yaml, write_yaml
from nla.names import MEAN_VECTOR_FILE as MEAN_VECTOR_NAME
from nla.names import SPLITS, TRAINING_SPLITS, VECTOR_COLUMN

# A labels table (written by `nla label`): DATA/labels/<name>/ by default, or any folder.
LABELS_DIR = "labels"
LABELS_META = "nla_labels.yaml"
LABELS_KIND = "nla_labels"
LABELS_SCHEMA_VERSION = 1


def dataset_schema(d_model: int) -> pa.Schema:
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("position", pa.int32()),
            ("context", pa.string()),
            (VECTOR_COLUMN, pa.list_(pa.float32(), d_model)),
            ("split", pa.string()),
            ("explanation", pa.string()),
        ]
    )


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def vectors_to_arrow(vectors: np.ndarray | torch.Tensor) -> pa.FixedSizeListArray:
    arr = vectors.detach().float().cpu().numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors, np.float32)
    if arr.ndim != 2:
        raise NLAError(f"expected a 2-D array of vectors, got shape {arr.shape}")
    flat = pa.array(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array, d_model: int | None = None) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], type=column.type)
    if column.null_count:
        # flatten() skips null slots, which would shift every later vector by one row.
        raise NLAError(f"activation_vector has {column.null_count} null rows")
    if len(column) == 0:
        width = column.type.list_size if pa.types.is_fixed_size_list(column.type) else (d_model or 0)
        return np.zeros((0, width), dtype=np.float32)
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
    else:
        # The variable-length layout some tools write: accept it on read, never write it.
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if (lengths != lengths[0]).any():
            raise NLAError("activation_vector rows have different lengths")
        width = int(lengths[0])
    values = column.flatten().to_numpy(zero_copy_only=False)
    out = np.asarray(values, dtype=np.float32).reshape(-1, width)
    if d_model is not None and out.shape[1] != d_model:
        raise NLAError(f"activation_vector has width {out.shape[1]}, sidecar says d_model={d_model}")
    return out


def write_table(path: Path, table: pa.Table) -> None:
    """Atomic Parquet write (temp name + rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def make_table(rows: Mapping[str, Sequence[Any]], vectors: np.ndarray | torch.Tensor, d_model: int) -> pa.Table:
    """A table in the dataset schema; missing string columns are filled with nulls."""
    n = len(vectors)
    schema = dataset_schema(d_model)
    arrays = []
    for f in schema:
        if f.name == VECTOR_COLUMN:
            arrays.append(vectors_to_arrow(vectors))
        elif f.name in rows:
            arrays.append(pa.array(list(rows[f.name]), type=f.type))
        else:
            arrays.append(pa.nulls(n, type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def nice_ceil(x: float) -> float:
    """A round number just above x (two significant figures): the default injection scale."""
    if x <= 0 or not math.isfinite(x):
        return 1.0
    step = 10 ** (math.floor(math.log10(x)) - 1)
    k = math.floor(x / step)
    # x / step is inexact (1.9 / 0.1 = 18.999...): step up until the result is strictly above x.
    while float(f"{k * step:.2g}") <= x:
        k += 1
    return float(f"{k * step:.2g}")


# Published warm-start data (the paper's datagen, nanoNLA, EasyNLA) carries the teacher's text
# as ``api_explanation`` (raw) and/or ``response`` (wrapped in <explanation> tags for AV SFT).
PUBLISHED_EXPLANATIONS = ("api_explanation", "response")
# A labelled published file has no split of ours: its documents are split like `nla extract`'s
# default (nla/data/extract.py ExtractConfig.split), keyed by document so no doc straddles two.
PUBLISHED_SPLIT = {"av_sft": 0.4, "ar_sft": 0.3, "rl": 0.2, "eval": 0.1}


def published_explanations(table: pa.Table) -> pa.Array | None:
    """The explanation column of a published file, or None when it has none.

    ``api_explanation`` is the text itself; ``response`` is unwrapped as their
    ``extract_explanation`` does (nla/schema.py): the tags' content, stripped, None on a miss.
    """
    import re

    if "api_explanation" in table.column_names:
        values = table.column("api_explanation").to_pylist()
        return pa.array([v.strip() if isinstance(v, str) and v.strip() else None for v in values], pa.string())
    if "response" in table.column_names:
        pattern = re.compile(r"<explanation>(.*?)</explanation>", re.DOTALL)
        out = []
        for v in table.column("response").to_pylist():
            m = pattern.search(v) if isinstance(v, str) else None
            out.append(m.group(1).strip() or None if m else None)
        return pa.array(out, pa.string())
    return None


def sidecar_for_file(path: Path) -> Path:
    """``data.parquet`` → ``data.parquet.nla_meta.yaml`` (or ``data.nla_meta.yaml`` if present)."""
    long = path.with_name(path.name + ".nla_meta.yaml")
    short = path.with_name(path.stem + ".nla_meta.yaml")
    return short if short.exists() and not long.exists() else long


def labels_schema() -> pa.Schema:
    return pa.schema([("doc_id", pa.string()), ("position", pa.int32()), ("explanation", pa.string())])


def dataset_key(meta: DatasetMeta) -> str:
    """A fingerprint of the extraction a labels table was made for: its rows' (doc_id, position)
    keys only mean the same passages under the same model, corpus and sampling."""
    blob = json.dumps(meta.settings(), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def table_name(teacher: str) -> str:
    """The default labels table name for a ``--teacher`` spec: ``openai:gpt-4o-mini`` →
    ``openai-gpt-4o-mini`` (a folder name on every filesystem)."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in teacher).strip(".-")
    return name or "labels"


class LabelTable:
    """One teacher's labels for one dataset: ``part-*.parquet`` keyed by (doc_id, position),
    one part per dataset shard (same file name), and the ``nla_labels.yaml`` sidecar.

    Only labelled rows are stored, each once; a part is written whole (temp + rename), so a
    killed run leaves each shard's labels as they were before or after it, never half.
    """

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.meta = meta

    @classmethod
    def open(cls, path: str | Path) -> LabelTable:
        path = Path(path)
        meta_path = path / LABELS_META
        meta = read_sidecar(meta_path, LABELS_KIND, f"{path}: not a labels table (no {LABELS_META}); run `nla label`")
        if meta.get("schema_version") != LABELS_SCHEMA_VERSION:
            raise NLAError(f"{meta_path}: unknown schema_version {meta.get('schema_version')!r} "
                           f"(this nla reads {LABELS_SCHEMA_VERSION})")
        return cls(path, meta)

    @property
    def teacher(self) -> str:
        return str(self.meta.get("teacher", "?"))

    @property
    def name(self) -> str:
        return self.path.name

    def dataset_path(self) -> Path:
        """The dataset this table labels; stored relative to the table, so both move together."""
        where = self.meta.get("dataset")
        if not isinstance(where, str) or not where:
            raise NLAError(f"{self.path / LABELS_META}: no 'dataset' path")
        return Path(os.path.normpath(self.path / where))

    def part(self, shard: Path) -> Path:
        return self.path / shard.name

    def read(self, shard: Path) -> dict[tuple[str, int], str]:
        """``(doc_id, position) → explanation`` for one dataset shard (empty before it is labelled)."""
        part = self.part(shard)
        if not part.exists():
            return {}
        try:
            table = pq.read_table(part, columns=["doc_id", "position", "explanation"])
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise NLAError(f"{part}: not a readable labels part ({str(exc).splitlines()[0]})") from None
        return {(d, int(p)): e for d, p, e in zip(table.column("doc_id").to_pylist(),
                                                  table.column("position").to_pylist(),
                                                  table.column("explanation").to_pylist()) if e is not None}

    def column(self, shard: Path, rows: pa.Table) -> pa.Array:
        """The label of each of ``rows`` (a table with ``doc_id`` and ``position``), in their order;
        null where this table has none. (A dict lookup: 20 ms for a 5120-row shard, faster than an
        Arrow hash join at this size and a tenth of reading the shard.)"""
        labels = self.read(shard)
        docs, positions = rows.column("doc_id").to_pylist(), rows.column("position").to_pylist()
        return pa.array([labels.get((d, p)) for d, p in zip(docs, positions)], pa.string())

    def write(self, shard: Path, labels: list[tuple[str, int, str]]) -> None:
        """Replace one shard's part with ``labels`` (every labelled row of that shard)."""
        docs, positions, texts = zip(*labels) if labels else ((), (), ())
        table = pa.Table.from_arrays(
            [pa.array(docs, pa.string()), pa.array(positions, pa.int32()), pa.array(texts, pa.string())],
            schema=labels_schema())
        self.path.mkdir(parents=True, exist_ok=True)
        write_table(self.part(shard), table)

    def count(self) -> int:
        return sum(pq.read_metadata(p).num_rows for p in sorted(self.path.glob("*.parquet")))

    def save_meta(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_yaml(self.path / LABELS_META, self.meta)


def labels_root(path: Path) -> Path:
    """Where a dataset's own labels tables live: ``DATA/labels/`` or ``<file>.labels/``."""
    return path / LABELS_DIR if not path.is_file() else path.with_name(f"{path.name}.{LABELS_DIR}")


class ActivationDataset:
    """An activation dataset: a folder of shards, or one Parquet file with a sidecar.

    ``explanation`` comes from the selected labels table when there is one (see ``open``), else
    from the shards themselves (datasets labelled before labels were their own output, and
    published files).
    """

    def __init__(self, path: Path, meta: DatasetMeta, shards: list[Path], meta_path: Path):
        self.path = path
        self.meta = meta
        self.shards = shards
        self.meta_path = meta_path
        # Set for a published single file that carries explanations: its rows get our
        # `explanation` column and a split by document (see _fill_missing).
        self.labelled_publication = False
        # The labels table joined into `explanation`; None: the shards' own column (old layout).
        self.labels: LabelTable | None = None
        # Several tables and none chosen: reading `explanation` is an error naming them.
        self.label_choices: list[LabelTable] = []

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, labels: str | Path | None = None) -> ActivationDataset:
        """Open a dataset, or a labels table (a folder holding ``nla_labels.yaml``) as its dataset
        with those labels. ``labels`` picks a table by name (under ``DATA/labels/``) or path;
        by default the dataset's only table is used, and with several none is guessed."""
        path = Path(path)
        if not path.exists():
            raise NLAError(f"{path}: dataset not found")
        if path.is_dir() and (path / LABELS_META).exists() and not (path / META_NAME).exists():
            table = LabelTable.open(path)
            ds = cls._open(table.dataset_path())
            ds.select_labels(table)
            return ds
        ds = cls._open(path)
        root = labels_root(ds.path)
        if labels is not None:
            where = Path(labels)
            if not (where / LABELS_META).exists() and (root / str(labels) / LABELS_META).exists():
                where = root / str(labels)
            if not (where / LABELS_META).exists():
                have = ", ".join(t.name for t in ds.label_tables()) or "none"
                raise NLAError(f"{ds.path}: no labels table {str(labels)!r} (tables: {have})")
            ds.select_labels(LabelTable.open(where))
            return ds
        tables = ds.label_tables()
        if len(tables) == 1:
            ds.select_labels(tables[0])
        elif tables:
            ds.label_choices = tables
        return ds

    def label_tables(self) -> list[LabelTable]:
        """The labels tables stored with the dataset (``DATA/labels/*``)."""
        root = labels_root(self.path)
        if not root.is_dir():
            return []
        return [LabelTable.open(p) for p in sorted(root.iterdir()) if (p / LABELS_META).exists()]

    def select_labels(self, table: LabelTable) -> None:
        """Join ``table`` into ``explanation``; refused when it was made for another extraction."""
        made_for = table.meta.get("dataset_key")
        if made_for != dataset_key(self.meta):
            raise NLAError(f"{table.path}: labels were made for another extraction of {self.path} "
                           "(model, corpus or sampling changed); label the dataset again")
        self.labels = table
        self.label_choices = []

    @property
    def labeling(self) -> dict[str, Any] | None:
        """Who labelled the rows this dataset reads: the table's sidecar, or (old layout) the
        dataset sidecar's ``extra.labeling``."""
        if self.labels is not None:
            return self.labels.meta
        old = self.meta.extra.get("labeling")
        return old if isinstance(old, dict) else None

    @classmethod
    def _open(cls, path: Path) -> ActivationDataset:
        if not path.exists():
            raise NLAError(f"{path}: dataset not found")
        if path.is_dir():
            meta_path = path / META_NAME
            if not meta_path.exists():
                raise NLAError(f"{path}: not an activation dataset (no {META_NAME}); run `nla extract`")
            meta = DatasetMeta.from_dict(read_yaml(meta_path), meta_path)
            shards = sorted(path.glob("part-*.parquet"))
            return cls(path, meta, shards, meta_path)
        if path.suffix != ".parquet":
            raise NLAError(f"{path}: expected a dataset folder or a .parquet file")
        meta_path = sidecar_for_file(path)
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise NLAError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
        if VECTOR_COLUMN not in schema.names:
            raise NLAError(f"{path}: no {VECTOR_COLUMN!r} column (columns: {', '.join(schema.names)})")
        data = read_yaml(meta_path) if meta_path.exists() else {}
        # The published sidecar nests the model facts under `extraction:` (base_model, d_model,
        # layer_index, corpus); lift them, or the layer would read as unknown (-1).
        nested = data.get("extraction")
        if isinstance(nested, dict):
            for key in ("base_model", "d_model", "layer_index", "corpus"):
                if key in nested and key not in data:
                    data[key] = nested[key]
        if "d_model" not in data:
            vtype = schema.field(VECTOR_COLUMN).type
            if pa.types.is_fixed_size_list(vtype):
                data["d_model"] = vtype.list_size
            else:
                first = pq.read_table(path, columns=[VECTOR_COLUMN]).slice(0, 1)
                data["d_model"] = len(first.column(0)[0]) if first.num_rows else 0
        data.setdefault("layer_index", data.get("extraction_layer_index", -1))
        data.setdefault("complete", True)
        data.setdefault("rows", pq.read_metadata(path).num_rows)
        meta = DatasetMeta.from_dict(data, meta_path)
        ds = cls(path, meta, [path], meta_path)
        ds.labelled_publication = "split" not in schema.names and any(
            c in schema.names for c in PUBLISHED_EXPLANATIONS)
        return ds

    @property
    def is_single_file(self) -> bool:
        return self.path.is_file()

    @property
    def d_model(self) -> int:
        return self.meta.d_model

    def __len__(self) -> int:
        return sum(pq.read_metadata(s).num_rows for s in self.shards)

    def save_meta(self) -> None:
        write_yaml(self.meta_path, self.meta.to_dict())

    # ---------------------------------------------------------------- reading
    def read_shard(self, shard: Path, columns: list[str] | None = None) -> pa.Table:
        joined = (self.labels is not None or bool(self.label_choices)) and (
            columns is None or "explanation" in columns)
        if not joined:
            return self._read(shard, columns)
        if columns is None:
            return self._join_labels(shard, self._read(shard, None))
        keys = [c for c in ("doc_id", "position") if c not in columns]
        base = self._read(shard, [c for c in columns if c != "explanation"] + keys)
        return self._join_labels(shard, base).select(columns)

    def _join_labels(self, shard: Path, table: pa.Table) -> pa.Table:
        """The selected table's labels as the ``explanation`` column, row by (doc_id, position)."""
        if self.labels is None:
            names = ", ".join(f"{t.name} ({t.teacher})" for t in self.label_choices)
            raise NLAError(
                f"{self.path} has {len(self.label_choices)} labels tables: {names}; choose one with "
                f"--data {labels_root(self.path)}/NAME (or ActivationDataset.open(path, labels=NAME))")
        column = self.labels.column(shard, table)
        if "explanation" in table.column_names:
            # The shards' own column (old layout) is replaced, never merged with the table.
            return table.set_column(table.column_names.index("explanation"), "explanation", column)
        return table.append_column("explanation", column)

    def _read(self, shard: Path, columns: list[str] | None = None) -> pa.Table:
        if columns is not None:
            # Published files may lack some of our columns; read what is there, fill the rest.
            present = set(pq.read_schema(shard).names)
            wanted = list(columns)
            if self.labelled_publication:
                # The sources of the mapped columns: explanations, and the doc ids the split keys on.
                wanted += [c for c in (*PUBLISHED_EXPLANATIONS, "doc_id") if c not in wanted]
            table = pq.read_table(shard, columns=[c for c in wanted if c in present])
            return self._fill_missing(table, columns).select(columns)
        table = pq.read_table(shard)
        return self._fill_missing(table, columns)

    def _fill_missing(self, table: pa.Table, columns: list[str] | None) -> pa.Table:
        # Published single files may lack our bookkeeping columns; give them defaults.
        wanted = columns or [f.name for f in dataset_schema(self.d_model)]
        n = table.num_rows
        if "doc_id" in table.column_names and not pa.types.is_string(table.schema.field("doc_id").type):
            # Published files may carry integer ids; splits and joins key on strings.
            i = table.column_names.index("doc_id")
            table = table.set_column(i, "doc_id", table.column("doc_id").cast(pa.string()))
        if self.labelled_publication and "explanation" not in table.column_names:
            mapped = published_explanations(table)
            if mapped is not None:
                table = table.append_column("explanation", mapped)
        for name in wanted:
            if name in table.column_names:
                continue
            if name == "split" and self.labelled_publication:
                continue  # after doc_id is filled in, below
            if name == "split":
                table = table.append_column(name, pa.array(["eval"] * n, pa.string()))
            elif name == "position":
                table = table.append_column(name, pa.array([-1] * n, pa.int32()))
            elif name == "doc_id":
                table = table.append_column(name, pa.array([f"row{i}" for i in range(n)], pa.string()))
            else:
                table = table.append_column(name, pa.nulls(n, pa.string()))
        if self.labelled_publication and "split" in wanted and "split" not in table.column_names:
            from nla.data.sampling import assign_split

            if "doc_id" not in table.column_names:
                table = table.append_column("doc_id", pa.array([f"row{i}" for i in range(n)], pa.string()))
            fractions = self.meta.split_fractions if set(self.meta.split_fractions) == set(SPLITS) \
                else PUBLISHED_SPLIT
            splits = [assign_split(0, str(d), fractions) for d in table.column("doc_id").to_pylist()]
            table = table.append_column("split", pa.array(splits, pa.string()))
        return table

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[tuple[Path, pa.Table]]:
        for shard in self.shards:
            yield shard, self.read_shard(shard, columns)

    def table(self, columns: list[str] | None = None, split: str | Sequence[str] | None = None) -> pa.Table:
        cols = columns
        if split is not None and cols is not None and "split" not in cols:
            cols = [*cols, "split"]
        tables = [t for _, t in self.iter_shards(cols)]
        if not tables:
            return dataset_schema(self.d_model).empty_table()
        table = pa.concat_tables(tables)
        if split is not None:
            wanted = [split] if isinstance(split, str) else list(split)
            mask = pc.is_in(table.column("split"), value_set=pa.array(wanted))
            table = table.filter(mask)
            if columns is not None and "split" not in columns:
                table = table.drop(["split"])
        return table

    def vectors(self, split: str | Sequence[str] | None = None) -> torch.Tensor:
        table = self.table([VECTOR_COLUMN], split=split)
        return torch.from_numpy(arrow_to_vectors(table.column(VECTOR_COLUMN), self.d_model).copy())

    def rows(self, split: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Rows without the vector column (cheap to hold)."""
        names = [f.name for f in dataset_schema(self.d_model) if f.name != VECTOR_COLUMN]
        return self.table(names, split=split).to_pylist()

    def mean_vector(self) -> torch.Tensor:
        """μ of docs/design.md §6: mean of the normalised training vectors."""
        from safetensors.torch import load_file

        if self.meta.mean_vector:
            file = self.meta_path.parent / self.meta.mean_vector
            if file.exists():
                return load_file(str(file))["mean"].float()
        train = self.vectors(TRAINING_SPLITS)
        # A published file without a split column is all held-out rows: the mean of nothing
        # would be NaN, so fall back to every row, as finalize_stats does.
        return normalized_mean(train if len(train) else self.vectors())

    # ---------------------------------------------------------------- writing
    def replace_shard(self, shard: Path, table: pa.Table) -> None:
        if table.column_names != self._read(shard).column_names and not self.is_single_file:
            table = table.select([f.name for f in dataset_schema(self.d_model)])
        write_table(shard, table)

    def finalize_stats(self) -> None:
        """Norm statistics, the training mean vector and the suggested injection scale."""
        from safetensors.torch import save_file

        vecs = self.vectors()
        if len(vecs) == 0:
            raise NLAError(f"{self.path}: dataset has no rows (corpus too short for --min-position?)")
        norms = vecs.norm(dim=-1)
        train = self.vectors(TRAINING_SPLITS)
        mean = normalized_mean(train if len(train) else vecs)
        name = MEAN_VECTOR_NAME if not self.is_single_file else self.path.stem + "." + MEAN_VECTOR_NAME
        save_file({"mean": mean.contiguous()}, str(self.meta_path.parent / name))
        self.meta.mean_vector = name
        self.meta.rows = len(vecs)
        self.meta.norm_stats = {
            "mean": float(norms.mean()),
            "std": float(norms.std()) if len(norms) > 1 else 0.0,
            "min": float(norms.min()),
            "max": float(norms.max()),
        }
        self.meta.injection_scale = nice_ceil(float(norms.mean()))
        self.meta.complete = True
        self.save_meta()


def normalized_mean(vectors: torch.Tensor) -> torch.Tensor:
    """Mean of ``sqrt(d) * v / ||v||`` in fp32 (the μ of docs/design.md §6)."""
    from nla.metrics import normalize

    return normalize(vectors.float()).mean(dim=0)


def write_single_file(path: str | Path, table: pa.Table, meta: dict[str, Any]) -> None:
    """Write the published single-file layout (one Parquet + ``<file>.nla_meta.yaml``)."""
    path = Path(path)
    write_table(path, table)
    write_yaml(path.with_name(path.name + ".nla_meta.yaml"), meta)
