"""`nla eval`: everything measured about an NLA on one split, as a metrics dict + samples.

What it computes (the schema is documented in docs/eval.md; bump ``SCHEMA_VERSION`` on any
change that breaks a reader):

1. AR alone on the teacher explanations (skipped, with a note, for unlabelled data);
2. the round trip AV → AR: FVE, top-1 retrieval among N, correct-vs-shuffled gap, best-of-k;
3. baselines: mean direction, shuffled activations, bag-of-words ridge;
4. faithfulness probes: paraphrase (rules, and the teacher's when one can), claim ablation,
   word shuffle;
5. causal faithfulness: reconstructions patched into the base model at layer K, KL to the
   clean next-token distribution against mean ablation (:mod:`nla.eval.causal`);
6. explanation quality: lengths, distinct rate, unparseable rate, opening phrases, judge;
7. breakdowns by document, position bucket and category columns.

Each is one function (``ar_alone_block``, ``round_trip_block``, ``best_of_k_block``,
``baselines_block``, ``probes_block``, ``causal_block``, ``quality_block``, ``breakdowns_block``)
over the shared :class:`EvalInputs` from :func:`prepare_inputs`, so it can be run, tested or
skipped alone; :func:`evaluate` composes them into metrics.json.

Every metric comes from :mod:`nla.metrics`; this module only decides what is compared with
what. AV generations, the slow part, are cached under ``REPORT/cache/`` chunk by chunk, keyed
by the bundle's files and the generation settings, so a killed or repeated run resumes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from nla import metrics
from nla.config import opt, validate
from nla.config_fields import (
    AnswerFields,
    BackendFields,
    LoggingFields,
    RuntimeFields,
    SamplingFields,
    override,
)
from nla.data.store import SPLITS, VECTOR_COLUMN, ActivationDataset, arrow_to_vectors
from nla.errors import NLAError
from nla.eval import baselines, probes
from nla.models.loading import check_4bit_available, load_in_4bit
from nla.names import EVAL_KIND, EVAL_SCHEMA_VERSION

SCHEMA_VERSION = EVAL_SCHEMA_VERSION
KIND = EVAL_KIND
BASE_COLUMNS = {"doc_id", "position", "context", VECTOR_COLUMN, "split", "explanation"}
POSITION_EDGES = (0, 32, 64, 128, 256, 512, 1024, 2048)
MAX_CATEGORY_VALUES = 50
MAX_CLAIMS = 8


@dataclass
class EvalConfig(SamplingFields, BackendFields, RuntimeFields, LoggingFields):
    nla: str = opt("", help="NLA bundle folder", required=True)
    data: str = opt("", help="activation dataset folder (or single .parquet file) to evaluate on", required=True)
    out: str = opt("", help="report folder: metrics.json, samples.jsonl, index.html, plots/", required=True)
    split: str = opt("eval", help="split to evaluate (av_sft, ar_sft, rl, eval)")
    max_rows: int | None = opt(None, help="evaluate at most N rows of the split (a seeded sample; default: all)")
    n_candidates: int = opt(16, help="top-1 retrieval: the true vector among N candidates (chance = 1/N)")
    best_of: int = opt(4, help="best-of-k: k sampled explanations per vector (--temperature, --top-p), the best "
                       "reconstruction counts (0: skip)")
    # Longer than RL's answers: eval reads the AV's whole explanation, not a rollout.
    max_new_tokens: int = override(AnswerFields, "max_new_tokens", 96)
    batch_size: int = opt(32, help="sequences per AV generation batch and texts per AR batch")
    bootstrap: int = opt(1000, help="bootstrap resamples for the 95%% intervals of headline metrics (0: none)")
    probes: bool = opt(True, help="run the faithfulness probes (paraphrase, claim ablation, word shuffle)")
    causal: bool = opt(True, help="causal faithfulness: patch each reconstruction into the base model at layer K and "
                       "measure the KL to the clean next-token distribution against mean ablation (--no-causal: skip)")
    teacher: str | None = opt(None, help="teacher for paraphrase-by-teacher and the LLM judge (spec as in `nla label`); it must answer free-form prompts")
    base_url: str | None = opt(None, help="API endpoint of the teacher")
    api_key_env: str | None = opt(None, help="environment variable holding the teacher's API key (never written anywhere)")
    judge_rows: int = opt(64, help="rows sent to the LLM judge")
    category_columns: list[str] = opt([], help="extra dataset columns to break down by (default: every extra column with at most 50 values)")
    html_samples: int = opt(500, help="most samples shown in index.html (samples.jsonl has all)")
    load_in_4bit: bool = opt(False, help="load the base weights in 4-bit NF4 (CUDA + bitsandbytes), as `train sft|rl "
                             "--load-in-4bit`; adapters then stay unmerged")


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    plots: dict[str, Any] = field(default_factory=dict)  # arrays the report plots


# --------------------------------------------------------------------------- rows
@dataclass
class EvalRows:
    rows: list[dict[str, Any]]
    vectors: torch.Tensor
    categories: dict[str, list[Any]]
    total: int


def select_rows(ds: ActivationDataset, split: str, max_rows: int | None, seed: int,
                category_columns: list[str] | None = None) -> EvalRows:
    """The split's rows (a seeded sample of ``max_rows``, kept in dataset order)."""
    table = ds.table(None, split=split)
    total = table.num_rows
    if total == 0:
        present = sorted({r["split"] for r in ds.rows()})
        raise NLAError(f"{ds.path}: split {split!r} has no rows (splits present: {', '.join(present) or 'none'})")
    if max_rows is not None:
        if max_rows < 1:
            raise NLAError(f"--max-rows must be at least 1, got {max_rows}")
        if max_rows < total:
            gen = torch.Generator().manual_seed(seed)
            keep = sorted(torch.randperm(total, generator=gen)[:max_rows].tolist())
            table = table.take(keep)
    vectors = torch.from_numpy(arrow_to_vectors(table.column(VECTOR_COLUMN), ds.d_model).copy())
    names = [n for n in table.column_names if n != VECTOR_COLUMN]
    rows = table.select(names).to_pylist()
    extra = [n for n in names if n not in BASE_COLUMNS]
    if category_columns:
        missing = [c for c in category_columns if c not in table.column_names]
        if missing:
            raise NLAError(f"{ds.path}: no column {missing[0]!r} for --category-columns (extra columns: {', '.join(extra) or 'none'})")
        chosen = list(category_columns)
    else:
        chosen = [c for c in extra if 1 < len({_hashable(r[c]) for r in rows}) <= MAX_CATEGORY_VALUES]
    categories = {c: [_hashable(r[c]) for r in rows] for c in chosen}
    return EvalRows(rows, vectors, categories, total)


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool)) or value is None else json.dumps(value, default=str)


def row_key(row: dict[str, Any]) -> str:
    return f"{row.get('doc_id')}\x00{row.get('position')}"


# --------------------------------------------------------------------------- generation cache
def bundle_fingerprint(path: str | Path) -> str:
    """Names, sizes and mtimes of the bundle's files: changes whenever the AV is re-saved."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(root)}\x00{st.st_size}\x00{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def generate_cached(
    nla: Any, vectors: torch.Tensor, keys: list[str], *, n: int, sample: bool, cfg: EvalConfig,
    cache_dir: Path | None, fingerprint: str, desc: str, backend: Any = None,
) -> list[list[dict[str, Any]]]:
    """``n`` answers per vector, generated in fixed chunks; each finished chunk is appended to
    the cache so a resumed run regenerates only the chunks it lacks (same seeds, same text)."""
    chunk = max(1, cfg.batch_size // n)
    settings = {"n": n, "sample": sample, "max_new_tokens": cfg.max_new_tokens, "chunk": chunk,
                "temperature": cfg.temperature if sample else None, "top_p": cfg.top_p if sample else None,
                "seed": cfg.seed, "fingerprint": fingerprint}
    if cfg.generation_backend != "transformers":
        settings["backend"] = cfg.generation_backend  # other answers; transformers keeps its old cache keys
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    done: dict[str, list[dict[str, Any]]] = {}
    cache = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        cache = cache_dir / f"{desc}-{digest}.jsonl"
        if cache.exists():
            for line in cache.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill: that chunk is regenerated
                done[item["key"]] = item["answers"]
    bar = tqdm(total=len(keys), desc=desc, unit="vec", disable=not cfg.progress)
    for start in range(0, len(keys), chunk):
        ks = keys[start : start + chunk]
        if all(k in done for k in ks):
            bar.update(len(ks))
            continue
        gen: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": sample,
                               "batch_size": cfg.batch_size}
        if sample:
            # Seeded per chunk, so a resumed run samples exactly what the first run would have.
            gen.update(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + start)
        # backend: nla.train.generation (eval --generation-backend); its transformers one is nla.verbalize.
        outs = (backend or nla).verbalize(vectors[start : start + chunk], n=n, **gen)
        lines = []
        for k, answers in zip(ks, outs):
            done[k] = [{"explanation": a.explanation, "raw": a.raw, "truncated": bool(a.truncated)} for a in answers]
            lines.append(json.dumps({"key": k, "answers": done[k]}, ensure_ascii=False))
        if cache is not None:
            with cache.open("a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
        bar.update(len(ks))
    bar.close()
    return [done[k] for k in keys]


def reconstruct(nla: Any, texts: list[str], cfg: EvalConfig, desc: str) -> torch.Tensor:
    """``nla.reconstruct`` with a progress bar: texts sorted by length once (least padding),
    passed on in slices of a few batches, put back in order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros((len(texts), nla.meta.d_model))
    step = 4 * cfg.batch_size
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not cfg.progress) as bar:
        for start in range(0, len(order), step):
            idx = order[start : start + step]
            out[idx] = nla.reconstruct([texts[i] for i in idx], batch_size=cfg.batch_size).float()
            bar.update(len(idx))
    return out


def answer_text(answer: dict[str, Any]) -> str:
    """What the AR reads: the parsed explanation, else the raw text (as ``NLA.round_trip``)."""
    return answer["explanation"] if answer["explanation"] is not None else answer["raw"]


# --------------------------------------------------------------------------- metric blocks
def bootstrap_ci(stat: Callable[[torch.Tensor], float], n: int, reps: int, seed: int) -> list[float] | None:
    """Percentile 95% interval of ``stat(indices)`` over ``reps`` resamples of the rows."""
    if reps <= 0 or n < 2:
        return None
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(reps):
        v = stat(torch.randint(0, n, (n,), generator=gen))
        if math.isfinite(v):
            values.append(v)
    if not values:
        return None
    t = torch.tensor(values, dtype=torch.float64)
    return [float(torch.quantile(t, 0.025)), float(torch.quantile(t, 0.975))]


def metric_block(pred: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, cfg: EvalConfig,
                 *, intervals: bool = True) -> dict[str, Any]:
    """The standard block: summarize + top-1 + shuffled gap (+ bootstrap intervals)."""
    if len(target) == 0:
        return {"n": 0}
    out: dict[str, Any] = metrics.summarize(pred, target, mean)
    out["top1"] = metrics.top1_retrieval(pred, target, cfg.n_candidates, cfg.seed)
    out["shuffled_gap"] = metrics.shuffled_gap(pred, target, cfg.seed)
    out = {k: _finite(v) for k, v in out.items()}
    if intervals and cfg.bootstrap > 0:
        mse = metrics.mse_nrm(pred, target)
        cos = metrics.cosine(pred, target)
        hits = metrics.retrieval_hits(pred, target, cfg.n_candidates, cfg.seed).float()
        n, reps, seed = len(target), cfg.bootstrap, cfg.seed + 17
        out["ci95"] = {
            "fve_nrm": bootstrap_ci(lambda i: metrics.fve_nrm(pred[i], target[i], mean), n, reps, seed),
            "fve_meannorm": bootstrap_ci(lambda i: metrics.fve_meannorm(pred[i], target[i], mean), n, reps, seed),
            "mse_nrm": bootstrap_ci(lambda i: float(mse[i].mean()), n, reps, seed),
            "cosine": bootstrap_ci(lambda i: float(cos[i].mean()), n, reps, seed),
            "top1": bootstrap_ci(lambda i: float(hits[i].mean()), n, reps, seed),
        }
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _finite(v: Any) -> Any:
    """NaN/inf become None: JSON has no NaN, and a reader should see 'not measurable'."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "median": None, "p10": None, "p90": None, "min": None, "max": None}
    t = torch.tensor(values, dtype=torch.float64)
    return {"n": len(values), "mean": float(t.mean()), "median": float(torch.quantile(t, 0.5)),
            "p10": float(torch.quantile(t, 0.1)), "p90": float(torch.quantile(t, 0.9)),
            "min": float(t.min()), "max": float(t.max())}


def position_bucket(position: Any) -> str:
    if not isinstance(position, int) or position < 0:
        return "unknown"
    for lo, hi in itertools.pairwise(POSITION_EDGES):
        if lo <= position < hi:
            return f"{lo}-{hi - 1}"
    return f"{POSITION_EDGES[-1]}+"


def group_table(keys: list[Any], fve: torch.Tensor, mse: torch.Tensor, cos: torch.Tensor,
                ar_fve: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """Per group: n and the means of the per-row round-trip numbers (B over all rows, so the
    group means average back to the headline)."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    out = []
    for k, idx in groups.items():
        ix = torch.tensor(idx)
        entry: dict[str, Any] = {"key": k, "n": len(idx), "fve_nrm": float(fve[ix].mean()),
                                 "mse_nrm": float(mse[ix].mean()), "cosine": float(cos[ix].mean())}
        if ar_fve is not None:
            vals = [ar_fve[i] for i in idx if i in ar_fve]
            entry["ar_alone_fve_nrm"] = sum(vals) / len(vals) if vals else None
        out.append(entry)
    return out


def quality(texts: list[str], answers: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Length distribution, distinct rate, unparseable/truncated rates, frequent openings."""
    n = len(texts)
    lengths = [len(t.split()) for t in texts]
    openings: Counter[str] = Counter()
    for t in texts:
        claims, _ = probes.split_claims(t)
        first = " ".join((claims[0] if claims else "").lower().split()[:4])
        if first:
            openings[first] += 1
    out: dict[str, Any] = {
        "n": n,
        "length_words": _stats([float(x) for x in lengths]),
        "distinct_rate": len(set(texts)) / n if n else None,
        "top_openings": [{"phrase": p, "count": c, "fraction": c / n} for p, c in openings.most_common(10)],
    }
    if answers is not None:
        out["unparseable_rate"] = sum(a["explanation"] is None for a in answers) / n if n else None
        out["truncated_rate"] = sum(bool(a["truncated"]) for a in answers) / n if n else None
    return out


def sampled_token(tokenizer: Any, context: str | None) -> str:
    """The text of the last token of ``context`` (the sampled position), for highlighting."""
    if not context:
        return ""
    ids = tokenizer.encode(context, add_special_tokens=False)
    if not ids:
        return ""
    token = tokenizer.decode(ids[-1:])
    return token if context.endswith(token) else ""


# --------------------------------------------------------------------------- the suite
@dataclass
class EvalInputs:
    """What every block reads: the rows being scored, their vectors, μ and B, the run's settings.

    Built once by :func:`prepare_inputs`; each block below takes it (plus the outputs of the
    blocks it depends on) and returns its part of metrics.json, so a block can be run, tested or
    skipped alone."""

    nla: Any
    ds: ActivationDataset
    cfg: EvalConfig
    sel: EvalRows
    mean: torch.Tensor
    mean_source: str
    b_all: torch.Tensor  # B over the rows scored (docs/design.md §6), shared by every per-row FVE
    keys: list[str]
    labelled: list[int]  # indices of rows with a teacher label
    cache_dir: Path | None = None
    fingerprint: str = ""
    teacher: Any = None
    backend: Any = None  # the AV generation backend (nla.train.generation); None: nla.verbalize

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.sel.rows

    @property
    def target(self) -> torch.Tensor:
        return self.sel.vectors

    @property
    def n(self) -> int:
        return len(self.sel.rows)


@dataclass
class RoundTrip:
    """The greedy AV → AR round trip, per row; the blocks after it compare against it."""

    answers: list[dict[str, Any]]
    texts: list[str]  # what the AR read (:func:`answer_text`)
    pred: torch.Tensor
    fve: torch.Tensor
    mse: torch.Tensor
    cos: torch.Tensor
    hits: torch.Tensor


@dataclass
class BestOfK:
    block: dict[str, Any] | None  # None when --best-of 0
    texts: list[str] | None = None
    fve: torch.Tensor | None = None


def prepare_inputs(nla: Any, ds: ActivationDataset, cfg: EvalConfig, *, cache_dir: Path | None = None,
                   fingerprint: str = "", teacher: Any = None, backend: Any = None) -> EvalInputs:
    """Check the bundle against the dataset and the settings, select the rows, choose μ."""
    if ds.meta.d_model != nla.meta.d_model:
        raise NLAError(f"dataset {ds.path} has d_model={ds.meta.d_model}, bundle has {nla.meta.d_model}")
    if ds.meta.layer_index >= 0 and ds.meta.layer_index != nla.meta.layer_index:
        raise NLAError(f"dataset {ds.path} was extracted at layer {ds.meta.layer_index}, bundle reads layer {nla.meta.layer_index}")
    if cfg.n_candidates < 2:
        raise NLAError(f"--n-candidates must be at least 2, got {cfg.n_candidates}")
    if cfg.best_of < 0:
        raise NLAError(f"--best-of must be 0 or more, got {cfg.best_of}")

    sel = select_rows(ds, cfg.split, cfg.max_rows, cfg.seed, cfg.category_columns or None)
    n = len(sel.rows)
    if n < 2:
        raise NLAError(f"{ds.path}: split {cfg.split!r} has {n} row; evaluation needs at least 2")
    # Precedence (docs/design.md §7): the bundle's training mean over the dataset's.
    if nla.mean_vector is not None:
        mean, mean_source = nla.mean_vector.float(), "bundle"
    else:
        mean, mean_source = ds.mean_vector().float(), "dataset"
    return EvalInputs(
        nla=nla, ds=ds, cfg=cfg, sel=sel, mean=mean, mean_source=mean_source,
        b_all=metrics.baseline_variance(sel.vectors, mean), keys=[row_key(r) for r in sel.rows],
        labelled=[i for i, r in enumerate(sel.rows) if r.get("explanation")],
        cache_dir=cache_dir, fingerprint=fingerprint, teacher=teacher, backend=backend)


def ar_alone_block(inp: EvalInputs) -> tuple[dict[str, Any], dict[int, float]]:
    """The AR on the teacher's explanations: (block, per-row FVE by row index)."""
    n, labelled, target = inp.n, inp.labelled, inp.target
    if not labelled:
        return {"available": False, "n": 0,
                "note": "the dataset has no teacher labels on this split (run `nla label`); AR-alone block skipped"}, {}
    ix = torch.tensor(labelled)
    pred = reconstruct(inp.nla, [inp.rows[i]["explanation"] for i in labelled], inp.cfg, "ar-alone")
    block: dict[str, Any] = {"available": True, "note": None, **metric_block(pred, target[ix], inp.mean, inp.cfg)}
    if len(labelled) < n:
        block["note"] = f"{n - len(labelled)} of {n} rows have no teacher label and are left out"
    per = metrics.per_row_fve(pred, target[ix], inp.mean)
    return block, {i: float(v) for i, v in zip(labelled, per)}


def av_answers(inp: EvalInputs, *, n: int, sample: bool, desc: str) -> list[list[dict[str, Any]]]:
    """``n`` AV answers per row (greedy or sampled), through the generation cache."""
    return generate_cached(inp.nla, inp.target, inp.keys, n=n, sample=sample, cfg=inp.cfg, cache_dir=inp.cache_dir,
                           fingerprint=inp.fingerprint, desc=desc, backend=inp.backend)


def round_trip_scores(inp: EvalInputs, answers: list[dict[str, Any]]) -> RoundTrip:
    """The AR's reconstructions of the AV's greedy answers, scored per row."""
    texts = [answer_text(a) for a in answers]
    pred = reconstruct(inp.nla, texts, inp.cfg, "ar-round-trip")
    target, mean = inp.target, inp.mean
    return RoundTrip(answers=answers, texts=texts, pred=pred,
                     fve=metrics.per_row_fve(pred, target, mean, inp.b_all),
                     mse=metrics.mse_nrm(pred, target), cos=metrics.cosine(pred, target),
                     hits=metrics.retrieval_hits(pred, target, inp.cfg.n_candidates, inp.cfg.seed))


def round_trip_block(inp: EvalInputs, rt: RoundTrip) -> dict[str, Any]:
    block = metric_block(rt.pred, inp.target, inp.mean, inp.cfg)
    block["n_candidates"] = min(inp.cfg.n_candidates, inp.n)
    return block


def best_of_k_block(inp: EvalInputs) -> BestOfK:
    """k sampled answers per row; the best reconstruction of each row counts."""
    cfg, n, target, mean = inp.cfg, inp.n, inp.target, inp.mean
    if cfg.best_of <= 0:
        return BestOfK(None)
    k = cfg.best_of
    samples_k = av_answers(inp, n=k, sample=True, desc=f"av-sample{k}")
    flat = [answer_text(a) for per in samples_k for a in per]
    pred_k = reconstruct(inp.nla, flat, cfg, "ar-best-of-k")
    target_k = target.repeat_interleave(k, dim=0)
    mse_k = metrics.mse_nrm(pred_k, target_k).view(n, k)
    pick = torch.arange(n) * k + mse_k.argmin(dim=1)
    best_pred = pred_k[pick]
    block = {
        "k": k, "temperature": cfg.temperature,
        **metric_block(best_pred, target, mean, cfg),
        "sample_fve_nrm": metrics.fve_nrm(pred_k, target_k, mean),
        "sample_unparseable_rate": sum(a["explanation"] is None for per in samples_k for a in per) / (n * k),
    }
    return BestOfK(block, [flat[int(j)] for j in pick], metrics.per_row_fve(best_pred, target, mean, inp.b_all))


def vs_mean_direction(inp: EvalInputs, rt: RoundTrip) -> dict[str, Any]:
    """The round trip's margin over "predict the mean direction", with a paired interval (same
    rows resampled for both): the test that the words carry anything at all."""
    cfg = inp.cfg
    base = baselines.mean_direction(inp.mean, inp.n)
    margin = rt.fve - metrics.per_row_fve(base, inp.target, inp.mean, inp.b_all)
    return {
        "delta_fve_nrm": float(margin.mean()),
        "ci95": bootstrap_ci(lambda i: float(margin[i].mean()), inp.n, cfg.bootstrap, cfg.seed + 31) if cfg.bootstrap > 0 else None,
    }


def baselines_block(inp: EvalInputs, rt: RoundTrip) -> tuple[dict[str, Any], torch.Tensor]:
    """Mean direction, shuffled activations and the bag-of-words ridge: (block, the derangement
    used for the shuffled baseline, which the causal check reuses)."""
    cfg, target, mean = inp.cfg, inp.target, inp.mean
    mean_block = metric_block(baselines.mean_direction(mean, inp.n), target, mean, cfg)
    mean_block["check_fve_meannorm_zero"] = bool(abs(mean_block["fve_meannorm"]) < 1e-6)
    wrong = derangement([str(r.get("doc_id")) for r in inp.rows], cfg.seed)
    shuffled = metric_block(rt.pred[wrong], target, mean, cfg)
    shuffled["note"] = "each row scored against the AV's explanation of another document's vector"
    ridge_block = ridge_baseline(inp.ds, inp.nla.meta.d_model, inp.rows, inp.labelled, rt.texts, target, mean, cfg)
    return {"mean_direction": mean_block, "shuffled_activations": shuffled, "bow_ridge": ridge_block}, wrong


def probes_block(inp: EvalInputs, rt: RoundTrip) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The faithfulness probes (``{"enabled": False}`` with --no-probes): (block, per-row values)."""
    if not inp.cfg.probes:
        return {"enabled": False}, {}
    return run_probes(inp.nla, rt.texts, inp.target, inp.mean, rt.fve, inp.b_all, inp.cfg, inp.teacher)


def causal_block(inp: EvalInputs, rt: RoundTrip, wrong: torch.Tensor) -> tuple[dict[str, Any], Any]:
    """Causal faithfulness (:mod:`nla.eval.causal`; ``{"enabled": False}`` with --no-causal)."""
    if not inp.cfg.causal:
        return {"enabled": False}, None
    from nla.eval.causal import causal_faithfulness

    return causal_faithfulness(
        inp.nla, [r.get("context") or "" for r in inp.rows], inp.target, rt.pred, inp.mean, rt.texts, shuffled=wrong,
        claims=inp.cfg.probes, batch_size=inp.cfg.batch_size, progress=inp.cfg.progress)


def quality_block(inp: EvalInputs, rt: RoundTrip) -> dict[str, Any]:
    """The AV's explanations (with the optional LLM judge) beside the teacher's."""
    av_quality = quality(rt.texts, rt.answers)
    av_quality["judge"] = run_judge(inp.teacher, inp.rows, rt.texts, inp.cfg)
    teacher = quality([inp.rows[i]["explanation"] for i in inp.labelled], None) if inp.labelled else None
    return {"av": av_quality, "teacher": teacher}


def breakdowns_block(inp: EvalInputs, rt: RoundTrip, ar_row_fve: dict[int, float]) -> dict[str, Any]:
    """Round-trip (and AR-alone) numbers by document, position bucket and category column."""
    rows, ar = inp.rows, ar_row_fve or None

    def table(keys: list[Any]) -> list[dict[str, Any]]:
        return group_table(keys, rt.fve, rt.mse, rt.cos, ar)

    return {
        "document": sorted(table([r.get("doc_id") for r in rows]), key=lambda e: -e["fve_nrm"]),
        "position_bucket": sorted(table([position_bucket(r.get("position")) for r in rows]),
                                  key=lambda e: _bucket_order(e["key"])),
        "category": {c: sorted(table(vals), key=lambda e: str(e["key"])) for c, vals in inp.sel.categories.items()},
    }


def sample_records(inp: EvalInputs, rt: RoundTrip, ar_row_fve: dict[int, float], best: BestOfK,
                   probe_rows: dict[str, list[Any]], causal_rows: Any) -> list[dict[str, Any]]:
    """One record per row for samples.jsonl and the report."""
    samples = []
    tokenizer = inp.nla.tokenizer
    for i, r in enumerate(inp.rows):
        a = rt.answers[i]
        s: dict[str, Any] = {
            "index": i, "doc_id": r.get("doc_id"), "position": r.get("position"),
            "context": r.get("context"), "token": sampled_token(tokenizer, r.get("context")),
            "teacher_explanation": r.get("explanation"),
            "av_explanation": a["explanation"], "av_raw": a["raw"],
            "parseable": a["explanation"] is not None, "truncated": a["truncated"],
            "fve_nrm": float(rt.fve[i]), "mse_nrm": float(rt.mse[i]), "cosine": float(rt.cos[i]),
            "top1_hit": bool(rt.hits[i]),
            "ar_alone_fve_nrm": ar_row_fve.get(i),
            "best_of_k_fve_nrm": float(best.fve[i]) if best.fve is not None else None,
            "best_of_k_text": best.texts[i] if best.texts is not None else None,
            "categories": {c: vals[i] for c, vals in inp.sel.categories.items()},
        }
        for name, per in probe_rows.items():
            s[name] = per[i]
        if causal_rows is not None:
            s["causal_kl"] = causal_rows.kl_recon[i]
            s["causal_kl_mean_ablation"] = causal_rows.kl_mean[i]
            s["causal_claim_delta_kl"] = causal_rows.claim_delta_kl[i]
        samples.append(s)
    return samples


class _Laps:
    """Wall time per block, in the order run (metrics.json ``timing_s``)."""

    def __init__(self) -> None:
        self.timing: dict[str, float] = {}
        self.start = self.last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timing[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> dict[str, float]:
        self.timing["total"] = round(time.perf_counter() - self.start, 3)
        return self.timing


def evaluate(nla: Any, ds: ActivationDataset, cfg: EvalConfig, *, cache_dir: Path | None = None,
             fingerprint: str = "", teacher: Any = None, backend: Any = None) -> EvalResult:
    """Run every block of the module docstring on ``cfg.split`` of ``ds``."""
    from nla.names import VERSION as __version__

    lap = _Laps()
    inp = prepare_inputs(nla, ds, cfg, cache_dir=cache_dir, fingerprint=fingerprint, teacher=teacher, backend=backend)
    lap("load")
    ar_alone, ar_row_fve = ar_alone_block(inp)
    lap("ar_alone")
    answers = [a[0] for a in av_answers(inp, n=1, sample=False, desc="av-greedy")]
    lap("generate")
    rt = round_trip_scores(inp, answers)
    round_trip = round_trip_block(inp, rt)
    lap("round_trip")
    best = best_of_k_block(inp)
    round_trip["best_of_k"] = best.block
    lap("best_of_k")
    round_trip["vs_mean_direction"] = vs_mean_direction(inp, rt)
    baselines_out, wrong = baselines_block(inp, rt)
    lap("baselines")
    probe_block, probe_rows = probes_block(inp, rt)
    lap("probes")
    causal, causal_rows = causal_block(inp, rt, wrong)
    lap("causal")
    quality_out = quality_block(inp, rt)
    lap("quality")
    breakdowns = breakdowns_block(inp, rt, ar_row_fve)
    samples = sample_records(inp, rt, ar_row_fve, best, probe_rows, causal_rows)
    lap("samples")

    result = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "nla_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": {"path": str(ds.path), "split": cfg.split, "rows_in_split": inp.sel.total, "rows_evaluated": inp.n,
                    "labelled_rows": len(inp.labelled), "mean_vector_source": inp.mean_source,
                    "baseline_variance": float(inp.b_all), "layer_index": ds.meta.layer_index},
        "bundle": {"base_model": nla.meta.base_model, "layer_index": nla.meta.layer_index,
                   "d_model": nla.meta.d_model, "injection": nla.meta.injection.to_dict()},
        "settings": {k: getattr(cfg, k) for k in ("n_candidates", "best_of", "temperature", "top_p", "max_new_tokens",
                                                  "batch_size", "bootstrap", "seed", "probes", "causal", "max_rows")}
                    | {"teacher": cfg.teacher},
        "ar_alone": ar_alone,
        "round_trip": round_trip,
        "baselines": baselines_out,
        "probes": probe_block,
        "causal": causal,
        "quality": quality_out,
        "breakdowns": breakdowns,
        "timing_s": lap.total(),
        "notes": collect_notes(ar_alone, baselines_out, probe_block, causal),
    }
    plots = {"rt_fve": rt.fve.tolist(), "ar_fve": list(ar_row_fve.values()),
             "positions": [r.get("position") for r in inp.rows],
             "av_lengths": [len(t.split()) for t in rt.texts],
             "teacher_lengths": [len(inp.rows[i]["explanation"].split()) for i in inp.labelled],
             "causal_kl": [(a, b) for a, b in zip(causal_rows.kl_recon, causal_rows.kl_mean) if a is not None and b is not None]
             if causal_rows is not None else []}
    return EvalResult(result, samples, plots)


def collect_notes(ar_alone: dict[str, Any], baselines_out: dict[str, Any], probe_block: dict[str, Any],
                  causal: dict[str, Any]) -> list[str]:
    """The blocks' notes a reader must see, in block order (metrics.json ``notes``)."""
    notes: list[str] = []
    if not ar_alone["available"]:
        notes.append(ar_alone["note"])
    mean_block = baselines_out["mean_direction"]
    if not mean_block["check_fve_meannorm_zero"]:
        notes.append(f"CHECK FAILED: mean-direction fve_meannorm is {mean_block['fve_meannorm']:.3g}, expected 0")
    if not baselines_out["bow_ridge"]["available"]:
        notes.append(baselines_out["bow_ridge"]["note"])
    if probe_block.get("paraphrase_teacher", {}).get("note"):
        notes.append(probe_block["paraphrase_teacher"]["note"])
    if causal.get("note"):
        notes.append(causal["note"])
    return notes


def _bucket_order(key: str) -> float:
    if key == "unknown":
        return math.inf
    return float(key.split("-")[0].rstrip("+"))


def derangement(groups: list[str], seed: int) -> torch.Tensor:
    """For each row, a random other row — from another document whenever one exists, so the
    shuffled baseline never gets credit for two positions of the same text."""
    n = len(groups)
    gen = torch.Generator().manual_seed(seed + 1)
    out = torch.empty(n, dtype=torch.long)
    for i in range(n):
        order = torch.randperm(n, generator=gen).tolist()
        others = [j for j in order if groups[j] != groups[i]] or [j for j in order if j != i]
        out[i] = others[0]
    return out


def ridge_baseline(ds: ActivationDataset, d_model: int, rows: list[dict[str, Any]], labelled: list[int],
                   av_texts: list[str], target: torch.Tensor, mean: torch.Tensor, cfg: EvalConfig) -> dict[str, Any]:
    """The text-only ridge baseline, fit on ``ar_sft`` teacher labels."""
    train = ds.table(["doc_id", "explanation", VECTOR_COLUMN], split="ar_sft")
    expl = train.column("explanation").to_pylist()
    keep = [i for i, e in enumerate(expl) if e]
    if len(keep) < 2:
        return {"available": False, "note": "no teacher labels on the ar_sft split: bag-of-words ridge baseline skipped"}
    vecs = torch.from_numpy(arrow_to_vectors(train.column(VECTOR_COLUMN), d_model).copy())[keep]
    docs = train.column("doc_id").to_pylist()
    model = baselines.BowRidge.fit([expl[i] for i in keep], vecs, [str(docs[i]) for i in keep])
    out: dict[str, Any] = {"available": True, "note": None, "lambda": model.lam, "vocab_size": len(model.vocab),
                           "train_rows": model.train_rows}
    out["on_av"] = metric_block(model.predict(av_texts), target, mean, cfg)
    if labelled:
        ix = torch.tensor(labelled)
        out["on_teacher"] = metric_block(model.predict([rows[i]["explanation"] for i in labelled]), target[ix], mean, cfg)
    else:
        out["on_teacher"] = None
    return out


def run_probes(nla: Any, texts: list[str], target: torch.Tensor, mean: torch.Tensor, base_fve: torch.Tensor,
               b_all: torch.Tensor, cfg: EvalConfig, teacher: Any) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Rewrite the AV's explanations and measure the FVE change of each rewrite."""
    n = len(texts)
    base = float(base_fve.mean())  # = the round trip's fve_nrm: per-row FVEs share B
    para = [probes.paraphrase(t) for t in texts]
    shuf = [probes.shuffle_words(t, cfg.seed * 7919 + i) for i, t in enumerate(texts)]
    drops: list[tuple[int, int, str]] = []
    n_claims = []
    for i, t in enumerate(texts):
        claims, _ = probes.split_claims(t)
        n_claims.append(len(claims))
        for j in range(min(len(claims), MAX_CLAIMS)):
            dropped = probes.drop_claim(t, j)
            if dropped is not None:
                drops.append((i, j, dropped))
    pred = reconstruct(nla, para + shuf + [d[2] for d in drops], cfg, "ar-probes")
    pred_para, pred_shuf, pred_drop = pred[:n], pred[n : 2 * n], pred[2 * n :]
    fve_para = metrics.per_row_fve(pred_para, target, mean, b_all)
    fve_shuf = metrics.per_row_fve(pred_shuf, target, mean, b_all)

    def probe_summary(per: torch.Tensor) -> dict[str, Any]:
        delta = per - base_fve
        return {"fve_nrm": float(per.mean()), "delta_fve_nrm": float(per.mean()) - base,
                "ci95_delta": bootstrap_ci(lambda i: float(delta[i].mean()), n, cfg.bootstrap, cfg.seed + 29), "n": n}

    out: dict[str, Any] = {
        "enabled": True,
        "base_fve_nrm": base,
        "paraphrase": {"paraphraser": probes.PARAPHRASER_VERSION, **probe_summary(fve_para)},
        "word_shuffle": probe_summary(fve_shuf),
    }
    per_rows: dict[str, list[Any]] = {
        "paraphrase_text": para,
        "paraphrase_delta_fve_nrm": (fve_para - base_fve).tolist(),
        "word_shuffle_delta_fve_nrm": (fve_shuf - base_fve).tolist(),
    }
    ablation_rows: list[list[float | None]] = [[None] * min(c, MAX_CLAIMS) if c > 1 else [] for c in n_claims]
    by_index: dict[int, list[float]] = defaultdict(list)
    if drops:
        tgt = target[torch.tensor([d[0] for d in drops])]
        fve_drop = metrics.per_row_fve(pred_drop, tgt, mean, b_all)
        for (i, j, _), f in zip(drops, fve_drop.tolist()):
            delta = f - float(base_fve[i])
            ablation_rows[i][j] = delta
            by_index[j].append(delta)
    all_deltas = [d for ds_ in by_index.values() for d in ds_]
    out["claim_ablation"] = {
        "rows_with_claims": sum(1 for c in n_claims if c > 1),
        "claims_per_explanation": _stats([float(c) for c in n_claims]),
        "delta_fve_nrm": sum(all_deltas) / len(all_deltas) if all_deltas else None,
        "per_claim_index": [{"index": j, "n": len(v), "delta_fve_nrm": sum(v) / len(v)} for j, v in sorted(by_index.items())],
        # Per row, the claim whose removal costs the most: does any single claim carry the vector?
        "most_informative_delta_fve_nrm": _mean([min(d for d in r if d is not None) for r in ablation_rows
                                                 if any(d is not None for d in r)]),
        "note": None if all_deltas else "no explanation has two or more claims; nothing to ablate",
    }
    per_rows["claim_ablation_delta_fve_nrm"] = ablation_rows

    if teacher is None:
        out["paraphrase_teacher"] = {"available": False, "note": None}
    elif not probes.teacher_can_complete(teacher):
        out["paraphrase_teacher"] = {"available": False, "note": f"teacher {getattr(teacher, 'spec', teacher)} cannot answer "
                                     "free-form prompts; paraphrase-by-teacher skipped"}
    else:
        rewritten = probes.teacher_paraphrases(teacher, texts)
        ok = [i for i, r in enumerate(rewritten) if r]
        entry: dict[str, Any] = {"available": True, "note": None, "answered": len(ok), "n": n}
        if ok:
            ix = torch.tensor(ok)
            pred_t = reconstruct(nla, [rewritten[i] or "" for i in ok], cfg, "ar-teacher-paraphrase")
            per = metrics.per_row_fve(pred_t, target[ix], mean, b_all)
            entry["fve_nrm"] = float(per.mean())
            entry["delta_fve_nrm"] = float((per - base_fve[ix]).mean())
        out["paraphrase_teacher"] = entry
        per_rows["teacher_paraphrase_text"] = rewritten
    return out, per_rows


def run_judge(teacher: Any, rows: list[dict[str, Any]], texts: list[str], cfg: EvalConfig) -> dict[str, Any]:
    """The optional LLM judge of specificity (1–5) on the first ``judge_rows`` rows."""
    if teacher is None:
        return {"available": False, "note": "no --teacher configured"}
    if not probes.teacher_can_complete(teacher):
        return {"available": False, "note": f"teacher {getattr(teacher, 'spec', teacher)} cannot answer free-form prompts"}
    m = min(cfg.judge_rows, len(rows))
    scores = probes.judge_scores(teacher, [r.get("context") or "" for r in rows[:m]], texts[:m])
    got = [s for s in scores if s is not None]
    return {"available": True, "note": None, "n": m, "answered": len(got),
            "mean_score": sum(got) / len(got) if got else None,
            "histogram": {str(k): got.count(k) for k in range(1, 6)}}


# --------------------------------------------------------------------------- top level
def make_eval_teacher(cfg: EvalConfig, base_model: str) -> Any:
    if not cfg.teacher:
        return None
    from nla.label.teachers import TeacherSettings, make_teacher

    settings = TeacherSettings(base_url=cfg.base_url, api_key_env=cfg.api_key_env, device=cfg.device,
                               dtype=cfg.dtype, base_model=base_model, temperature=0.0)
    return make_teacher(cfg.teacher, settings)


def run_eval(cfg: EvalConfig) -> EvalResult:
    """Load the bundle and dataset, evaluate, write the report folder."""
    from nla.bundle import NLA
    from nla.config import save_config
    from nla.eval.report import write_report

    validate(cfg, "eval")  # the Python API gets the checks of flags and YAML (required, ranges)
    if cfg.split not in SPLITS:
        raise NLAError(f"--split {cfg.split!r}: unknown split (splits: {', '.join(SPLITS)})")
    from nla.train.loop import check_logging_backends

    check_logging_backends(cfg.tensorboard, cfg.wandb)  # a missing package fails before the work
    if cfg.load_in_4bit:
        check_4bit_available(cfg.device)  # one line before the report folder is made
    from nla.train.generation import check_backend, inference_backend

    check_backend(cfg.generation_backend)  # vLLM missing or no GPU: one line, no report folder
    ds = ActivationDataset.open(cfg.data)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "eval_config.yaml")
    with load_in_4bit(cfg.load_in_4bit, cfg.device):
        nla = NLA.from_pretrained(cfg.nla, dtype=cfg.dtype, device=cfg.device)
    if not cfg.load_in_4bit:
        # Eval never trains: merged LoRA generates faster. Not on 4-bit weights, where merging
        # would dequantise the base (and round the adapters into NF4).
        nla.merge_adapters()
    teacher = make_eval_teacher(cfg, nla.meta.base_model)
    fingerprint = bundle_fingerprint(cfg.nla) if Path(cfg.nla).is_dir() else str(cfg.nla)
    backend = inference_backend(cfg.generation_backend, nla, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    result = evaluate(nla, ds, cfg, cache_dir=out / "cache", fingerprint=fingerprint, teacher=teacher,
                      backend=backend)
    result.metrics["bundle"]["path"] = str(cfg.nla)
    write_report(result, out, html_samples=cfg.html_samples)
    if cfg.tensorboard or cfg.wandb:
        # The same sinks and flags as training; metrics.json stays the record (no JSONL here).
        from nla.train.loop import MetricsLogger, flatten_numbers

        mirror = MetricsLogger(out, tensorboard=cfg.tensorboard, wandb=cfg.wandb, wandb_project=cfg.wandb_project,
                               jsonl=False)
        mirror.log(0, flatten_numbers(result.metrics), phase="eval")
        mirror.close()
    return result
