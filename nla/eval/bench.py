"""`nla bench`: score several NLAs on one pinned held-out activation set.

Published NLAs each report their own metric on their own data; a bench makes them comparable.

* ``nla bench make --data D --out BENCH`` pins a bench: a seeded sample of D's held-out split,
  the ``ar_sft`` teacher labels the bag-of-words baseline is fit on, D's training mean μ, and
  the evaluation protocol (candidates, best-of-k, generation budget, seeds), with a manifest
  ``bench.yaml`` holding a SHA-256 of the content (every row, vector and μ), the corpus and a
  hash of the (document, position) list. Two people with the same hash scored the same thing.
* ``nla bench run BENCH --nla A --nla B ... --out DIR`` checks the hash, runs the *same*
  :func:`nla.eval.suite.evaluate` as `nla eval` for each NLA (one implementation of every
  metric, baseline, retrieval and probe, and the causal block), and writes
  ``DIR/leaderboard.md``, ``leaderboard.html``, ``leaderboard.json``, ``model_index/NAME.yaml``
  and the full report of each NLA under ``DIR/reports/NAME/``.

Every NLA is scored against the bench's μ (not the μ each bundle brought along): FVE is
relative to the spread around μ, so NLAs measured against different means are not comparable.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nla.cli import add_device_flag
from nla.config import DTYPE_CHOICES
from nla.errors import NLAError
from nla.meta import META_NAME, read_yaml, write_yaml

BENCH_KIND = "nla_bench"
BENCH_SCHEMA_VERSION = 1
MANIFEST = "bench.yaml"
DATA_DIR = "data"
# The evaluation protocol a bench pins: every NLA on the bench is scored with these.
# batch_size is part of it: sampled generations are seeded per chunk of the batch.
PROTOCOL = ("n_candidates", "best_of", "temperature", "top_p", "max_new_tokens", "batch_size", "bootstrap", "seed",
            "probes", "causal")

# (column, dotted path into metrics.json, signed) for the leaderboard, in order.
COLUMNS: list[tuple[str, str, bool]] = [
    ("round trip fve_nrm", "round_trip.fve_nrm", False),
    ("fve_meannorm", "round_trip.fve_meannorm", False),
    ("top-1", "round_trip.top1", False),
    ("shuffled gap", "round_trip.shuffled_gap", False),
    ("best-of-k fve_nrm", "round_trip.best_of_k.fve_nrm", False),
    ("AR alone fve_nrm", "ar_alone.fve_nrm", False),
    ("BoW ridge (AV text) fve_nrm", "baselines.bow_ridge.on_av.fve_nrm", False),
    ("paraphrase Δ", "probes.paraphrase.delta_fve_nrm", True),
    ("drop claim Δ", "probes.claim_ablation.delta_fve_nrm", True),
    ("word shuffle Δ", "probes.word_shuffle.delta_fve_nrm", True),
    ("causal KL recovered", "causal.fraction_recovered", False),
    ("unparseable", "quality.av.unparseable_rate", False),
]


# --------------------------------------------------------------------------- content hash
def content_hash(ds: Any) -> tuple[str, str, str]:
    """SHA-256 of (every row's fields and vector, in order; μ) and of the (doc, position) list.

    Computed from values, not file bytes: re-compressing the Parquet file does not change the
    bench, editing one float or label does.
    """
    from nla.data.store import VECTOR_COLUMN, arrow_to_vectors

    h, pos = hashlib.sha256(), hashlib.sha256()
    for _, table in ds.iter_shards():
        vecs = arrow_to_vectors(table.column(VECTOR_COLUMN), ds.d_model).astype("<f4")
        cols = {c: table.column(c).to_pylist() for c in ("doc_id", "position", "split", "context", "explanation")
                if c in table.column_names}
        for i in range(table.num_rows):
            fields = [cols[c][i] if c in cols else None for c in ("doc_id", "position", "split", "context", "explanation")]
            h.update(json.dumps(fields, ensure_ascii=False).encode())
            h.update(vecs[i].tobytes())
            pos.update(json.dumps(fields[:2]).encode())
    mean = ds.mean_vector().float().contiguous().numpy().astype("<f4")
    h.update(b"mean" + mean.tobytes())
    return h.hexdigest(), pos.hexdigest(), hashlib.sha256(mean.tobytes()).hexdigest()


# --------------------------------------------------------------------------- make
def make_bench(data: str | Path, out: str | Path, *, split: str = "eval", max_rows: int | None = 256,
               ridge_rows: int | None = 20000, name: str | None = None, protocol: dict[str, Any] | None = None,
               seed: int = 0) -> dict[str, Any]:
    """Write a bench folder (``BENCH/bench.yaml`` + ``BENCH/data/``) atomically; returns the manifest."""
    import pyarrow as pa

    from nla.data.store import MEAN_VECTOR_NAME, SPLITS, ActivationDataset, write_table
    from nla.eval.suite import EvalConfig
    from nla.names import VERSION as __version__

    if split not in SPLITS:
        raise NLAError(f"--split {split!r}: unknown split (splits: {', '.join(SPLITS)})")
    if split == "ar_sft":
        raise NLAError("--split ar_sft: the bench fits its bag-of-words baseline on ar_sft; hold out another split")
    ds = ActivationDataset.open(data)
    out = Path(out)
    table = ds.table(None, split=split)
    total = table.num_rows
    if total < 2:
        raise NLAError(f"{data}: split {split!r} has {total} rows; a bench needs at least 2")
    gen = torch.Generator().manual_seed(seed)
    if max_rows is not None and max_rows < total:
        if max_rows < 2:
            raise NLAError(f"--max-rows must be at least 2, got {max_rows}")
        table = table.take(sorted(torch.randperm(total, generator=gen)[:max_rows].tolist()))
    ridge = ds.table(None, split="ar_sft")
    if "explanation" in ridge.column_names:
        labelled = [i for i, e in enumerate(ridge.column("explanation").to_pylist()) if e]
        ridge = ridge.take(pa.array(labelled, type=pa.int64()))
        if ridge_rows is not None and ridge.num_rows > ridge_rows:
            ridge = ridge.take(sorted(torch.randperm(ridge.num_rows, generator=gen)[:ridge_rows].tolist()))
    else:
        ridge = ridge.slice(0, 0)
    combined = pa.concat_tables([table, ridge.select(table.column_names).cast(table.schema)])

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / DATA_DIR).mkdir(parents=True)
    write_table(tmp / DATA_DIR / "part-00000.parquet", combined)
    from safetensors.torch import save_file

    save_file({"mean": ds.mean_vector().float().contiguous()}, str(tmp / DATA_DIR / MEAN_VECTOR_NAME))
    meta = ds.meta.to_dict() | {"rows": combined.num_rows, "complete": True, "mean_vector": MEAN_VECTOR_NAME}
    write_yaml(tmp / DATA_DIR / META_NAME, meta)
    bench_ds = ActivationDataset.open(tmp / DATA_DIR)
    digest, positions, mean_digest = content_hash(bench_ds)
    cfg = EvalConfig()
    settings = {k: getattr(cfg, k) for k in PROTOCOL} | (protocol or {})
    unknown = set(settings) - set(PROTOCOL)
    if unknown:
        raise NLAError(f"unknown protocol setting(s): {', '.join(sorted(unknown))}")
    manifest = {
        "kind": BENCH_KIND, "schema_version": BENCH_SCHEMA_VERSION,
        "name": name or out.name,
        "content_sha256": digest,
        "positions_sha256": positions,
        "mean_vector_sha256": mean_digest,
        "base_model": ds.meta.base_model, "layer_index": ds.meta.layer_index, "d_model": ds.meta.d_model,
        "corpus": ds.meta.corpus, "sampling": ds.meta.sampling,
        "source": {"path": str(Path(data).resolve()), "split": split, "rows_in_split": total},
        "eval_rows": table.num_rows, "ridge_rows": ridge.num_rows,
        "protocol": settings,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "nla_version": __version__,
    }
    write_yaml(tmp / MANIFEST, manifest)
    if out.exists():
        if not (out / MANIFEST).exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise NLAError(f"{out}: exists and is not a bench; choose another --out")
        shutil.rmtree(out)
    tmp.rename(out)
    return manifest


@dataclass
class Bench:
    path: Path
    manifest: dict[str, Any]
    dataset: Any

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Bench:
        from nla.data.store import ActivationDataset

        root = Path(path)
        if not (root / MANIFEST).exists():
            raise NLAError(f"{root}: not a bench (no {MANIFEST}); make one with `nla bench make`")
        manifest = read_yaml(root / MANIFEST)
        if manifest.get("kind") != BENCH_KIND:
            raise NLAError(f"{root / MANIFEST}: field 'kind' is {manifest.get('kind')!r}, expected {BENCH_KIND!r}")
        if manifest.get("schema_version") != BENCH_SCHEMA_VERSION:
            raise NLAError(f"{root / MANIFEST}: schema_version {manifest.get('schema_version')!r}, "
                           f"this nla reads {BENCH_SCHEMA_VERSION}")
        ds = ActivationDataset.open(root / DATA_DIR)
        if verify:
            digest, _, _ = content_hash(ds)
            if digest != manifest.get("content_sha256"):
                raise NLAError(f"{root}: content hash {digest[:12]}… does not match the manifest's "
                               f"{str(manifest.get('content_sha256'))[:12]}…: the bench data was changed")
        return cls(root, manifest, ds)

    @property
    def revision(self) -> str:
        return str(self.manifest["content_sha256"])[:12]


# --------------------------------------------------------------------------- run
def _names(specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=PATH`` or ``PATH`` (named after its folder); names made unique."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, Path(spec.rstrip("/")).name or spec
        base, k = name, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        out.append((name, path))
    return out


def run_bench(bench_path: str | Path, nlas: list[str], out: str | Path, *, device: str = "auto",
              dtype: str = "float32", progress: bool = True) -> list[dict[str, Any]]:
    """Score every NLA on the bench; writes the leaderboard; returns its rows (best first)."""
    from nla.bundle import NLA
    from nla.eval.model_index import model_index
    from nla.eval.report import write_report
    from nla.eval.suite import EvalConfig, bundle_fingerprint, evaluate

    if not nlas:
        raise NLAError("give at least one --nla")
    bench = Bench.open(bench_path)
    out = Path(out)
    (out / "reports").mkdir(parents=True, exist_ok=True)
    (out / "model_index").mkdir(exist_ok=True)
    mean = bench.dataset.mean_vector().float()
    rows = []
    for name, path in _names(nlas):
        cfg = EvalConfig(nla=path, data=str(bench.path / DATA_DIR), out=str(out / "reports" / name), split="eval",
                         device=device, dtype=dtype, progress=progress,
                         **bench.manifest["protocol"])
        nla = NLA.from_pretrained(path, dtype=dtype, device=device)
        nla.merge_adapters()
        nla.mean_vector = mean  # the bench's μ for everyone (module docstring)
        fingerprint = bundle_fingerprint(path) if Path(path).is_dir() else str(path)
        result = evaluate(nla, bench.dataset, cfg, cache_dir=Path(cfg.out) / "cache", fingerprint=fingerprint)
        result.metrics["bundle"]["path"] = str(path)
        result.metrics["dataset"]["mean_vector_source"] = "bench"
        result.metrics["bench"] = {k: bench.manifest.get(k) for k in ("name", "content_sha256", "positions_sha256")}
        write_report(result, cfg.out)
        block = model_index(name, result.metrics, dataset_name=str(bench.manifest["name"]),
                            dataset_type=f"nla-bench/{bench.manifest['name']}", revision=bench.revision)
        write_yaml(out / "model_index" / f"{name}.yaml", {"model-index": block})
        rows.append({"name": name, "path": str(path), "av_format": nla.meta.av_format,
                     "metrics": result.metrics, "model_index": block})
        del nla
    from nla.eval.report import lookup

    rows.sort(key=lambda r: -(lookup(r["metrics"], "round_trip.fve_nrm") or -1e9))
    _write_leaderboard(bench, rows, out)
    return rows


# --------------------------------------------------------------------------- leaderboard
def _cell(value: Any, signed: bool) -> str:
    from nla.eval.report import fmt

    if isinstance(value, float) and signed:
        return f"{value:+.3f}"
    return fmt(value)


def _ci(m: dict[str, Any]) -> str:
    from nla.eval.report import lookup

    ci = lookup(m, "round_trip.ci95.fve_nrm")
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2 else ""


def _floor(rows: list[dict[str, Any]]) -> str:
    from nla.eval.report import fmt, lookup

    m = rows[0]["metrics"] if rows else {}
    return (f"mean-direction floor fve_nrm {fmt(lookup(m, 'baselines.mean_direction.fve_nrm'))} "
            f"(fve_meannorm 0 by construction); chance top-1 {fmt(1 / lookup(m, 'round_trip.n_candidates')) if lookup(m, 'round_trip.n_candidates') else '—'}")


def leaderboard_markdown(bench: Bench, rows: list[dict[str, Any]]) -> str:
    from nla.eval.report import lookup

    man = bench.manifest
    lines = [f"# NLA bench `{man['name']}`", "",
             f"{man['eval_rows']} held-out positions of `{man['base_model']}` at layer {man['layer_index']} "
             f"(output of block {man['layer_index']}), corpus `{man['corpus']}`, split `{man['source']['split']}`; "
             f"content sha256 `{man['content_sha256']}`.", "",
             f"Protocol: {', '.join(f'{k}={v}' for k, v in man['protocol'].items())}. {_floor(rows)}.", "",
             "| rank | NLA | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
             "|---:|---|" + "---:|" * len(COLUMNS)]
    for i, r in enumerate(rows, 1):
        cells = [_cell(lookup(r["metrics"], p), s) + (_ci(r["metrics"]) if p == "round_trip.fve_nrm" else "")
                 for _, p, s in COLUMNS]
        lines.append(f"| {i} | {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "fve_nrm is the headline (0 = no better than the training mean, 1 = perfect; 95 % bootstrap "
              "interval in brackets). Δ columns: change of fve_nrm when the AV's explanation is paraphrased, loses one "
              "claim, or has its words shuffled. Causal: 1 − KL(reconstruction patched)/KL(mean patched) on the "
              "next-token distribution. Full reports: `reports/NAME/index.html`; model-index blocks: `model_index/`."]
    return "\n".join(lines) + "\n"


def leaderboard_html(bench: Bench, rows: list[dict[str, Any]]) -> str:
    from nla.eval.report import CSS, lookup

    man = bench.manifest
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c, _, _ in COLUMNS)
    body = []
    for i, r in enumerate(rows, 1):
        cells = "".join(f"<td>{e(_cell(lookup(r['metrics'], p), s))}"
                        f"{'<br><small>' + e(_ci(r['metrics'])) + '</small>' if p == 'round_trip.fve_nrm' else ''}</td>"
                        for _, p, s in COLUMNS)
        body.append(f'<tr><td>{i}</td><td class="l"><a href="reports/{e(r["name"])}/index.html">{e(r["name"])}</a>'
                    f'<br><small>{e(r["path"])}</small></td>{cells}</tr>')
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>NLA bench {e(str(man['name']))}</title>"
            f"<style>{CSS}</style></head><body><h1>NLA bench <code>{e(str(man['name']))}</code></h1>"
            f"<p>{e(str(man['eval_rows']))} held-out positions of <code>{e(str(man['base_model']))}</code> at layer "
            f"{e(str(man['layer_index']))}, corpus <code>{e(str(man['corpus']))}</code>; content sha256 "
            f"<code>{e(str(man['content_sha256']))}</code></p>"
            f"<p><small>{e(', '.join(f'{k}={v}' for k, v in man['protocol'].items()))}. {e(_floor(rows))}.</small></p>"
            f'<table id="leaderboard"><tr><th>rank</th><th class="l">NLA</th>{head}</tr>{"".join(body)}</table>'
            "</body></html>\n")


def _write_leaderboard(bench: Bench, rows: list[dict[str, Any]], out: Path) -> None:
    from nla.names import write_text_atomic

    write_text_atomic(out / "leaderboard.md", leaderboard_markdown(bench, rows))
    write_text_atomic(out / "leaderboard.html", leaderboard_html(bench, rows))
    summary = {"bench": bench.manifest, "rows": [
        {"rank": i, "name": r["name"], "path": r["path"], "report": f"reports/{r['name']}",
         "model_index": r["model_index"]} for i, r in enumerate(rows, 1)]}
    write_text_atomic(out / "leaderboard.json", json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n")


# --------------------------------------------------------------------------- CLI
def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "make":
        protocol = {k: getattr(args, k) for k in PROTOCOL if getattr(args, k, None) is not None}
        man = make_bench(args.data, args.out, split=args.split, max_rows=args.max_rows or None,
                         ridge_rows=args.ridge_rows or None, name=args.name, protocol=protocol, seed=args.sample_seed)
        print(f"{args.out}: bench {man['name']!r}, {man['eval_rows']} held-out rows + {man['ridge_rows']} ridge rows, "
              f"content sha256 {man['content_sha256']}")
        return 0
    if args.bench_command == "run":
        from nla.config import check_device

        check_device(args.device, "--device")  # a missing GPU is one line, before any bundle loads
        rows = run_bench(args.bench, args.nla, args.out, device=args.device, dtype=args.dtype,
                         progress=not args.no_progress)
        print((Path(args.out) / "leaderboard.md").read_text(encoding="utf-8"))
        print(f"{len(rows)} NLAs scored; open {args.out}/leaderboard.html")
        return 0
    if args.bench_command == "verify":
        bench = Bench.open(args.bench)
        print(f"{args.bench}: bench {bench.manifest['name']!r} intact, content sha256 {bench.manifest['content_sha256']}")
        return 0
    raise NLAError("say `nla bench make`, `nla bench run` or `nla bench verify` (see --help)")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="score several NLAs on one pinned held-out activation set; leaderboard + model-index",
        description="`nla bench make` pins a bench (held-out rows, ridge labels, μ, protocol, content hash); "
        "`nla bench run BENCH --nla A --nla B` scores each NLA with the same suite as `nla eval` and writes "
        "leaderboard.md/.html/.json and a model-index block per NLA; `nla bench verify BENCH` checks the hash. "
        "Layer K = output of decoder block K (hidden_states[K+1]); every NLA must read the bench's layer.")
    p.set_defaults(func=cmd_bench, bench_command=None)
    inner = p.add_subparsers(dest="bench_command", metavar="make|run|verify")
    m = inner.add_parser("make", help="pin a bench from a dataset's held-out split")
    m.add_argument("--data", required=True, help="activation dataset (folder or .parquet) to draw the bench from")
    m.add_argument("--out", required=True, help="bench folder to write (bench.yaml + data/)")
    m.add_argument("--split", default="eval", help="held-out split to sample (default: eval)")
    m.add_argument("--max-rows", type=int, default=256, help="held-out rows in the bench (a seeded sample; 0: all)")
    m.add_argument("--ridge-rows", type=int, default=20000, help="most labelled ar_sft rows kept for the ridge baseline (0: all)")
    m.add_argument("--name", default=None, help="bench name (default: the folder name)")
    m.add_argument("--sample-seed", type=int, default=0, help="seed of the row sample")
    for key, tp, help_ in [("n_candidates", int, "top-1 retrieval among N"), ("best_of", int, "best-of-k (0: skip)"),
                           ("temperature", float, "best-of-k sampling temperature"), ("top_p", float, "best-of-k nucleus"),
                           ("max_new_tokens", int, "AV generation budget"), ("bootstrap", int, "bootstrap resamples"),
                           ("batch_size", int, "generation batch (seeds sampling per chunk)"),
                           ("seed", int, "evaluation seed")]:
        m.add_argument("--" + key.replace("_", "-"), dest=key, type=tp, default=None, help=f"protocol: {help_} (default: as nla eval)")
    m.add_argument("--no-probes", dest="probes", action="store_const", const=False, default=None, help="protocol: skip the probes")
    m.add_argument("--no-causal", dest="causal", action="store_const", const=False, default=None, help="protocol: skip the causal block")
    m.set_defaults(func=cmd_bench)
    r = inner.add_parser("run", help="score NLAs on a bench and write the leaderboard")
    r.add_argument("bench", help="bench folder (from `nla bench make`)")
    r.add_argument("--nla", action="append", default=[], help="bundle folder or release, NAME=PATH to name it (repeat)")
    r.add_argument("--out", required=True, help="leaderboard folder")
    add_device_flag(r)
    r.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="model dtype (default: float32)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_bench)
    v = inner.add_parser("verify", help="check a bench's content against its manifest hash")
    v.add_argument("bench", help="bench folder")
    v.set_defaults(func=cmd_bench)
