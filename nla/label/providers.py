"""Teachers: the models that write the explanations ``nla label`` stores.

One small interface, :class:`Teacher`, with ``async explain(batch) -> list[str | None]``: the
raw answer for each request (``None`` when the teacher gave none). Parsing, retries, caching
and concurrency live in the runner, so a new provider is only the request itself.

Specs (``--teacher``):

* ``openai:<model>`` — any OpenAI-compatible chat-completions endpoint (``--base-url``)
* ``anthropic:<model>`` — the Anthropic Messages API
* ``hf:<model>`` — a local transformers chat model (hub id, path, ``default``, ``tiny:<arch>``)
* ``lens`` / ``lens:<model>`` — offline, deterministic; see :mod:`nla.label.lens`

Errors are typed so the runner knows what to do: :class:`TransientError` (429, 5xx, timeouts:
back off and retry), :class:`UnreachableError` (retried, then fatal), :class:`RejectedError`
(this request is bad: the row fails, the run goes on) and :class:`FatalError` (wrong key, no
such model: stop, save what is finished, one-line error). Their messages never contain the API
key: it is read from the environment into a header and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from nla.errors import NLAError
from nla.label.prompt import SYSTEM_PROMPT, USER_TEMPLATE, build_messages
from nla.meta import redact_url


@dataclass(frozen=True)
class LabelRequest:
    """One thing to explain: the decoded text of tokens ``0..position``."""

    context: str
    key: str = ""
    # The base model's own top next tokens at this position, (id, probability) most likely first,
    # when the dataset stored them (`nla extract --next-tokens N`); teachers may ignore it.
    next_tokens: tuple[tuple[int, float], ...] | None = None


@dataclass
class Usage:
    """What the teacher has spent so far (tokens as reported by the provider)."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    reported: bool = False

    def add(self, input_tokens: int | None, output_tokens: int | None) -> None:
        self.requests += 1
        if input_tokens is not None or output_tokens is not None:
            self.reported = True
            self.input_tokens += int(input_tokens or 0)
            self.output_tokens += int(output_tokens or 0)


class TeacherError(Exception):
    """A failed request; the subclass says what the runner should do about it."""


class TransientError(TeacherError):
    """Worth retrying after a pause (429, 5xx, timeout); ``retry_after`` from the server."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class UnreachableError(TransientError):
    """No connection at all: retried like a blip, fatal once the retries run out."""


class RejectedError(TeacherError):
    """The provider refused this one request (e.g. 400, too long): the row fails, the run goes on."""


class FatalError(TeacherError):
    """Nothing else will work either (401, 404 model): stop the run."""


class Teacher(ABC):
    """A model that explains positions. Subclasses set ``provider`` and ``model``."""

    provider: str = ""
    model: str = ""
    #: Remote teachers get one request per call and ``--concurrency`` calls in flight; local
    #: ones get ``batch_size`` requests per call, one call at a time (the forward pass batches).
    remote: bool = True
    batch_size: int = 1

    def __init__(self) -> None:
        self.usage = Usage()

    @property
    def spec(self) -> str:
        return f"{self.provider}:{self.model}" if self.model else self.provider

    @property
    def cache_model(self) -> str:
        """The model part of the label-cache key (a teacher with versions adds its version)."""
        return self.model

    def prepare(self, contexts: dict[str, str]) -> None:  # noqa: B027 — optional hook
        """Called once before labeling with the longest context of every document."""

    async def __aenter__(self) -> Teacher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    @abstractmethod
    async def explain(self, batch: list[LabelRequest]) -> list[str | None]:
        """The raw answer (with its ``<analysis>`` block) for each request, in order."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded in the dataset sidecar (never a key)."""
        return {"teacher": self.spec, "provider": self.provider, "model": self.model}


# --------------------------------------------------------------------------- HTTP teachers
RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504, 529}


def safe_url(url: str) -> str:
    """The URL without user-info or query values (endpoints take keys in both places)."""
    return redact_url(url)


def url_secrets(url: str) -> list[str]:
    """The password and query values of ``url``: removed from anything a server echoes back."""
    try:
        parts = urlsplit(url)
        values = [v for _, v in parse_qsl(parts.query, keep_blank_values=False)]
    except ValueError:
        return []
    return [s for s in [parts.password or "", parts.username or "", *values] if len(s) >= 4]


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from APIs; the exponential backoff covers it


def _error_text(body: bytes, secrets: list[str]) -> str:
    """The provider's own error message, short, on one line, with any secret removed."""
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        text = err.get("message", "") if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        text = body.decode("utf-8", "replace")
    text = " ".join(str(text).split())[:200]
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


class HTTPTeacher(Teacher):
    """Shared plumbing: one pooled async client, status → error type, usage bookkeeping."""

    default_base_url = ""
    default_key_env = ""

    def __init__(self, model: str, *, base_url: str | None, api_key_env: str | None,
                 timeout: float, max_tokens: int, temperature: float, concurrency: int):
        super().__init__()
        if not model:
            raise NLAError(f"--teacher {self.provider}: needs a model name, e.g. {self.provider}:MODEL")
        self.model = model
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.key_env = api_key_env or self.default_key_env
        self._key = os.environ.get(self.key_env, "") if self.key_env else ""
        if not self._key and not base_url:
            raise NLAError(
                f"--teacher {self.spec}: environment variable {self.key_env} is not set "
                "(--api-key-env names another one)"
            )
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.concurrency = concurrency
        self._clients: list[Any] = []
        self._idle: asyncio.Queue[Any] | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "base_url": safe_url(self.base_url), "api_key_env": self.key_env}

    async def __aenter__(self) -> HTTPTeacher:
        import httpx

        # One single-connection client per request in flight, lent out from a free list.
        # A shared pool would do the same job, but httpcore re-scans every pooled connection
        # on each request, which at 32 connections costs more CPU than the request itself.
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        ssl_context = httpx.create_ssl_context()  # shared: loading the CA bundle takes ~0.1 s
        self._clients = [httpx.AsyncClient(timeout=self.timeout, limits=limits, verify=ssl_context)
                         for _ in range(max(1, self.concurrency))]
        self._idle = asyncio.Queue()
        for client in self._clients:
            self._idle.put_nowait(client)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self._clients:
            await client.aclose()
        self._clients, self._idle = [], None

    def headers(self) -> dict[str, str]:
        return {}

    def payload(self, context: str) -> dict[str, Any]:
        raise NotImplementedError

    def answer(self, data: dict[str, Any]) -> str | None:
        raise NotImplementedError

    def usage_of(self, data: dict[str, Any]) -> tuple[int | None, int | None]:
        raise NotImplementedError

    endpoint = ""

    async def explain(self, batch: list[LabelRequest]) -> list[str | None]:
        return list(await asyncio.gather(*(self._one(r.context) for r in batch)))

    async def _one(self, context: str) -> str | None:
        import httpx

        if self._idle is None:
            raise RuntimeError("use the teacher inside `async with`")
        url = self.base_url + self.endpoint
        where = safe_url(self.base_url)
        client = await self._idle.get()
        try:
            resp = await client.post(url, json=self.payload(context), headers=self.headers())
        except httpx.TimeoutException:
            raise TransientError(f"no answer from {where} within {self.timeout:g} s") from None
        except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            reason = type(exc).__name__
            raise UnreachableError(f"cannot reach {where} ({reason})") from None
        except httpx.TransportError as exc:
            raise TransientError(f"connection to {where} failed ({type(exc).__name__})") from None
        finally:
            self._idle.put_nowait(client)
        status = resp.status_code
        if status >= 400:
            detail = _error_text(resp.content, [self._key, *url_secrets(self.base_url)])
            if status in RETRY_STATUSES or status >= 500:
                raise TransientError(f"HTTP {status} from {where}", _retry_after(resp.headers))
            if status in (401, 403):
                raise FatalError(
                    f"{where} refused the API key (HTTP {status}); check ${self.key_env}"
                )
            if status == 404:
                raise FatalError(
                    f"{where}: model {self.model!r} or endpoint {self.endpoint} not found (HTTP 404)"
                    + (f": {detail}" if detail else "")
                )
            raise RejectedError(f"HTTP {status} from {where}" + (f": {detail}" if detail else ""))
        try:
            data = resp.json()
        except ValueError:
            raise TransientError(f"{where} answered with something that is not JSON") from None
        if not isinstance(data, dict):
            raise TransientError(f"{where} answered with unexpected JSON")
        self.usage.add(*self.usage_of(data))
        return self.answer(data)


class OpenAITeacher(HTTPTeacher):
    """Chat completions: OpenAI, OpenRouter, vLLM, SGLang, Ollama, llama.cpp server."""

    provider = "openai"
    default_base_url = "https://api.openai.com/v1"
    default_key_env = "OPENAI_API_KEY"
    endpoint = "/chat/completions"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def payload(self, context: str) -> dict[str, Any]:
        # OpenAI's own newer models refuse `max_tokens`; compatible servers mostly know only it.
        limit = "max_completion_tokens" if "api.openai.com" in self.base_url else "max_tokens"
        return {"model": self.model, "messages": build_messages(context), limit: self.max_tokens,
                "temperature": self.temperature}

    def answer(self, data: dict[str, Any]) -> str | None:
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None

    def usage_of(self, data: dict[str, Any]) -> tuple[int | None, int | None]:
        usage = data.get("usage") or {}
        return usage.get("prompt_tokens"), usage.get("completion_tokens")


class AnthropicTeacher(HTTPTeacher):
    """The Anthropic Messages API."""

    provider = "anthropic"
    default_base_url = "https://api.anthropic.com"
    default_key_env = "ANTHROPIC_API_KEY"
    endpoint = "/v1/messages"

    def headers(self) -> dict[str, str]:
        out = {"anthropic-version": "2023-06-01"}
        if self._key:
            out["x-api-key"] = self._key
        return out

    def payload(self, context: str) -> dict[str, Any]:
        return {"model": self.model, "system": SYSTEM_PROMPT, "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "messages": [{"role": "user", "content": USER_TEMPLATE.format(context=context)}]}

    def answer(self, data: dict[str, Any]) -> str | None:
        blocks = data.get("content")
        if not isinstance(blocks, list):
            return None
        text = "".join(b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text")
        return text or None

    def usage_of(self, data: dict[str, Any]) -> tuple[int | None, int | None]:
        usage = data.get("usage") or {}
        return usage.get("input_tokens"), usage.get("output_tokens")


# --------------------------------------------------------------------------- local HF teacher
class HFTeacher(Teacher):
    """A local transformers chat model; batched sampling with left padding."""

    provider = "hf"
    remote = False

    def __init__(self, model: str, *, device: str, dtype: str, batch_size: int,
                 max_tokens: int, temperature: float):
        super().__init__()
        from nla.models.loading import canonical_spec

        self.model = canonical_spec(model or "default")
        self.device = device
        self.dtype = dtype
        self.batch_size = max(1, batch_size)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self._lm: Any = None
        self._tok: Any = None

    def prepare(self, contexts: dict[str, str]) -> None:
        from nla.models.loading import load_model

        self._lm, self._tok = load_model(self.model, dtype=self.dtype, device=self.device)

    def _prompt_ids(self, context: str) -> list[int]:
        tok = self._tok
        messages = build_messages(context)
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The template already writes BOS where the model wants it: adding special tokens
            # again would give the double-BOS the model never saw in training.
            return list(tok(text, add_special_tokens=False)["input_ids"])
        text = f"{SYSTEM_PROMPT}\n\n{messages[1]['content']}\n\n"
        return list(tok(text, add_special_tokens=True)["input_ids"])

    def _generate(self, contexts: list[str]) -> list[str | None]:
        import torch

        from nla.models.forward import pad_batch

        if self._lm is None:
            self.prepare({})
        tok, lm = self._tok, self._lm
        seqs = [self._prompt_ids(c) for c in contexts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids, mask = pad_batch(seqs, pad, side="left")  # left: generation continues every row at its end
        width = ids.shape[1]
        device = next(lm.parameters()).device
        sample = self.temperature > 0
        with torch.no_grad():
            out = lm.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=self.max_tokens, do_sample=sample,
                temperature=self.temperature if sample else None, top_p=None, top_k=None,
                pad_token_id=pad,
            )
        answers: list[str | None] = []
        for row in out[:, width:].cpu():
            new = [int(t) for t in row if int(t) != pad]
            self.usage.add(None, None)
            answers.append(tok.decode(new, skip_special_tokens=True))
        self.usage.reported = True
        self.usage.input_tokens += int(mask.sum())
        self.usage.output_tokens += int((out[:, width:] != pad).sum())
        return answers

    async def explain(self, batch: list[LabelRequest]) -> list[str | None]:
        # A thread keeps the event loop (progress bar, cache commits) alive during generation.
        return await asyncio.to_thread(self._generate, [r.context for r in batch])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_tokens": self.max_tokens, "temperature": self.temperature}
