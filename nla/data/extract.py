"""`nla extract`: corpus → activation dataset (docs/design.md §3).

The forward pass stops at block K: a hook on that block raises, so the later blocks, the final
norm and the LM head never run. Documents are processed in fixed shards of ``docs_per_shard``;
each shard is written atomically, so a killed run resumes at the first missing shard and the
result equals an uninterrupted run row for row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from nla.config import opt, save_config, validate
from nla.config_fields import CorpusFields, RuntimeFields
from nla.data.corpus import Document, load_corpus
from nla.data.sampling import assign_split, parse_split, sample_positions
from nla.data.store import ActivationDataset, make_table, shard_name, write_table
from nla.errors import NLAError
from nla.meta import META_NAME, DatasetMeta, write_yaml
from nla.models.forward import BlockOutput, block_states, pad_batch
from nla.models.layers import check_layer, default_layer, hidden_size, num_layers
from nla.models.readout import NEXT_TOKEN_IDS, NEXT_TOKEN_PROBS, BlockAndNextTokens


@dataclass
class ExtractConfig(CorpusFields, RuntimeFields):
    out: str = opt("", help="output dataset folder", required=True)
    model: str = opt("default", help="model: hub id, local path, 'default' (SmolLM2-135M), 'gemma3-270m' or 'tiny:<arch>'")
    layer: int | None = opt(None, help="layer K = output of decoder block K (0-based) = hidden_states[K+1]; default (2*n_layers)//3")
    positions_per_doc: int = opt(5, help="positions sampled per document (their RNG is keyed by --seed and the document)")
    min_position: int = opt(50, help="never sample a token before this index")
    seq_len: int = opt(512, help="truncate documents to this many tokens")
    batch_size: int = opt(8, help="documents per forward pass")
    next_tokens: int = opt(0, help="also store the model's top-N next-token ids and probabilities per row "
                           "(runs the blocks after K; the lens teacher then needs no forward pass of its own)", ge=0)


def _meta_for(cfg: ExtractConfig, model_spec: str, layer: int, d_model: int, n_layers: int) -> DatasetMeta:
    from nla.models.loading import parse_dtype

    return DatasetMeta(
        base_model=model_spec,
        layer_index=layer,
        d_model=d_model,
        n_layers=n_layers,
        corpus=cfg.corpus,
        sampling={
            "docs": cfg.docs,
            "positions_per_doc": cfg.positions_per_doc,
            "min_position": cfg.min_position,
            "seq_len": cfg.seq_len,
            "seed": cfg.seed,
            "text_column": cfg.text_column,
            "id_column": cfg.id_column,
            "docs_per_shard": cfg.docs_per_shard,
            # Only when asked: datasets made before the option existed stay resumable.
            **({"next_tokens": cfg.next_tokens} if cfg.next_tokens else {}),
            # bf16 and fp32 vectors differ far beyond 1e-4: a resume must not mix them.
            "dtype": str(parse_dtype(cfg.dtype)).removeprefix("torch."),
        },
        split_fractions=parse_split(cfg.split),
    )


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and key != "split_fractions":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def check_compatible(existing: DatasetMeta, wanted: DatasetMeta, where: Path) -> None:
    # Flattened so the message names the one setting that differs (sampling.seed), not a dict.
    old, new = _flatten(existing.settings()), _flatten(wanted.settings())
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise NLAError(
                f"{where}: existing dataset was made with {key}={old.get(key)!r}, this run asks for "
                f"{new.get(key)!r}; use another --out or delete the folder"
            )


def extract(cfg: ExtractConfig) -> ActivationDataset:
    from nla.models.loading import canonical_spec, load_model, pick_device

    validate(cfg, "extract")  # the Python API gets the checks of flags and YAML (required --out, ranges)
    out = Path(cfg.out)
    # Under `accelerate launch` every rank extracts whole shards (docs/scaling.md); one process
    # otherwise. The main process alone checks and writes the folder's metadata.
    from nla.train.loop import Distributed

    dist = Distributed(cfg.device)

    def check_out() -> None:
        # Output mistakes are reported before the (slow) corpus and model loads.
        if out.exists() and not out.is_dir():
            raise NLAError(f"{out}: is a file; --out must name a folder")
        if out.is_dir() and not (out / META_NAME).exists() and any(out.iterdir()):
            raise NLAError(f"{out}: folder exists and is not an activation dataset; choose another --out")

    dist.on_main(check_out)
    docs = load_corpus(cfg.corpus, text_column=cfg.text_column, id_column=cfg.id_column, max_docs=cfg.docs)
    spec = canonical_spec(cfg.model)
    device = pick_device(dist.device)
    model, tokenizer = load_model(spec, dtype=cfg.dtype, device=device)
    n_layers = num_layers(model.config)
    layer = check_layer(default_layer(n_layers) if cfg.layer is None else cfg.layer, n_layers)
    cfg.layer = layer
    meta = _meta_for(cfg, spec, layer, hidden_size(model.config), n_layers)

    def prepare_out() -> bool:
        """True when the dataset is already complete; otherwise the folder is ready for shards."""
        if (out / META_NAME).exists():
            existing = ActivationDataset.open(out)
            check_compatible(existing.meta, meta, out)
            if existing.meta.complete:
                print(f"{out}: already complete ({existing.meta.rows} rows); nothing to do")
                return True
        elif out.exists() and any(out.iterdir()):
            raise NLAError(f"{out}: folder exists and is not an activation dataset; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        # A kill mid-write leaves a hidden temp file; it is never read, but should not pile up.
        for stale in out.glob(".part-*.parquet.tmp*"):
            stale.unlink(missing_ok=True)
        write_yaml(out / META_NAME, meta.to_dict())
        save_config(cfg, out / "extract_config.yaml")
        return False

    if dist.on_main(prepare_out):
        return ActivationDataset.open(out)

    shards = [docs[i : i + cfg.docs_per_shard] for i in range(0, len(docs), cfg.docs_per_shard)]
    todo = [i for i in range(len(shards)) if not (out / shard_name(i)).exists()]
    done_docs = sum(len(shards[i]) for i in range(len(shards)) if i not in todo)
    # A shard's rows depend only on its documents (sampling is keyed by doc id), so whichever
    # rank writes it, the dataset is the one a single process makes: round-robin over shards.
    todo = todo[dist.rank :: dist.world]
    runner: BlockOutput | BlockAndNextTokens = (
        BlockAndNextTokens(model, layer) if cfg.next_tokens else BlockOutput(model, layer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    bar = tqdm(total=len(docs), initial=done_docs, unit="doc", desc="extract", dynamic_ncols=True,
               disable=not dist.main)
    tokens_seen, started = 0, time.perf_counter()
    with runner:
        for index in todo:
            table, n_tokens = _extract_shard(cfg, shards[index], tokenizer, runner, pad_id, device, meta, bar)
            write_table(out / shard_name(index), table)
            tokens_seen += n_tokens
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(tok_s=f"{tokens_seen / elapsed:,.0f}")
    bar.close()
    dist.barrier()  # every shard is on disk before the statistics are taken over all of them

    def finalize() -> None:
        dataset = ActivationDataset.open(out)
        dataset.meta = meta
        dataset.finalize_stats()
        print(f"{out}: {dataset.meta.rows} rows, d_model={meta.d_model}, layer {layer} of {n_layers}")

    dist.on_main(finalize)
    return ActivationDataset.open(out)


def _extract_shard(
    cfg: ExtractConfig,
    docs: list[Document],
    tokenizer: Any,
    runner: BlockOutput | BlockAndNextTokens,
    pad_id: int,
    device: torch.device,
    meta: DatasetMeta,
    bar: Any,
) -> tuple[Any, int]:
    encoded = []
    for doc in docs:
        enc = tokenizer(
            doc.text, add_special_tokens=True, truncation=True, max_length=cfg.seq_len,
            return_special_tokens_mask=True,
        )
        ids = list(enc["input_ids"])
        positions = sample_positions(cfg.seed, doc.doc_id, enc["special_tokens_mask"], cfg.positions_per_doc, cfg.min_position)
        encoded.append((doc, ids, positions))
    # Sorting by length inside the shard keeps padding small; rows go back in document order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][1]))
    states: dict[int, torch.Tensor] = {}
    guesses: dict[int, tuple[list[list[int]], list[list[float]]]] = {}  # --next-tokens, per document
    n_tokens = 0
    for start in range(0, len(order), cfg.batch_size):
        batch = [i for i in order[start : start + cfg.batch_size] if encoded[i][2]]
        if batch and isinstance(runner, BlockAndNextTokens):
            batch_ids, batch_mask = pad_batch([encoded[i][1] for i in batch], pad_id)
            with torch.no_grad():
                hidden, final = runner(batch_ids.to(device), batch_mask.to(device))
            for b, i in enumerate(batch):
                where = torch.tensor(encoded[i][2], device=hidden.device)
                states[i] = hidden[b, where].float().cpu()
                top_ids, top_p = runner.top_tokens(final[b, where], cfg.next_tokens)
                guesses[i] = (top_ids.cpu().tolist(), top_p.cpu().tolist())
                n_tokens += len(encoded[i][1])
        elif batch and isinstance(runner, BlockOutput):
            outs = block_states(runner, [encoded[i][1] for i in batch], pad_id, device)
            for i, hidden in zip(batch, outs, strict=True):
                states[i] = hidden[encoded[i][2]]
                n_tokens += len(encoded[i][1])
        bar.update(len(order[start : start + cfg.batch_size]))
    rows: dict[str, list[Any]] = {"doc_id": [], "position": [], "context": [], "split": []}
    vectors = []
    next_ids: list[list[int]] = []
    next_probs: list[list[float]] = []
    for i, (doc, ids, positions) in enumerate(encoded):
        if not positions:
            continue
        split = assign_split(cfg.seed, doc.doc_id, meta.split_fractions)
        for k, p in enumerate(positions):
            if i in guesses:
                next_ids.append(guesses[i][0][k])
                next_probs.append(guesses[i][1][k])
            rows["doc_id"].append(doc.doc_id)
            rows["position"].append(p)
            rows["context"].append(tokenizer.decode(ids[: p + 1], skip_special_tokens=True))
            rows["split"].append(split)
        vectors.append(states[i])
    vecs = torch.cat(vectors) if vectors else torch.zeros((0, meta.d_model))
    if not torch.isfinite(vecs).all():
        raise NLAError("extract: the model produced NaN/inf activations (try --dtype float32)")
    table = make_table(rows, vecs, meta.d_model)
    if cfg.next_tokens:
        table = table.append_column(NEXT_TOKEN_IDS, pa.array(next_ids, type=pa.list_(pa.int32())))
        table = table.append_column(NEXT_TOKEN_PROBS, pa.array(next_probs, type=pa.list_(pa.float32())))
    return table, n_tokens


def register(sub: Any) -> None:
    from nla.config import add_config_args, resolve_config

    p = sub.add_parser("extract", help="corpus → activation dataset (Parquet shards + nla_meta.yaml)",
                       description="Extract residual-stream activations at layer K (the output of decoder "
                       "block K, 0-based = hidden_states[K+1]) for sampled positions of each document.")
    add_config_args(p, ExtractConfig)
    p.set_defaults(func=lambda args: extract(resolve_config(ExtractConfig, args, section="extract")))
