"""The HTTP API and web explorer for one NLA bundle (`nla serve`).

Endpoints (documented by the OpenAPI schema at ``/openapi.json``, browsable at ``/docs``):

* ``POST /v1/explain``     text → tokens; for chosen (or all) positions the explanation of the
                            block-K state there and its round-trip metrics
* ``POST /v1/verbalize``   vectors → explanations (``n`` samples each)
* ``POST /v1/reconstruct`` explanation texts → vectors
* ``POST /v1/search``      text → the dataset positions nearest to AR(text) (needs ``--data``)
* ``POST /v1/vectors/parse`` ``.npy`` / ``.safetensors`` bytes → vectors (for the web page)
* ``GET  /v1/info``        bundle metadata, limits, batching counters
* ``GET  /healthz``        liveness (never needs the API key)
* ``GET  /``               the web explorer (static files shipped in the package)

Every failure a caller can fix is a 4xx JSON body ``{"error": kind, "detail": message}`` whose
message names the field and the limit; the server keeps serving after any of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nla import metrics
from nla.config import opt
from nla.config_fields import BackendFields, ModelFields
from nla.errors import NLAError
from nla.serve.batching import MicroBatcher, ModelThread
from nla.train.generation import (
    VLLM_MAX_TEMPERATURE,
    RolloutBackend,
    inference_backend,
)

log = logging.getLogger("nla.serve")
STATIC_DIR = Path(__file__).parent / "static"
T = TypeVar("T")


@dataclass
class ServeConfig(ModelFields, BackendFields):
    """Settings of `nla serve` (each field is a command-line flag)."""

    nla: str = opt("", help="bundle folder to serve (RUN/ with nla_meta.yaml)", required=True)
    host: str = opt("127.0.0.1", help="interface to bind; anything but loopback exposes the model to the network")
    port: int = opt(8000, help="TCP port (0: any free port)")
    api_key_env: str = opt("", help="name of an environment variable holding a bearer token that /v1/* requires "
                                    "(the token itself is never a flag, never logged)")
    batching: bool = opt(True, help="group concurrent requests into shared model calls (--no-batching: one call "
                                    "per request, the baseline)")
    max_wait_ms: float = opt(5.0, help="how long the batcher waits for more requests after the first one")
    max_batch_rows: int = opt(64, help="most sequences (vectors × samples, or texts) in one model call")
    max_body_bytes: int = opt(8 * 1024 * 1024, help="largest request body in bytes (413 above)")
    max_text_chars: int = opt(8000, help="longest text for /v1/explain and each text for /v1/reconstruct")
    max_tokens: int = opt(1024, help="most tokens in an /v1/explain text")
    max_positions: int = opt(64, help="most positions explained in one request")
    max_vectors: int = opt(64, help="most vectors in one /v1/verbalize request")
    max_texts: int = opt(64, help="most texts in one /v1/reconstruct request")
    max_n: int = opt(8, help="most samples per vector")
    max_new_tokens: int = opt(128, help="largest max_new_tokens a request may ask for")
    default_new_tokens: int = opt(48, help="max_new_tokens when a request does not say")
    timeout_s: float = opt(120.0, help="seconds a request may take before a 504")
    torch_threads: int = opt(0, help="torch intra-op threads for the model (0: torch's default, one per core; "
                                     "1 is often faster on a CPU shared with other work)")
    allowed_hosts: list[str] = opt([], help="Host header names the server answers besides the loopback names and "
                                           "--host ('*': any); others get a 400, which stops DNS-rebinding pages")

    def check(self) -> None:
        """Cross-field rules (nla.config.validate calls this after the per-field checks)."""
        for host in self.allowed_hosts:
            if "*" in host and host != "*" and not (host.startswith("*.") and "*" not in host[2:]):
                raise NLAError(f"--allowed-hosts: {host!r}: a wildcard is '*' (any) or '*.DOMAIN'")
        if self.default_new_tokens > self.max_new_tokens:
            raise NLAError(f"--default-new-tokens {self.default_new_tokens} is above --max-new-tokens "
                           f"{self.max_new_tokens}")
    data: str = opt("", help="activation dataset for /v1/search and the explorer's search panel (default: none)")


# ---------------------------------------------------------------- request / response models
class ErrorResponse(BaseModel):
    error: str = Field(description="kind of failure: bad_request, unauthorized, too_large, invalid, timeout, …")
    detail: str = Field(description="what was wrong, naming the field and the limit")


class GenerationOptions(BaseModel):
    n: int = Field(default=1, description="explanations sampled per vector / position")
    max_new_tokens: int | None = Field(default=None, description="generation budget (default: the server's)")
    sample: bool | None = Field(default=None, description="sample instead of greedy decoding (default: n > 1)")
    temperature: float = Field(default=1.0, description="sampling temperature (with sample)")
    top_p: float = Field(default=1.0, description="nucleus sampling mass (with sample)")


class ChatMessage(BaseModel):
    role: str
    content: str


class ExplainRequest(GenerationOptions):
    text: str | None = Field(default=None, description="text the base model reads; its block-K states are explained")
    messages: list[ChatMessage] | None = Field(
        default=None, description="a chat transcript instead of text: rendered with the model's chat template, "
                                  "each token tagged with its turn's role")
    causal: bool = Field(default=False, description="also patch the first sample's reconstruction (and the mean μ) "
                                                    "back into the base model at layer K and report the next-token KL")
    positions: list[int] | None = Field(
        default=None, description="token positions to explain (negative counts from the end); null: all; []: tokens only"
    )


class Token(BaseModel):
    position: int
    id: int
    text: str
    role: str | None = Field(default=None, description="with messages: the role of the turn the token belongs to")
    part: str | None = Field(default=None, description="with messages: 'content' or 'template' (the template's markup)")


class Sample(BaseModel):
    explanation: str | None = Field(description="the parsed explanation, null if the answer was unparseable")
    raw: str = Field(description="the AV's raw answer")
    truncated: bool = Field(description="hit max_new_tokens before closing the explanation")
    mse_nrm: float | None = Field(default=None, description="normalised MSE of AR(explanation) against the vector (0..4)")
    cosine: float | None = None
    fve_nrm: float | None = Field(default=None, description="1 − mse_nrm / B (needs the bundle's mean vector)")


class PositionResult(BaseModel):
    position: int
    token: str
    context: str = Field(description="decoded text up to and including this token (what the model saw)")
    explanation: str | None = Field(description="first sample's explanation")
    raw: str
    mse_nrm: float | None
    cosine: float | None
    fve_nrm: float | None = None
    samples: list[Sample]
    causal: CausalCheck | None = None


class CausalCheck(BaseModel):
    kl_reconstruction: float | None = Field(description="KL(clean ‖ reconstruction patched at this position), nats")
    kl_mean_ablation: float | None = Field(description="KL(clean ‖ μ patched), nats")
    fraction_recovered: float | None = Field(description="1 − KL(reconstruction)/KL(μ); null when μ changes nothing")


class ExplainResponse(BaseModel):
    tokens: list[Token]
    results: list[PositionResult]
    fve_baseline: float | None = Field(
        default=None, description="B used for fve_nrm: mean (1/d)||v̂ − μ||² over all of this text's positions"
    )


class VerbalizeRequest(GenerationOptions):
    vectors: list[list[float]] | list[float] = Field(description="[n, d] or one [d] vector of the bundle's width")
    round_trip: bool = Field(default=False, description="also reconstruct each explanation and report mse_nrm / cosine")


class VectorResult(BaseModel):
    index: int
    samples: list[Sample]


class VerbalizeResponse(BaseModel):
    results: list[VectorResult]


class ReconstructRequest(BaseModel):
    texts: list[str] = Field(description="explanation texts")


class ReconstructResponse(BaseModel):
    vectors: list[list[float]]
    norms: list[float]


class SearchRequest(BaseModel):
    text: str = Field(description="what to look for, in words; the AR maps it to a vector")
    k: int = Field(default=10, description="how many positions to return (1 to 100)")
    explain: bool = Field(default=False, description="also verbalize each hit with the AV (slower)")


class SearchHit(BaseModel):
    rank: int
    row: int
    doc_id: str | None
    position: int | None
    split: str | None
    context: str | None = Field(description="decoded text up to and including the position")
    teacher_label: str | None
    score: float = Field(description="centred cosine cos(p̂ − μ, v̂ − μ) with the AR's vector (the ranking)")
    cosine: float = Field(description="raw cosine")
    av_explanation: str | None


class SearchResponse(BaseModel):
    dataset: str
    hits: list[SearchHit]


class ParsedVectors(BaseModel):
    format: str
    shape: list[int]
    vectors: list[list[float]]


class Health(BaseModel):
    status: str
    auth_required: bool


# ---------------------------------------------------------------- helpers
class ClientError(HTTPException):
    """A 4xx with a machine-readable kind (the ``error`` field) and a message for people."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(status_code=status, detail=detail)
        self.kind = kind


_KINDS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          413: "too_large", 415: "unsupported_media_type", 422: "invalid", 429: "busy", 503: "unavailable",
          504: "timeout"}


def _error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


def _finite(x: float | torch.Tensor) -> float | None:
    # JSON has no NaN: a metric that is not finite is reported as null, never as invalid JSON.
    return float(x) if math.isfinite(float(x)) else None


def _describe_validation(exc: RequestValidationError) -> tuple[int, str]:
    """A one-line message naming the field, e.g. ``body.vectors.0.3: Input should be a valid number``."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        ctx = errors[0].get("ctx") or {}
        loc: tuple[Any, ...] = tuple(errors[0].get("loc") or ())
        pos = loc[1] if len(loc) > 1 else "?"
        return 400, f"request body is not valid JSON: {ctx.get('error', 'decode error')} at character {pos}"
    parts = []
    for err in errors[:3]:
        where = ".".join(str(x) for x in err.get("loc", ()))
        if err.get("type") == "missing" and where == "body":
            parts.append("request body is missing: send a JSON object with Content-Type: application/json")
            continue
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    if len(errors) > 3:
        parts.append(f"(+{len(errors) - 3} more)")
    return 422, "; ".join(parts) or "invalid request"


class BodySizeLimit:
    """Pure ASGI middleware: a body over ``limit`` bytes gets a 413 before it is buffered whole.

    A declared Content-Length is refused up front; a chunked body is counted as it streams in.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _error(400, "bad_request", "Content-Length is not a number")(scope, receive, send)
                return
            if size > self.limit:
                await _error(413, "too_large", f"request body is {size} bytes; this server accepts at most "
                                               f"{self.limit} (--max-body-bytes)")(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # Raised inside the route's body read: FastAPI re-raises HTTPExceptions as-is.
                    raise ClientError(413, "too_large", f"request body exceeds {self.limit} bytes (--max-body-bytes)")
            return message

        await self.app(scope, counted, send)


@dataclass(frozen=True)
class GenKey:
    """Generation settings: only requests with equal settings can share a ``generate`` call."""

    n: int
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float


class NLAService:
    """The model side: validation against the bundle, batchers, and the three operations."""

    def __init__(self, nla: Any, config: ServeConfig, backend: RolloutBackend | None = None):
        self.nla = nla
        self.config = config
        # The AV's generation (nla.train.generation): transformers is nla.verbalize itself.
        self.generator = backend if backend is not None else inference_backend(
            config.generation_backend, nla, gpu_memory_utilization=config.vllm_gpu_memory_utilization)
        self.d_model = int(nla.meta.d_model)
        self.thread = ModelThread(config.torch_threads)
        self._hooks = [h for model in (nla.av_model, nla.ar) for h in self.thread.watch(model)]
        self.verbalizer: MicroBatcher[tuple[torch.Tensor, GenKey], list[list[Any]]] = MicroBatcher(
            run=self._run_verbalize, thread=self.thread,
            rows=lambda item: len(item[0]) * item[1].n, key=lambda item: item[1],
            max_rows=config.max_batch_rows, max_wait_s=config.max_wait_ms / 1000, enabled=config.batching,
        )
        self.reconstructor: MicroBatcher[list[str], torch.Tensor] = MicroBatcher(
            run=self._run_reconstruct, thread=self.thread, rows=len,
            max_rows=config.max_batch_rows, max_wait_s=config.max_wait_ms / 1000, enabled=config.batching,
        )
        self.search_index: Any = None
        if config.data:
            from nla.search import SearchIndex

            self.search_index = SearchIndex.open(config.data)
            self.search_index.check(nla)

    # ------------------------------------------------------------ model calls (model thread)
    def _run_verbalize(self, items: list[tuple[torch.Tensor, GenKey]]) -> list[list[list[Any]]]:
        key = items[0][1]
        vectors = torch.cat([v for v, _ in items])
        outs = self.generator.verbalize(
            vectors, n=key.n, max_new_tokens=key.max_new_tokens, do_sample=key.do_sample,
            temperature=key.temperature, top_p=key.top_p, batch_size=max(self.config.max_batch_rows, 1),
        )
        split, start = [], 0
        for v, _ in items:
            split.append(outs[start : start + len(v)])
            start += len(v)
        return split

    def _run_reconstruct(self, items: list[list[str]]) -> list[torch.Tensor]:
        texts = [t for item in items for t in item]
        vecs = self.nla.reconstruct(texts, batch_size=max(self.config.max_batch_rows, 1))
        split, start = [], 0
        for item in items:
            split.append(vecs[start : start + len(item)])
            start += len(item)
        return split

    def _tokenize(self, text: str) -> list[int]:
        return list(self.nla.tokenizer.encode(text, add_special_tokens=True))

    def _token_texts(self, ids: list[int]) -> list[str]:
        return [self.nla.tokenizer.decode([i]) for i in ids]

    # ------------------------------------------------------------ validation
    def gen_key(self, req: GenerationOptions) -> GenKey:
        c = self.config
        if not 1 <= req.n <= c.max_n:
            raise ClientError(422, "invalid", f"n={req.n} is out of range: 1 to {c.max_n} samples (--max-n)")
        new = req.max_new_tokens if req.max_new_tokens is not None else c.default_new_tokens
        if not 1 <= new <= c.max_new_tokens:
            raise ClientError(422, "invalid", f"max_new_tokens={new} is out of range: 1 to {c.max_new_tokens} "
                                              "(--max-new-tokens)")
        # vLLM refuses temperatures above 2 (vllm/sampling_params.py); transformers takes up to our 10.
        top = VLLM_MAX_TEMPERATURE if c.generation_backend == "vllm" else 10
        if not (math.isfinite(req.temperature) and 0 < req.temperature <= top):
            raise ClientError(422, "invalid", f"temperature={req.temperature} is out of range (0, {top:g}]")
        if not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
            raise ClientError(422, "invalid", f"top_p={req.top_p} is out of range (0, 1]")
        sample = req.sample if req.sample is not None else req.n > 1
        return GenKey(req.n, new, bool(sample), float(req.temperature), float(req.top_p))

    def check_text(self, text: str, what: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") is valid JSON but not text
            raise ClientError(422, "invalid", f"{what} is not valid Unicode (a lone surrogate at character "
                                              f"{exc.start})") from None
        if not text.strip():
            raise ClientError(422, "invalid", f"{what} is empty")
        if len(text) > self.config.max_text_chars:
            raise ClientError(413, "too_large", f"{what} is {len(text)} characters; the limit is "
                                                f"{self.config.max_text_chars} (--max-text-chars)")

    def vectors_tensor(self, raw: list[list[float]] | list[float]) -> torch.Tensor:
        if len(raw) == 0:
            raise ClientError(422, "invalid", "vectors is empty: send [[...d floats...], ...] or one [d] vector")
        rows = [raw] if not isinstance(raw[0], list) else raw
        if len(rows) > self.config.max_vectors:
            raise ClientError(413, "too_large", f"{len(rows)} vectors sent; the limit is {self.config.max_vectors} "
                                                "per request (--max-vectors)")
        for i, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != self.d_model:
                width = len(row) if isinstance(row, list) else "?"
                raise ClientError(422, "invalid", f"vector {i} has width {width}; this bundle's d_model is "
                                                  f"{self.d_model}")
        vectors = torch.tensor(rows, dtype=torch.float32)
        try:
            # The library's own check (NaN/inf, all-zero) so the API and Python refuse the same things;
            # float32 conversion turns 1e308 into inf, which it then reports.
            self.nla.check_vectors(vectors)
        except NLAError as exc:
            raise ClientError(422, "invalid", str(exc)) from None
        return vectors

    # ------------------------------------------------------------ operations
    async def samples_with_round_trip(self, vectors: torch.Tensor, key: GenKey, round_trip: bool,
                                      baseline: torch.Tensor | None = None) -> list[list[Sample]]:
        outs = await self.verbalizer.submit((vectors, key))
        samples = [[Sample(explanation=o.explanation, raw=o.raw, truncated=bool(o.truncated)) for o in row]
                   for row in outs]
        if not round_trip:
            return samples
        texts = [(o.explanation if o.explanation is not None else o.raw) or " " for row in outs for o in row]
        recon = await self.reconstructor.submit(texts)
        target = vectors.repeat_interleave(key.n, dim=0)
        mse = metrics.mse_nrm(recon, target)
        cos = metrics.cosine(recon, target)
        mean = self.nla.mean_vector
        fve = metrics.per_row_fve(recon, target, mean, baseline) if mean is not None else None
        k = 0
        for row in samples:
            for s in row:
                s.mse_nrm, s.cosine = _finite(mse[k]), _finite(cos[k])
                s.fve_nrm = _finite(fve[k]) if fve is not None else None
                k += 1
        return samples

    async def explain(self, req: ExplainRequest) -> ExplainResponse:
        transcript = None
        if req.messages is not None:
            from nla.chat import render_transcript

            self.check_text("".join(m.content for m in req.messages) or " ", "messages (all contents together)")
            transcript = await self.thread.run(render_transcript, self.nla.tokenizer,
                                               [m.model_dump() for m in req.messages])
        elif req.text is None:
            raise ClientError(422, "invalid", "body.text: Field required (or send messages, a chat transcript)")
        else:
            self.check_text(req.text, "text")
        text = req.text or ""
        key = self.gen_key(req)
        ids = transcript.ids if transcript is not None else await self.thread.run(self._tokenize, text)
        if len(ids) > self.config.max_tokens:
            raise ClientError(413, "too_large", f"text is {len(ids)} tokens; the limit is {self.config.max_tokens} "
                                                "(--max-tokens)")
        token_texts = await self.thread.run(self._token_texts, ids)
        tokens = [Token(position=i, id=t, text=s) for i, (t, s) in enumerate(zip(ids, token_texts))]
        if transcript is not None:
            for tok, role, part in zip(tokens, transcript.roles, transcript.parts):
                tok.role, tok.part = role, part
        positions = list(range(len(ids))) if req.positions is None else list(req.positions)
        if not positions:
            return ExplainResponse(tokens=tokens, results=[])
        if len(positions) > self.config.max_positions:
            raise ClientError(413, "too_large", f"{len(positions)} positions asked; the limit is "
                                                f"{self.config.max_positions} per request (--max-positions): "
                                                "pass `positions` to choose some")
        for p in positions:
            if not -len(ids) <= p < len(ids):
                raise ClientError(422, "invalid", f"position {p} is out of range: the text has {len(ids)} tokens")
        positions = [p % len(ids) for p in positions]
        state_ids, states = await self.thread.run(self.nla.base_states, ids if transcript is not None else text)
        if list(state_ids) != ids:  # both come from the same tokenizer call; a mismatch is a bug
            raise RuntimeError("tokenization changed between calls")
        states = states.float().cpu()
        mean = self.nla.mean_vector
        # B over every position of this text: a position's FVE must not depend on which
        # other positions happened to be asked for in the same request.
        baseline = metrics.baseline_variance(states, mean) if mean is not None else None
        samples = await self.samples_with_round_trip(states[positions], key, True, baseline)
        contexts = await self.thread.run(self._contexts, ids, positions)
        checks: list[Any] = [None] * len(positions)
        if req.causal:
            from nla.eval.causal import causal_at_positions

            if mean is None:
                raise ClientError(422, "invalid", "causal needs the bundle's mean vector (mean_vector.safetensors)")
            texts = [(row[0].explanation if row[0].explanation is not None else row[0].raw) or " " for row in samples]
            recon = await self.reconstructor.submit(texts)
            found = await self.thread.run(causal_at_positions, self.nla, ids, positions, recon, mean)
            checks = [CausalCheck(**{k: _finite(v) if v is not None else None for k, v in c.items()}) for c in found]
        results = []
        for p, ctx, row, check in zip(positions, contexts, samples, checks):
            first = row[0]
            results.append(PositionResult(
                position=p, token=tokens[p].text, context=ctx, explanation=first.explanation, raw=first.raw,
                mse_nrm=first.mse_nrm, cosine=first.cosine, fve_nrm=first.fve_nrm, samples=row, causal=check,
            ))
        return ExplainResponse(tokens=tokens, results=results,
                               fve_baseline=_finite(baseline) if baseline is not None else None)

    def _contexts(self, ids: list[int], positions: list[int]) -> list[str]:
        return [self.nla.tokenizer.decode(ids[: p + 1], skip_special_tokens=True) for p in positions]

    async def verbalize(self, req: VerbalizeRequest) -> VerbalizeResponse:
        key = self.gen_key(req)
        vectors = self.vectors_tensor(req.vectors)
        samples = await self.samples_with_round_trip(vectors, key, req.round_trip)
        return VerbalizeResponse(results=[VectorResult(index=i, samples=row) for i, row in enumerate(samples)])

    async def reconstruct(self, req: ReconstructRequest) -> ReconstructResponse:
        if not req.texts:
            raise ClientError(422, "invalid", "texts is empty: send at least one explanation")
        if len(req.texts) > self.config.max_texts:
            raise ClientError(413, "too_large", f"{len(req.texts)} texts sent; the limit is {self.config.max_texts} "
                                                "per request (--max-texts)")
        for i, t in enumerate(req.texts):
            self.check_text(t, f"texts[{i}]")
        vecs = await self.reconstructor.submit(list(req.texts))
        return ReconstructResponse(vectors=vecs.tolist(), norms=[float(x) for x in torch.linalg.norm(vecs, dim=-1)])

    async def search(self, req: SearchRequest) -> SearchResponse:
        from nla.search import search

        if self.search_index is None:
            raise ClientError(422, "invalid", "no dataset to search: start the server with --data DATASET")
        self.check_text(req.text, "text")
        if not 1 <= req.k <= 100:
            raise ClientError(422, "invalid", f"k={req.k} is out of range: 1 to 100")
        hits = await self.thread.run(search, self.nla, self.search_index, req.text, req.k, req.explain,
                                     self.config.default_new_tokens)
        return SearchResponse(dataset=str(self.config.data), hits=[SearchHit(**h) for h in hits])

    def parse_vectors(self, data: bytes, fmt: str | None) -> ParsedVectors:
        if not data:
            raise ClientError(422, "invalid", "empty body: send the bytes of a .npy or .safetensors file")
        if fmt is None:
            fmt = "npy" if data[:6] == b"\x93NUMPY" else "safetensors"
        if fmt == "npy":
            import numpy as np

            try:
                # allow_pickle=False: an .npy of Python objects would otherwise run code on load.
                arr = np.load(io.BytesIO(data), allow_pickle=False)
            except Exception as exc:
                raise ClientError(422, "invalid", f"not a readable .npy file ({str(exc).splitlines()[0]})") from None
            if arr.dtype.kind not in "fiu":
                raise ClientError(422, "invalid", f".npy dtype {arr.dtype} is not numeric")
            tensor = torch.from_numpy(arr.astype("float32"))
        elif fmt == "safetensors":
            from safetensors.torch import load as load_safetensors

            try:
                tensors = load_safetensors(data)
            except Exception as exc:
                raise ClientError(422, "invalid", "not a readable .safetensors file "
                                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
            if not tensors:
                raise ClientError(422, "invalid", ".safetensors file holds no tensors")
            tensor = tensors[sorted(tensors)[0]]
            if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
                raise ClientError(422, "invalid", f".safetensors tensor dtype {tensor.dtype} is not numeric")
            tensor = tensor.float()
        else:
            raise ClientError(422, "invalid", f"format {fmt!r} is not supported: use npy or safetensors")
        if tensor.ndim == 1:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 2:
            raise ClientError(422, "invalid", f"expected a [d] or [n, d] array, got shape {list(tensor.shape)}")
        vectors = self.vectors_tensor(tensor.tolist())
        return ParsedVectors(format=fmt, shape=list(vectors.shape), vectors=vectors.tolist())

    def info(self) -> dict[str, Any]:
        from nla.names import VERSION as __version__

        meta = self.nla.meta.to_dict()
        meta.pop("extra", None)
        c = self.config
        return {
            "bundle": meta,
            "has_mean_vector": self.nla.mean_vector is not None,
            "search_dataset": str(c.data) if self.search_index is not None else None,
            "device": str(self.nla.device),
            "generation_backend": c.generation_backend,
            "nla_version": __version__,
            "batching": {
                "enabled": c.batching, "max_wait_ms": c.max_wait_ms, "max_batch_rows": c.max_batch_rows,
                "verbalize": self.verbalizer.stats.to_dict(), "reconstruct": self.reconstructor.stats.to_dict(),
            },
            "limits": {k: getattr(c, k) for k in (
                "max_body_bytes", "max_text_chars", "max_tokens", "max_positions", "max_vectors", "max_texts",
                "max_n", "max_new_tokens", "default_new_tokens", "timeout_s")},
            "d_model": self.d_model,
        }


async def _timed(coro: Awaitable[T], timeout: float) -> T:
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        raise ClientError(504, "timeout", f"request took longer than {timeout:g} s (--timeout-s)") from None


def create_app(nla: Any, config: ServeConfig | None = None, api_key: str | None = None,
               backend: RolloutBackend | None = None) -> FastAPI:
    """The FastAPI app serving ``nla`` (an :class:`nla.NLA`). ``api_key``: bearer token for /v1/*.
    ``backend``: the AV's generation backend (default: the one ``config.generation_backend`` names)."""
    config = config or ServeConfig()
    service = NLAService(nla, config, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.verbalizer.start()
        service.reconstructor.start()
        yield
        await service.verbalizer.stop()
        await service.reconstructor.stop()
        service.thread.close()

    app = FastAPI(
        title="nla serve",
        summary="Natural Language Autoencoder: explain activations in words and reconstruct them",
        version=_version(),
        lifespan=lifespan,
        responses={code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 504)},
    )
    app.state.service = service

    async def require_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ClientError(401, "unauthorized", "missing API key: send the header Authorization: Bearer <key>")
        # Constant-time comparison: a byte-by-byte early exit would leak the key by timing.
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ClientError(401, "unauthorized", "invalid API key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.post("/explain", response_model=ExplainResponse)
    async def explain(req: ExplainRequest) -> ExplainResponse:
        """Tokens of ``text``; for each chosen position, the explanation(s) and round-trip metrics."""
        return await _timed(service.explain(req), config.timeout_s)

    @v1.post("/verbalize", response_model=VerbalizeResponse)
    async def verbalize(req: VerbalizeRequest) -> VerbalizeResponse:
        """Explanations of vectors (``n`` samples each)."""
        return await _timed(service.verbalize(req), config.timeout_s)

    @v1.post("/reconstruct", response_model=ReconstructResponse)
    async def reconstruct(req: ReconstructRequest) -> ReconstructResponse:
        """Vectors the AR reconstructs from explanation texts."""
        return await _timed(service.reconstruct(req), config.timeout_s)

    @v1.post("/search", response_model=SearchResponse)
    async def search(req: SearchRequest) -> SearchResponse:
        """Dataset positions whose activations are nearest to the AR's vector for ``text``."""
        return await _timed(service.search(req), config.timeout_s)

    @v1.post("/vectors/parse", response_model=ParsedVectors,
             openapi_extra={"requestBody": {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                                  "format": "binary"}}},
                                            "required": True}})
    async def parse_vectors(request: Request,
                            format: str | None = Query(None, description="npy or safetensors (default: sniffed)")
                            ) -> ParsedVectors:
        """Vectors from the bytes of a ``.npy`` (no pickles) or ``.safetensors`` file (first tensor)."""
        data = await request.body()
        return await _timed(asyncio.to_thread(service.parse_vectors, data, format), config.timeout_s)

    @v1.get("/info")
    async def info() -> dict[str, Any]:
        """Bundle metadata (base model, layer, width, injection, templates), limits and batching counters."""
        return service.info()

    app.include_router(v1)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok", auth_required=bool(api_key))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = getattr(exc, "kind", None) or _KINDS.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "request body could not be read as JSON (is it UTF-8?)"
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return _error(exc.status_code, kind, detail, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, detail = _describe_validation(exc)
        return _error(status, "bad_json" if status == 400 else "invalid", detail)

    @app.exception_handler(NLAError)
    async def nla_error(request: Request, exc: NLAError) -> JSONResponse:
        return _error(422, "invalid", str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal", f"internal error ({type(exc).__name__}); see the server log")

    # A page on another site can reach a loopback server by re-pointing its own name at
    # 127.0.0.1 (DNS rebinding); its requests still carry that name in Host, so only known names pass.
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(config))
    # Outermost, so an oversized body is refused before any route reads it.
    app.add_middleware(BodySizeLimit, limit=config.max_body_bytes)
    return app


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def allowed_hosts(config: ServeConfig) -> list[str]:
    """Loopback names, the bound address (unless a wildcard) and ``--allowed-hosts``."""
    hosts = [*LOOPBACK_NAMES, *config.allowed_hosts]
    if config.host not in ("0.0.0.0", "::", ""):
        hosts.append(config.host)
    return list(dict.fromkeys(hosts))


def _version() -> str:
    from nla.names import VERSION as __version__

    return str(__version__)


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                   startup_timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread; yields the base URL (port 0: a free one).

    The socket is bound here, before the thread starts, so the URL is known and no other
    process can take the port between choosing and binding it.
    """
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="nla-serve")
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise NLAError(f"server on {host}:{bound} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
