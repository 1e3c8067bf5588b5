"""Corpus sources: the built-in offline corpus, text files/folders, JSONL, Parquet, HF datasets.

Every source yields :class:`Document` with a stable ``doc_id``: extraction keys its sampling RNG
and the train/eval split on it, so ids must not depend on run order or the machine.

Source strings:

* ``builtin`` — Python's own ``pydoc_data.topics``, one document per topic (always offline)
* ``path/to/file.txt`` — documents separated by blank lines
* ``path/to/folder`` — one document per ``.txt``/``.md`` file inside (recursive)
* ``path/to/file.jsonl`` / ``.parquet`` — one document per row, text in ``text_column``
* ``hf:NAME[:CONFIG[:SPLIT]]`` — a Hugging Face dataset (hub id or local dataset folder), streamed:
  only the rows up to ``max_docs`` are read (needs the ``datasets`` package, ``pip install nla[hf]``)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nla.errors import NLAError
from nla.meta import read_bytes

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str


def builtin_documents(chunk_chars: int = 1200) -> list[Document]:
    """Python's ``pydoc_data.topics``, cut on paragraph boundaries into ~``chunk_chars`` pieces.

    The 79 topics are very uneven (200 to 60 000 characters); chunking gives a few hundred
    documents of similar length, which is what sampling and a document-level split need.
    """
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        chunk: list[str] = []
        size, index = 0, 0
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", topics[name]) if p.strip()]
        for i, para in enumerate(paragraphs):
            chunk.append(para)
            size += len(para)
            if size >= chunk_chars or i == len(paragraphs) - 1:
                docs.append(Document(f"pydoc:{name}:{index}", "\n\n".join(chunk)))
                chunk, size, index = [], 0, index + 1
    return docs


def _read_text(path: Path) -> str:
    raw = read_bytes(path)
    if b"\x00" in raw[:8192]:
        raise NLAError(f"{path}: looks like a binary file (NUL bytes), expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NLAError(f"{path}: not valid UTF-8 (bad byte at offset {exc.start})") from None


def _text_file_documents(path: Path) -> list[Document]:
    text = _read_text(path)
    parts = [p.strip() for p in re.split(r"\n\s*\n", text)]
    docs = [Document(f"{path.name}:{i}", p) for i, p in enumerate(parts) if p]
    if not docs:
        raise NLAError(f"{path}: file is empty")
    return docs


def _folder_documents(path: Path) -> list[Document]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise NLAError(f"{path}: folder has no {'/'.join(sorted(TEXT_SUFFIXES))} files")
    docs = []
    for f in files:
        text = _read_text(f).strip()
        if text:
            docs.append(Document(str(f.relative_to(path)), text))
    if not docs:
        raise NLAError(f"{path}: every text file in the folder is empty")
    return docs


def _row_document(row: dict, i: int, text_column: str, id_column: str, where: str, label: str) -> Document | None:
    """Row ``i`` as a Document (None for empty text); one rule for local tables and hf: streams.

    Id: the ``id_column`` value, else ``<label>:<i>`` (docs/formats.md).
    """
    text = row.get(text_column)
    if not isinstance(text, str):
        raise NLAError(f"{where}: row {i} has a non-text {text_column!r} value")
    if not text.strip():
        return None
    doc_id = row.get(id_column)
    return Document(str(doc_id) if doc_id is not None else f"{label}:{i}", text)


def _row_documents(path: Path, rows: list[dict], text_column: str, id_column: str) -> list[Document]:
    if not rows:
        raise NLAError(f"{path}: file is empty")
    if text_column not in rows[0]:
        raise NLAError(
            f"{path}: no column {text_column!r} (columns: {', '.join(map(str, rows[0]))}); "
            "pass --text-column"
        )
    docs = [d for i, row in enumerate(rows)
            if (d := _row_document(row, i, text_column, id_column, str(path), path.name)) is not None]
    if not docs:
        raise NLAError(f"{path}: every row has empty text")
    return docs


def _jsonl_documents(path: Path, text_column: str, id_column: str) -> list[Document]:
    rows = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise NLAError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise NLAError(f"{path}: line {lineno} is not a JSON object")
        rows.append(row)
    return _row_documents(path, rows, text_column, id_column)


def _parquet_documents(path: Path, text_column: str, id_column: str) -> list[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise NLAError(f"{path}: file not found") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise NLAError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise NLAError(f"{path}: file is empty")
    if text_column not in table.column_names:
        raise NLAError(
            f"{path}: no column {text_column!r} (columns: {', '.join(table.column_names)}); "
            "pass --text-column"
        )
    cols = [text_column] + ([id_column] if id_column in table.column_names else [])
    return _row_documents(path, table.select(cols).to_pylist(), text_column, id_column)


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG[:SPLIT]]`` → ``(name, config, split)``; positional, split defaults to train.

    The second field is always the config and the third the split, so ``hf:NAME::validation``
    picks a split without a config. NAME is a hub id (``org/name``) or a local dataset folder.
    """
    parts = source[len("hf:"):].split(":")
    if not parts[0] or len(parts) > 3:
        raise NLAError(f"{source}: expected hf:NAME[:CONFIG[:SPLIT]] (e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT:train)")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split


def _hf_documents(source: str, text_column: str, id_column: str, max_docs: int | None) -> list[Document]:
    """Stream the dataset and stop after ``max_docs`` non-empty documents.

    ``streaming=True`` reads shard after shard as rows are asked for, so a 40k-document run on a
    billion-row corpus downloads (or reads) only the first shards, never the whole dataset.
    Ids: the ``id_column`` value, else ``<name after its last />:<row>``, as for local files.
    """
    name, config, split = parse_hf_source(source)
    try:
        import datasets
    except ImportError:
        raise NLAError(f"{source}: Hugging Face datasets need `pip install datasets` (or nla[hf])") from None
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:
        raise NLAError(
            f"{source}: cannot load dataset ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "offline, use a local file or --corpus builtin"
        ) from None
    label = Path(source).name  # docs/formats.md: the source string after its last /, then :<row>
    docs: list[Document] = []
    rows = iter(stream)
    i = -1
    while max_docs is None or len(docs) < max_docs:
        try:
            row = next(rows)
        except StopIteration:
            break
        except Exception as exc:  # a shard that fails to read or download mid-stream
            raise NLAError(f"{source}: reading row {i + 1} failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        i += 1
        if text_column not in row:
            raise NLAError(f"{source}: no column {text_column!r} (columns: {', '.join(map(str, row))}); pass --text-column")
        doc = _row_document(row, i, text_column, id_column, source, label)
        if doc is not None:
            docs.append(doc)
    if not docs:
        raise NLAError(f"{source}: no rows with text" if i >= 0 else f"{source}: the split {split!r} is empty")
    return docs


def load_corpus(
    source: str, *, text_column: str = "text", id_column: str = "id", max_docs: int | None = None
) -> list[Document]:
    """All documents of a source (first ``max_docs`` if given), in a stable order."""
    if source == "builtin":
        docs = builtin_documents()
    elif source.startswith("hf:"):
        docs = _hf_documents(source, text_column, id_column, max_docs)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise NLAError(f"{path}: corpus not found (a file, a folder, 'builtin' or 'hf:NAME')")
        if path.is_dir():
            docs = _folder_documents(path)
        elif path.suffix.lower() == ".jsonl":
            docs = _jsonl_documents(path, text_column, id_column)
        elif path.suffix.lower() == ".parquet":
            docs = _parquet_documents(path, text_column, id_column)
        elif path.suffix.lower() in TEXT_SUFFIXES or not path.suffix:
            docs = _text_file_documents(path)
        else:
            # A .csv or .json read as plain text would train on its markup, silently.
            raise NLAError(f"{path}: unsupported corpus file type {path.suffix!r} (text: "
                           f"{', '.join(sorted(TEXT_SUFFIXES))}; .jsonl; .parquet; or a folder)")
    seen: set[str] = set()
    for d in docs:
        if d.doc_id in seen:
            raise NLAError(f"{source}: document id {d.doc_id!r} appears twice; ids must be unique")
        seen.add(d.doc_id)
    return docs[:max_docs] if max_docs else docs
