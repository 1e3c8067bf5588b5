"""`nla label`: write one teacher's labels for an activation dataset as a labels table.

Labels are their own output (docs/design.md §3, "Labels"): a table of ``(doc_id, position,
explanation)`` per dataset shard, by default ``DATA/labels/<teacher>/``, with a sidecar naming
the teacher, its model and the prompt version. The dataset itself is never rewritten, so a
second teacher writes a second table instead of filling the first one's gaps, and a table made
by one teacher refuses another's labels (one-line error naming both) unless ``--force``.

The run is built so that no answer is paid for twice:

* every answer is committed to the SQLite cache (:mod:`nla.label.cache`) the moment it
  arrives, before the row is counted — a ``kill -9`` loses only requests still in flight;
* rows the table already holds are skipped, and rows whose context is in the cache are filled
  from it without a request; identical contexts share one request;
* a shard's part of the table is written atomically as soon as all its rows are settled, and
  on a fatal error every finished row is written before the one-line error.

Concurrency is a fixed pool of asyncio workers (``--concurrency`` for API teachers, one for
local ones, which batch instead). Transient failures (429, 5xx, timeouts, dropped connections)
back off exponentially with jitter, honouring ``Retry-After``; a malformed answer is asked
again up to ``--max-retries`` times, then the row is left empty and counted as failed.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from nla.config import opt, save_config, validate
from nla.config_fields import ModelFields, ProgressFields
from nla.data.store import (
    LABELS_KIND,
    LABELS_META,
    LABELS_SCHEMA_VERSION,
    SPLITS,
    ActivationDataset,
    LabelTable,
    dataset_key,
    labels_root,
    table_name,
)
from nla.errors import NLAError
from nla.label.cache import MALFORMED, OK, LabelCache, cache_key
from nla.label.prompt import PROMPT_VERSION, normalize_answer
from nla.label.providers import (
    FatalError,
    LabelRequest,
    RejectedError,
    Teacher,
    TransientError,
    UnreachableError,
)
from nla.label.teachers import TeacherSettings, make_teacher
from nla.models.readout import NEXT_TOKEN_IDS, NEXT_TOKEN_PROBS


@dataclass
class LabelConfig(ModelFields, ProgressFields):
    """(``device`` and ``dtype`` are those of local teachers: hf, lens.)"""

    data: str = opt("", help="activation dataset folder or single .parquet file (or a labels table folder, to resume it)",
                    required=True)
    out: str | None = opt(None, help="labels table folder to write (default: DATA/labels/<teacher>, one table per teacher)")
    force: bool = opt(False, help="replace a labels table made by another teacher, prompt version or extraction "
                                  "(default: refuse, never mix two teachers' labels)")
    teacher: str = opt("lens", help="lens[:MODEL] (offline, default) | openai:MODEL | anthropic:MODEL | hf:MODEL (hub id, path, 'default', tiny:ARCH)")
    base_url: str | None = opt(None, help="API endpoint; openai default https://api.openai.com/v1, anthropic default https://api.anthropic.com")
    api_key_env: str | None = opt(None, help="environment variable holding the API key (default OPENAI_API_KEY / ANTHROPIC_API_KEY); the key itself is never a setting")
    splits: list[str] = opt([], help="splits to label (default: all)")
    limit: int | None = opt(None, help="label at most N more rows in this run")
    concurrency: int = opt(32, help="API requests in flight at once")
    max_retries: int = opt(5, help="retries per row, for transient errors and for malformed answers alike")
    timeout: float = opt(60.0, help="seconds before a request counts as timed out (and is retried)")
    backoff: float = opt(1.0, help="first retry delay in seconds; doubles per retry, with jitter, capped at 60 s")
    max_tokens: int = opt(400, help="most tokens a teacher may write per answer")
    temperature: float = opt(0.7, help="teacher sampling temperature (0 = greedy)")
    batch_size: int = opt(16, help="rows per forward pass for local teachers (hf, lens)")
    torch_threads: int | None = opt(None, help="CPU threads for local teachers (default: torch's choice; 1 is often fastest on a busy machine)")
    cache: str | None = opt(None, help="SQLite answer cache (default: DATA/label_cache.sqlite)")
    retry_failed: bool = opt(False, help="ask again for contexts whose cached answer was malformed")
    price_in: float | None = opt(None, help="USD per million input tokens, for the cost estimate (known models have a default)")
    price_out: float | None = opt(None, help="USD per million output tokens, for the cost estimate")
    allow_partial: bool = opt(False, help="exit 0 even when some rows could not be labelled (they stay empty; "
                                          "a re-run retries them)")


# USD per million (input, output) tokens; an estimate only, prices change.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "claude-3-5-haiku": (0.80, 4.00),
    "claude-haiku-4-5": (1.00, 5.00),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-opus-4": (15.00, 75.00),
}
MAX_BACKOFF = 60.0
MAX_RETRY_AFTER = 300.0


def price_for(model: str, price_in: float | None, price_out: float | None) -> tuple[float, float] | None:
    if price_in is not None or price_out is not None:
        return (price_in or 0.0, price_out or 0.0)
    name = model.split("/")[-1]
    for prefix in sorted(PRICES, key=len, reverse=True):
        if name.startswith(prefix):
            return PRICES[prefix]
    return None


@dataclass
class LabelSummary:
    """What one run did (also recorded in the sidecar under ``extra.labeling``)."""

    todo: int = 0
    labelled: int = 0
    cached: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    first_error: str | None = None


@dataclass
class _Shard:
    path: Path
    rows: list[int]  # row indices to label in this run
    keys: list[tuple[str, int]]  # (doc_id, position) of every row of the shard
    have: dict[tuple[str, int], str]  # what the table already holds for this shard
    results: dict[int, str] = field(default_factory=dict)
    pending: int = 0
    queued_all: bool = False
    dirty: bool = False


@dataclass
class _Item:
    key: str
    context: str
    next_tokens: tuple[tuple[int, float], ...] | None = None  # from `nla extract --next-tokens`


@dataclass
class _Outcome:
    status: str  # OK, MALFORMED or "error"
    explanation: str | None = None
    error: str | None = None


def side_path(ds: ActivationDataset, name: str) -> Path:
    """``DATA/<name>`` for a folder, ``<file>.<name>`` next to a single Parquet file."""
    return ds.path / name if not ds.is_single_file else ds.path.with_name(f"{ds.path.name}.{name}")


def identity(teacher: Teacher) -> dict[str, Any]:
    """What must match for a labels table to take more rows: one teacher, one model (with its
    version, for lens), one prompt. Anything else would be a mix."""
    return {"teacher": teacher.spec, "provider": teacher.provider, "cache_model": teacher.cache_model,
            "prompt_version": PROMPT_VERSION}


def _who(meta: dict[str, Any], other: dict[str, Any]) -> str:
    """A teacher as one short phrase; the prompt version only when it is what differs."""
    text = f"{meta.get('provider', '?')}:{meta.get('cache_model', meta.get('model', '?'))}"
    if meta.get("prompt_version") != other.get("prompt_version"):
        text += f" (prompt {meta.get('prompt_version')})"
    return text


def check_rows(ds: ActivationDataset) -> None:
    """Refuse a dataset that cannot be labelled before anything is written: every row needs its
    text, and its own (doc_id, position) key, since the table is joined on it."""
    for shard in ds.shards:
        names = pq.read_schema(shard).names  # a damaged shard fails here too
        if "context" not in names:
            raise NLAError(
                f"{shard}: no 'context' column (columns: {', '.join(names)}); labeling needs the "
                "text of each position — re-extract with `nla extract`"
            )
        table = ds.read_shard(shard, ["doc_id", "position"])
        seen: set[tuple[str, int]] = set()
        for key in zip(table.column("doc_id").to_pylist(), table.column("position").to_pylist()):
            if key in seen:
                raise NLAError(f"{shard}: several rows have doc_id {key[0]!r} at position {key[1]}; labels are "
                               "keyed by (doc_id, position), so each row needs its own")
            seen.add(key)


def claim_table(out: Path, ds: ActivationDataset, teacher: Teacher, force: bool) -> LabelTable:
    """The labels table at ``out``, made (or resumed) for this teacher and dataset.

    A table of another teacher, prompt or extraction is refused with a line naming both
    teachers; with ``force`` its parts are deleted first, so the result is one teacher's only.
    """
    mine = {"kind": LABELS_KIND, "schema_version": LABELS_SCHEMA_VERSION,
            "dataset": os.path.relpath(ds.path.resolve(), out.resolve()),
            "dataset_key": dataset_key(ds.meta), **teacher.describe(), **identity(teacher)}
    if (out / LABELS_META).exists():
        old = LabelTable.open(out)
        same_teacher = all(old.meta.get(k) == v for k, v in identity(teacher).items())
        same_data = old.meta.get("dataset_key") == mine["dataset_key"]
        if same_teacher and same_data:
            old.meta.update(mine)  # refresh what may legitimately change (dataset path, base URL)
            old.save_meta()
            return old
        if not force:
            what = (f"labels by {_who(old.meta, mine)}, not {_who(mine, old.meta)}" if not same_teacher
                    else f"labels made for another extraction of {ds.path}")
            raise NLAError(f"{out}: holds {what}; refusing to mix them in one table: pass --out for a "
                           "separate table, or --force to replace these labels")
        for part in out.glob("*.parquet"):
            part.unlink()
    elif out.exists() and any(out.glob("*.parquet")):
        raise NLAError(f"{out}: holds Parquet files but no {LABELS_META}; not a labels table, refusing to write into it")
    table = LabelTable(out, mine)
    table.save_meta()  # before any part: a part on disk always has its teacher recorded
    return table


class LabelRunner:
    def __init__(self, cfg: LabelConfig, ds: ActivationDataset, teacher: Teacher, cache: LabelCache,
                 table: LabelTable):
        self.cfg = cfg
        self.ds = ds
        self.teacher = teacher
        self.cache = cache
        self.table = table
        self.summary = LabelSummary()
        self.shards: list[_Shard] = []
        self.waiting: dict[str, list[tuple[_Shard, int]]] = {}
        self.queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self.bar: Any = None
        self.started = time.perf_counter()
        self._last_postfix = 0.0
        self.price = price_for(teacher.model, cfg.price_in, cfg.price_out) if teacher.remote else None

    # ------------------------------------------------------------------ planning
    def plan(self) -> None:
        wanted = set(self.cfg.splits) if self.cfg.splits else None
        budget = self.cfg.limit
        for shard in self.ds.shards:
            table = self.ds.read_shard(shard, ["doc_id", "position", "split"])
            splits = table.column("split").to_pylist()
            keys = list(zip(table.column("doc_id").to_pylist(), table.column("position").to_pylist()))
            have = self.table.read(shard)
            rows = [i for i, (k, s) in enumerate(zip(keys, splits))
                    if k not in have and (wanted is None or s in wanted)]
            if budget is not None:
                rows = rows[:max(0, budget)]
                budget -= len(rows)
            self.shards.append(_Shard(shard, rows, keys, have, pending=len(rows)))
        self.summary.todo = sum(len(s.rows) for s in self.shards)

    def corpus(self) -> dict[str, str]:
        """The longest context of every document: the documents as far as the dataset saw them."""
        docs: dict[str, str] = {}
        for _, table in self.ds.iter_shards(["doc_id", "context"]):
            for doc, ctx in zip(table.column("doc_id").to_pylist(), table.column("context").to_pylist()):
                if ctx is not None and len(ctx) > len(docs.get(doc, "")):
                    docs[doc] = ctx
        return docs

    # ------------------------------------------------------------------ the run
    async def run(self) -> None:
        remote = self.teacher.remote
        n_workers = max(1, self.cfg.concurrency) if remote else 1
        self.queue = asyncio.Queue(maxsize=max(2 * n_workers, 2 * self.teacher.batch_size))
        async with self.teacher:
            tasks = [asyncio.create_task(self._produce())]
            tasks += [asyncio.create_task(self._work()) for _ in range(n_workers)]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    exc = t.exception()
                    if exc is not None:
                        raise exc
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.flush()

    def _next_tokens(self, shard: Path) -> list[tuple[tuple[int, float], ...]] | None:
        """The base model's stored next-token guesses per row, or None when the dataset has none.

        Token ids are the dataset model's: a teacher reading another model (``lens:OTHER``) gets none.
        """
        if getattr(self.teacher, "model", None) != self.ds.meta.base_model:
            return None
        if NEXT_TOKEN_IDS not in pq.read_schema(shard).names:
            return None
        table = pq.read_table(shard, columns=[NEXT_TOKEN_IDS, NEXT_TOKEN_PROBS])
        ids, probs = table.column(NEXT_TOKEN_IDS).to_pylist(), table.column(NEXT_TOKEN_PROBS).to_pylist()
        return [tuple(zip(i or [], p or [], strict=True)) for i, p in zip(ids, probs, strict=True)]

    async def _produce(self) -> None:
        for state in self.shards:
            if state.rows:
                contexts = self.ds.read_shard(state.path, ["context"]).column("context").to_pylist()
                guesses = self._next_tokens(state.path)
                keys = {}
                for i in state.rows:
                    if contexts[i] is not None:
                        keys[i] = cache_key(self.teacher.provider, self.teacher.cache_model, PROMPT_VERSION, contexts[i])
                hits = self.cache.get_many(sorted(set(keys.values())))
                for i in state.rows:
                    key = keys.get(i)
                    if key is None:
                        self._settle(state, i, None, cached=False)
                        continue
                    hit = hits.get(key)
                    if hit is not None and (hit.status == OK or not self.cfg.retry_failed):
                        self._settle(state, i, hit.explanation if hit.status == OK else None, cached=True)
                        continue
                    if key in self.waiting:
                        self.waiting[key].append((state, i))  # same context already asked
                        continue
                    self.waiting[key] = [(state, i)]
                    await self.queue.put(_Item(key, contexts[i], guesses[i] if guesses else None))
            state.queued_all = True
            self._maybe_write(state)
        for _ in range(max(1, self.cfg.concurrency) if self.teacher.remote else 1):
            await self.queue.put(None)

    async def _work(self) -> None:
        size = 1 if self.teacher.remote else self.teacher.batch_size
        while True:
            first = await self.queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < size:
                try:
                    nxt = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    await self.queue.put(None)  # not ours to consume: another worker's stop
                    break
                batch.append(nxt)
            outcomes = await self._ask(batch)
            for item in batch:
                out = outcomes[item.key]
                if out.error and self.summary.first_error is None:
                    self.summary.first_error = out.error
                for state, i in self.waiting.pop(item.key, []):
                    self._settle(state, i, out.explanation, cached=False)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        base = self.cfg.backoff * 2 ** (attempt - 1)
        if retry_after is not None:
            # The server said when; a little jitter keeps many workers from returning at once.
            return min(retry_after, MAX_RETRY_AFTER) + random.uniform(0, 0.25 * self.cfg.backoff)
        return min(base, MAX_BACKOFF) * random.uniform(0.5, 1.5)

    async def _ask(self, items: list[_Item]) -> dict[str, _Outcome]:
        out: dict[str, _Outcome] = {}
        pending = items
        transient = malformed = 0
        teacher = self.teacher
        while pending:
            requests = [LabelRequest(it.context, it.key, it.next_tokens) for it in pending]
            try:
                if teacher.remote:
                    answers = await asyncio.wait_for(teacher.explain(requests), self.cfg.timeout)
                else:
                    answers = await teacher.explain(requests)
            except (TransientError, asyncio.TimeoutError, TimeoutError) as exc:
                err = exc if isinstance(exc, TransientError) else TransientError(
                    f"no answer within {self.cfg.timeout:g} s")
                transient += 1
                if transient > self.cfg.max_retries:
                    if isinstance(err, UnreachableError):
                        raise FatalError(f"{err}; giving up after {self.cfg.max_retries} retries") from None
                    for it in pending:
                        out[it.key] = _Outcome("error", error=str(err))
                    break
                self.summary.retries += 1
                await asyncio.sleep(self._delay(transient, err.retry_after))
                continue
            except RejectedError as exc:
                for it in pending:
                    out[it.key] = _Outcome("error", error=str(exc))
                break
            again = []
            for it, answer in zip(pending, answers):
                explanation = normalize_answer(answer)
                if explanation is not None:
                    # Committed before anything else: this answer is never paid for again.
                    self.cache.put(it.key, provider=teacher.provider, model=teacher.model,
                                   prompt_version=PROMPT_VERSION, status=OK,
                                   explanation=explanation, raw=answer)
                    out[it.key] = _Outcome(OK, explanation)
                elif malformed < self.cfg.max_retries:
                    again.append(it)
                else:
                    self.cache.put(it.key, provider=teacher.provider, model=teacher.model,
                                   prompt_version=PROMPT_VERSION, status=MALFORMED,
                                   explanation=None, raw=answer)
                    out[it.key] = _Outcome(MALFORMED)
            if again:
                malformed += 1
                self.summary.retries += len(again)
            pending = again
        return out

    # ------------------------------------------------------------------ bookkeeping
    def _settle(self, state: _Shard, row: int, explanation: str | None, *, cached: bool) -> None:
        if explanation is not None:
            state.results[row] = explanation
            state.dirty = True
            self.summary.labelled += 1
            self.summary.cached += cached
        else:
            self.summary.failed += 1
        state.pending -= 1
        self._progress()
        self._maybe_write(state)

    def _maybe_write(self, state: _Shard) -> None:
        if state.queued_all and state.pending == 0 and state.dirty:
            self._write(state)

    def _write(self, state: _Shard) -> None:
        # The shard's whole part, old labels and new, in row order: one atomic replace.
        for row, text in state.results.items():
            state.have[state.keys[row]] = text
        labels = [(doc, pos, state.have[(doc, pos)]) for doc, pos in state.keys if (doc, pos) in state.have]
        self.table.write(state.path, labels)
        state.dirty = False

    def flush(self) -> None:
        """Write every shard with finished rows not yet on disk (also after a fatal error)."""
        for state in self.shards:
            if state.dirty:
                self._write(state)

    def _progress(self, force: bool = False) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.perf_counter()
        if not force and now - self._last_postfix < 0.5:
            return
        self._last_postfix = now
        self.bar.set_postfix_str(self.status_line(), refresh=False)

    def usage(self) -> None:
        u = self.teacher.usage
        s = self.summary
        s.requests, s.input_tokens, s.output_tokens = u.requests, u.input_tokens, u.output_tokens
        if self.price is not None and u.reported:
            s.cost_usd = (u.input_tokens * self.price[0] + u.output_tokens * self.price[1]) / 1e6

    def status_line(self) -> str:
        self.usage()
        s = self.summary
        rate = s.requests / max(time.perf_counter() - self.started, 1e-9)
        parts = [f"ok={s.labelled}", f"failed={s.failed}", f"cached={s.cached}", f"req/s={rate:.1f}"]
        if self.teacher.usage.reported:
            parts.append(f"tok={s.input_tokens + s.output_tokens:,}")
        if s.cost_usd is not None:
            parts.append(f"${s.cost_usd:.4f}")
        return " ".join(parts)


def label(cfg: LabelConfig) -> LabelSummary:
    """Write (or resume) a labels table for a dataset; see the module docstring."""
    validate(cfg, "label")  # the Python API gets the checks of flags and YAML (required --data, ranges)
    unknown = [s for s in cfg.splits if s not in SPLITS]
    if unknown:
        raise NLAError(f"label: unknown split {unknown[0]!r} (splits: {', '.join(SPLITS)})")
    ds = ActivationDataset.open(cfg.data)
    settings = TeacherSettings(
        base_url=cfg.base_url, api_key_env=cfg.api_key_env, timeout=cfg.timeout,
        max_tokens=cfg.max_tokens, temperature=cfg.temperature, concurrency=cfg.concurrency,
        batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, base_model=ds.meta.base_model,
    )
    teacher = make_teacher(cfg.teacher, settings)
    check_rows(ds)  # before the cache file or the table is created
    if cfg.out:
        out = Path(cfg.out)
    elif ds.labels is not None and (Path(cfg.data) / LABELS_META).exists():
        out = ds.labels.path  # --data named a table: resume that one
    else:
        out = labels_root(ds.path) / table_name(cfg.teacher)
    table = claim_table(out, ds, teacher, cfg.force)
    if table.count() == 0 and ds.meta.extra.get("labeling"):
        old = ds.meta.extra["labeling"]
        print(f"note: {ds.path} also holds an explanation column inside its shards (by {old.get('teacher', '?')}, "
              "the layout before labels tables); readers use the table instead", file=sys.stderr)
    cache = LabelCache(cfg.cache or side_path(ds, "label_cache.sqlite"))
    runner = LabelRunner(cfg, ds, teacher, cache, table)
    runner.plan()
    save_config(cfg, out / "label_config.yaml")
    summary = runner.summary
    failure: str | None = None
    threads: int | None = None
    try:
        if summary.todo:
            if cfg.torch_threads and not teacher.remote:
                import torch

                threads = torch.get_num_threads()
                torch.set_num_threads(cfg.torch_threads)
            teacher.prepare(runner.corpus() if teacher.provider.startswith("lens") else {})
            if cfg.progress:
                runner.bar = tqdm(total=summary.todo, unit="row", desc=f"label {teacher.spec}",
                                  dynamic_ncols=True, file=sys.stderr)
            try:
                asyncio.run(runner.run())
            except FatalError as exc:
                failure = str(exc)
            finally:
                if runner.bar is not None:
                    runner.bar.set_postfix_str(runner.status_line(), refresh=True)
                    runner.bar.close()
        runner.usage()
        _record(ds, table, cfg, summary)
    finally:
        cache.close()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)  # a library call must not leave the process changed
    if failure:
        saved = f" ({summary.labelled} rows labelled before it are saved; re-run to resume)" if summary.labelled else ""
        raise NLAError(failure + saved)
    total, done = len(ds), table.count()
    print(f"{table.path}: {summary.labelled} rows labelled ({summary.cached} from cache), "
          f"{summary.failed} failed; {done}/{total} rows of {ds.path} have an explanation by {teacher.spec}")
    if summary.failed and not cfg.allow_partial:
        # Failure is visible: rows that could not be labelled fail the command (docs/guarantees.md).
        first = f"; first error: {summary.first_error}" if summary.first_error else ""
        raise NLAError(
            f"{summary.failed} of {summary.todo} rows could not be labelled ({summary.labelled} labelled, "
            f"{summary.cached} of them from cache){first}; re-run to retry them "
            "(--retry-failed also re-asks malformed answers), or pass --allow-partial"
        )
    if summary.failed:
        if summary.first_error:
            print(f"first error: {summary.first_error}", file=sys.stderr)
        print("failed rows stay empty; a re-run retries errors, --retry-failed also re-asks "
              "contexts whose answers were malformed", file=sys.stderr)
    return summary


def _record(ds: ActivationDataset, table: LabelTable, cfg: LabelConfig, s: LabelSummary) -> None:
    """The table's sidecar: who labelled with what (set by ``claim_table``), and how it went (no keys)."""
    table.meta.update({
        "splits": list(cfg.splits) or "all",
        "rows": len(ds),
        "rows_labelled": table.count(),
        "last_run": {
            "labelled": s.labelled, "from_cache": s.cached, "failed": s.failed,
            "requests": s.requests, "retries": s.retries, "input_tokens": s.input_tokens,
            "output_tokens": s.output_tokens,
            "cost_usd_estimate": round(s.cost_usd, 6) if s.cost_usd is not None else None,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    })
    table.save_meta()


def register(sub: Any) -> None:
    from nla.config import add_config_args, resolve_config

    p = sub.add_parser("label", help="write a teacher's labels for a dataset (a labels table)",
                       description="Label each sampled position of an activation dataset with a "
                       "teacher's explanation (2-3 features in <analysis> tags), written as a labels table "
                       "(DATA/labels/<teacher>/) that readers join as the explanation column. Resumable: "
                       "answers are cached in SQLite as they arrive, labelled rows are skipped. Another "
                       "teacher writes another table; a table never takes a second teacher's labels.")
    add_config_args(p, LabelConfig)
    p.set_defaults(func=lambda args: label(resolve_config(LabelConfig, args, section="label")))
