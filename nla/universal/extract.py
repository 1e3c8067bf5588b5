"""`nla universal extract`: activations of several models on the *same* passages.

Least-squares maps between two models need paired vectors: the same text seen by both. Two
kinds of pairs are written, each model at its own layer:

* **per passage**: the mean of the block-K states over the passage's tokens, accumulated in
  fp32 (an fp16 sum of a few hundred 500-norm vectors overflows to inf), special tokens and the
  first token left out (attention sinks carry norms 10–100× the rest and would dominate);
* **per position**: tokenizers cut text differently, so positions are chosen as *character
  offsets*: the anchor samples token ends (seeded per document, docs/design.md §3), and every model
  contributes the state of its token that ends at that same offset — the same text prefix —
  where it has one. A model added later (``add-model``) reads the stored offsets, so its rows
  pair with the existing ones.

Layout::

    U/
      nla_universal_data.yaml   kind: nla_universal_data: anchor, corpus settings, models {tag: {model, layer, d_model}}
      offsets.parquet           doc_id, split, char_ends: the anchor's chosen offsets
      <tag>/                    an ordinary activation dataset (`nla label`, `nla eval` work on it)
      <tag>/pairs-NNNNN.parquet doc_id, position, char_end of each row of part-NNNNN (the pairing key)
      <tag>/pooled-NNNNN.parquet doc_id, split, activation_vector: per-passage means

Resume: shards are written atomically, the ``part-`` file last, so a killed run restarts at the
first shard without one and a finished model is skipped.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from nla.config import opt, save_config, validate
from nla.config_fields import CorpusFields, RuntimeFields
from nla.data.corpus import Document, load_corpus
from nla.data.sampling import assign_split, parse_assignments, parse_split, sample_positions
from nla.data.store import (
    VECTOR_COLUMN,
    ActivationDataset,
    arrow_to_vectors,
    make_table,
    shard_name,
    vectors_to_arrow,
    write_table,
)
from nla.errors import NLAError
from nla.meta import META_NAME, DatasetMeta, read_yaml, write_yaml
from nla.models.forward import BlockOutput, block_states
from nla.models.layers import check_layer, default_layer, hidden_size, num_layers

DATA_META = "nla_universal_data.yaml"
DATA_KIND = "nla_universal_data"
OFFSETS = "offsets.parquet"
# Settings that decide which passages and offsets exist: every model must share them.
SHARED_SETTINGS = ("corpus", "text_column", "id_column", "docs", "positions_per_doc", "min_position",
                   "seq_len", "seed", "split")


@dataclass
class UniversalExtractConfig(CorpusFields, RuntimeFields):
    out: str = opt("", help="output folder (one activation dataset per model inside)", required=True)
    models: list[str] = opt([], help="models as TAG=SPEC or SPEC (hub id, path, 'default', 'gemma3-270m', "
                            "'tiny:<arch>'); the first is the anchor unless --anchor says otherwise", required=True)
    anchor: str | None = opt(None, help="tag of the anchor model (whose token ends choose the shared offsets)")
    layers: list[str] = opt([], help="TAG=K per model; layer K = output of decoder block K (0-based) = "
                            "hidden_states[K+1]; default (2*n_layers)//3 (the embedded models: their own)")
    positions_per_doc: int = opt(8, help="character offsets sampled per document (on the anchor's token ends)")
    min_position: int = opt(16, help="never sample an anchor token before this index")
    seq_len: int = opt(256, help="truncate documents to this many tokens (per model)")
    batch_size: int = opt(8, help="documents per forward pass")


def default_tag(spec: str) -> str:
    """A folder-safe tag: 'default' → 'smollm2-135m', 'tiny:llama' → 'tiny-llama', 'org/Name' → 'name'."""
    from nla.models.loading import ALIASES

    spec = ALIASES.get(spec, spec)
    name = spec.replace(":", "-").rstrip("/").split("/")[-1].lower()
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip("-.") or "model"


def parse_models(items: list[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for item in items:
        tag, spec = item.split("=", 1) if "=" in item else (default_tag(item), item)
        tag, spec = tag.strip(), spec.strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
            raise NLAError(f"--models: invalid tag {tag!r} (letters, digits, '.', '_', '-')")
        if tag in models:
            raise NLAError(f"--models: tag {tag!r} given twice (name them with TAG=SPEC)")
        models[tag] = spec
    return models


def parse_layers(items: list[str], tags: list[str]) -> dict[str, int]:
    return parse_assignments(items, "--layers", tags, int, form="TAG=K", noun="tag", value_kind="an integer")


def model_default_layer(spec: str, n_layers: int) -> int:
    from nla.models.loading import EMBEDDED, canonical_spec

    canon = canonical_spec(spec)
    return EMBEDDED[canon].default_layer if canon in EMBEDDED else default_layer(n_layers)


# ---------------------------------------------------------------- the shared folder
class UniversalData:
    """An extraction folder: shared settings, the anchor's offsets, one dataset per model."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / DATA_META
        if not path.exists():
            raise NLAError(f"{self.root}: not a universal extraction (no {DATA_META}); run `nla universal extract`")
        self.meta = read_yaml(path)
        if self.meta.get("kind") != DATA_KIND:
            raise NLAError(f"{path}: field 'kind' is {self.meta.get('kind')!r}, expected {DATA_KIND!r}")

    @property
    def anchor(self) -> str:
        return str(self.meta["anchor"])

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return dict(self.meta.get("models") or {})

    def dataset(self, tag: str) -> ActivationDataset:
        info = self.models.get(tag)
        if info is None or not info.get("complete"):
            raise NLAError(f"{self.root}: model {tag!r} is not extracted here (models: {', '.join(self.models) or 'none'})")
        return ActivationDataset.open(self.root / tag)

    def pairs(self, tag: str) -> list[tuple[str, int]]:
        """(doc_id, char_end) of every row of ``tag``'s dataset, in dataset order."""
        ds = self.dataset(tag)
        keys: list[tuple[str, int]] = []
        for shard in ds.shards:
            table = pq.read_table(shard.with_name(shard.name.replace("part-", "pairs-")))
            keys += list(zip(table.column("doc_id").to_pylist(), table.column("char_end").to_pylist(), strict=True))
        return keys

    def pooled(self, tag: str) -> tuple[list[str], list[str], torch.Tensor]:
        """(doc ids, splits, per-passage mean vectors) of ``tag``."""
        ds = self.dataset(tag)
        ids: list[str] = []
        splits: list[str] = []
        vecs = []
        for shard in ds.shards:
            table = pq.read_table(shard.with_name(shard.name.replace("part-", "pooled-")))
            ids += table.column("doc_id").to_pylist()
            splits += table.column("split").to_pylist()
            vecs.append(torch.from_numpy(arrow_to_vectors(table.column(VECTOR_COLUMN), ds.d_model).copy()))
        return ids, splits, torch.cat(vecs) if vecs else torch.zeros((0, ds.d_model))

    def save_meta(self) -> None:
        write_yaml(self.root / DATA_META, self.meta)


def _shared_settings(cfg: UniversalExtractConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in SHARED_SETTINGS}


def _open_or_create(cfg: UniversalExtractConfig, anchor: str) -> UniversalData:
    out = Path(cfg.out)
    path = out / DATA_META
    settings = _shared_settings(cfg)
    if path.exists():
        data = UniversalData(out)
        old = data.meta.get("settings") or {}
        for key in SHARED_SETTINGS:
            if old.get(key) != settings[key]:
                raise NLAError(f"{out}: existing extraction was made with {key}={old.get(key)!r}, this run asks for "
                               f"{settings[key]!r}; use another --out or the same settings")
        if data.anchor != anchor:
            raise NLAError(f"{out}: existing extraction is anchored on {data.anchor!r}, this run names {anchor!r}")
        return data
    if out.exists() and any(out.iterdir()):
        raise NLAError(f"{out}: folder exists and is not a universal extraction; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(path, {"kind": DATA_KIND, "schema_version": 1, "anchor": anchor, "settings": settings, "models": {}})
    return UniversalData(out)


def _documents(settings: dict[str, Any]) -> list[Document]:
    return load_corpus(settings["corpus"], text_column=settings["text_column"], id_column=settings["id_column"],
                       max_docs=settings["docs"])


def _tokenize(tokenizer: Any, text: str, seq_len: int) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise NLAError("universal extraction needs a fast tokenizer (character offsets pair the models' tokens)")
    enc = tokenizer(text, add_special_tokens=True, truncation=True, max_length=seq_len,
                    return_offsets_mapping=True, return_special_tokens_mask=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], list(enc["special_tokens_mask"])


def write_offsets(data: UniversalData, tokenizer: Any, docs: list[Document]) -> None:
    """The anchor's sampled token ends, as character offsets shared by every model."""
    target = data.root / OFFSETS
    if target.exists():
        return
    s = data.meta["settings"]
    fractions = parse_split(s["split"])
    ids, splits, ends = [], [], []
    for doc in docs:
        _, offsets, special = _tokenize(tokenizer, doc.text, s["seq_len"])
        # A token with an empty span (added by the template, or a byte piece) is no text boundary.
        blocked = [int(sp or e <= st) for (st, e), sp in zip(offsets, special, strict=True)]
        positions = sample_positions(s["seed"], doc.doc_id, blocked, s["positions_per_doc"], s["min_position"])
        chosen = sorted({offsets[p][1] for p in positions})
        if chosen:
            ids.append(doc.doc_id)
            splits.append(assign_split(s["seed"], doc.doc_id, fractions))
            ends.append(chosen)
    if not ids:
        raise NLAError(f"{data.root}: no document is longer than --min-position {s['min_position']} anchor tokens")
    table = pa.table({"doc_id": pa.array(ids, pa.string()), "split": pa.array(splits, pa.string()),
                      "char_ends": pa.array(ends, pa.list_(pa.int64()))})
    write_table(target, table)


def read_offsets(data: UniversalData) -> dict[str, tuple[str, list[int]]]:
    table = pq.read_table(data.root / OFFSETS)
    return {d: (s, list(e)) for d, s, e in zip(table.column("doc_id").to_pylist(), table.column("split").to_pylist(),
                                                 table.column("char_ends").to_pylist(), strict=True)}


def extract_model(data: UniversalData, tag: str, spec: str, layer: int | None, *, batch_size: int = 8,
                  dtype: str = "float32", device: str = "auto", docs_per_shard: int = 256) -> ActivationDataset:
    """Extract one model on the folder's passages and offsets (resumable; done models are skipped)."""
    from nla.data.extract import check_compatible
    from nla.models.loading import canonical_spec, load_model, parse_dtype, pick_device

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
        raise NLAError(f"invalid model tag {tag!r} (letters, digits, '.', '_', '-')")
    s = data.meta["settings"]
    canon = canonical_spec(spec)
    info = data.models.get(tag)
    if info is not None and info.get("model") != canon:
        raise NLAError(f"{data.root}: tag {tag!r} is already used by model {info.get('model')!r}")
    out = data.root / tag
    if info is not None and info.get("complete") and (layer is None or layer == info.get("layer")):
        print(f"{out}: already complete; nothing to do")
        return ActivationDataset.open(out)
    dev = pick_device(device)
    model, tokenizer = load_model(canon, dtype=dtype, device=dev)
    n_layers = num_layers(model.config)
    layer = check_layer(model_default_layer(canon, n_layers) if layer is None else layer, n_layers)
    docs = _documents(s)
    if tag == data.anchor:
        write_offsets(data, tokenizer, docs)
    if not (data.root / OFFSETS).exists():
        raise NLAError(f"{data.root}: the anchor {data.anchor!r} must be extracted first (it chooses the offsets)")
    offsets = read_offsets(data)
    docs = [d for d in docs if d.doc_id in offsets]
    if len(docs) != len(offsets):
        raise NLAError(f"{data.root}: the corpus no longer holds every document of {OFFSETS} (corpus changed?)")
    d_model = hidden_size(model.config)
    meta = DatasetMeta(
        base_model=canon, layer_index=layer, d_model=d_model, n_layers=n_layers, corpus=s["corpus"],
        sampling={"positions": "anchor character offsets",
                  "anchor": data.anchor, "seq_len": s["seq_len"], "seed": s["seed"], "docs_per_shard": docs_per_shard,
                  "dtype": str(parse_dtype(dtype)).removeprefix("torch.")},
        split_fractions=parse_split(s["split"]),
    )
    if (out / META_NAME).exists():
        check_compatible(ActivationDataset.open(out).meta, meta, out)
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / META_NAME, meta.to_dict())
    models = data.models
    models[tag] = {"model": canon, "layer": layer, "d_model": d_model, "n_layers": n_layers, "complete": False}
    data.meta["models"] = models
    data.save_meta()

    shards = [docs[i : i + docs_per_shard] for i in range(0, len(docs), docs_per_shard)]
    todo = [i for i in range(len(shards)) if not (out / shard_name(i)).exists()]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(docs), initial=sum(len(shards[i]) for i in range(len(shards)) if i not in todo),
               unit="doc", desc=f"extract {tag}", dynamic_ncols=True)
    started = time.perf_counter()
    with BlockOutput(model, layer) as runner:
        for index in todo:
            _extract_shard(out, index, shards[index], offsets, tokenizer, runner, pad_id, dev, s["seq_len"],
                           d_model, batch_size, bar)
    bar.close()
    ds = ActivationDataset.open(out)
    ds.meta = meta
    ds.finalize_stats()
    models = data.models
    models[tag]["complete"] = True
    data.meta["models"] = models
    data.save_meta()
    paired = ds.meta.rows / max(1, sum(len(e) for _, e in offsets.values()))
    print(f"{out}: {ds.meta.rows} rows ({paired:.0%} of the anchor's offsets), {len(docs)} passages, "
          f"d_model={d_model}, layer {layer} of {n_layers}, {time.perf_counter() - started:.1f}s")
    return ds


def _extract_shard(out: Path, index: int, docs: list[Document], offsets: dict[str, tuple[str, list[int]]],
                   tokenizer: Any, runner: BlockOutput, pad_id: int, device: torch.device, seq_len: int,
                   d_model: int, batch_size: int, bar: Any) -> None:
    encoded = []
    for doc in docs:
        ids, offs, special = _tokenize(tokenizer, doc.text, seq_len)
        end_to_pos: dict[int, int] = {}
        for p, ((st, e), sp) in enumerate(zip(offs, special, strict=True)):
            if not sp and e > st:
                end_to_pos[e] = p  # the last token ending there: a byte-split character's full piece
        split, ends = offsets[doc.doc_id]
        picks = [(end_to_pos[c], c) for c in ends if c in end_to_pos]
        pool = [p for p, sp in enumerate(special) if not sp and p > 0] or [len(ids) - 1]
        encoded.append((doc, split, ids, picks, pool))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][2]))
    picked: dict[int, torch.Tensor] = {}
    pooled: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        states = block_states(runner, [encoded[i][2] for i in batch], pad_id, device)
        for i, hidden in zip(batch, states, strict=True):
            hidden = hidden.float()  # fp32 before summing: an fp16 sum over a passage overflows
            picked[i] = hidden[[p for p, _ in encoded[i][3]]]
            pooled[i] = hidden[encoded[i][4]].sum(0) / len(encoded[i][4])
        bar.update(len(batch))
    rows: dict[str, list[Any]] = {"doc_id": [], "position": [], "context": [], "split": []}
    pairs: dict[str, list[Any]] = {"doc_id": [], "position": [], "char_end": []}
    vecs = []
    for i, (doc, split, ids, picks, _) in enumerate(encoded):
        for p, c in picks:
            rows["doc_id"].append(doc.doc_id)
            rows["position"].append(p)
            rows["context"].append(tokenizer.decode(ids[: p + 1], skip_special_tokens=True))
            rows["split"].append(split)
            pairs["doc_id"].append(doc.doc_id)
            pairs["position"].append(p)
            pairs["char_end"].append(c)
        vecs.append(picked[i])
    vectors = torch.cat(vecs) if vecs else torch.zeros((0, d_model))
    pool_vecs = torch.stack([pooled[i] for i in range(len(encoded))])
    if not (torch.isfinite(vectors).all() and torch.isfinite(pool_vecs).all()):
        raise NLAError(f"{out}: the model produced NaN/inf activations (try --dtype float32)")
    write_table(out / f"pooled-{index:05d}.parquet", pa.table({
        "doc_id": pa.array([e[0].doc_id for e in encoded], pa.string()),
        "split": pa.array([e[1] for e in encoded], pa.string()),
        VECTOR_COLUMN: vectors_to_arrow(pool_vecs)}))
    write_table(out / f"pairs-{index:05d}.parquet", pa.table({
        "doc_id": pa.array(pairs["doc_id"], pa.string()), "position": pa.array(pairs["position"], pa.int32()),
        "char_end": pa.array(pairs["char_end"], pa.int64())}))
    # Written last: its presence is what marks the shard done on resume.
    write_table(out / shard_name(index), make_table(rows, vectors, d_model))


def universal_extract(cfg: UniversalExtractConfig) -> UniversalData:
    validate(cfg, "universal extract")  # required --out and --models, ranges: as from flags and YAML
    models = parse_models(cfg.models)
    anchor = cfg.anchor or next(iter(models))
    if anchor not in models:
        raise NLAError(f"--anchor {anchor!r} is not one of the --models tags ({', '.join(models)})")
    layers = parse_layers(cfg.layers, list(models))
    parse_split(cfg.split)
    data = _open_or_create(cfg, anchor)
    save_config(cfg, data.root / "universal_extract_config.yaml")
    # The anchor first: its token ends choose the offsets every other model is read at.
    for tag in [anchor, *[t for t in models if t != anchor]]:
        extract_model(data, tag, models[tag], layers.get(tag), batch_size=cfg.batch_size, dtype=cfg.dtype,
                      device=cfg.device, docs_per_shard=cfg.docs_per_shard)
    return UniversalData(data.root)
