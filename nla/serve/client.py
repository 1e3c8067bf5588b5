"""Python clients for `nla serve`: :class:`Client` (sync) and :class:`AsyncClient` (asyncio).

Both return the server's JSON as plain dicts and raise :class:`APIError` (status, kind,
message) for any non-2xx answer, so a caller sees exactly what the server said was wrong.

    with Client("http://127.0.0.1:8000") as c:
        c.explain("The cat sat", positions=[-1])["results"][0]["explanation"]
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from nla.errors import NLAError


class APIError(NLAError):
    """A non-2xx answer: ``status`` (HTTP code), ``kind`` (the ``error`` field), ``detail``."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(f"HTTP {status} {kind}: {detail}")
        self.status = status
        self.kind = kind
        self.detail = detail


def _as_lists(vectors: Any) -> Any:
    """Tensors and arrays become nested lists; lists pass through."""
    return vectors.tolist() if hasattr(vectors, "tolist") else vectors


def _gen(n: int, max_new_tokens: int | None, sample: bool | None, temperature: float, top_p: float) -> dict[str, Any]:
    body: dict[str, Any] = {"n": n, "temperature": temperature, "top_p": top_p}
    if max_new_tokens is not None:
        body["max_new_tokens"] = max_new_tokens
    if sample is not None:
        body["sample"] = sample
    return body


def _encode(body: dict[str, Any]) -> bytes:
    # allow_nan: a NaN in the caller's vectors reaches the server, whose 422 names the vector,
    # rather than failing here with a bare ValueError.
    return json.dumps(body, allow_nan=True).encode()


def _result(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        data = response.json()
        kind, detail = str(data.get("error", "error")), str(data.get("detail", response.text))
    except (ValueError, AttributeError):
        kind, detail = "error", response.text[:500]
    raise APIError(response.status_code, kind, detail)


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class Client:
    """Synchronous client. ``api_key``: the bearer token, if the server was started with one."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 300.0, **httpx_kwargs: Any):
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, **httpx_kwargs)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        return _result(self._http.post(path, content=_encode(body)))

    def health(self) -> dict[str, Any]:
        return _result(self._http.get("/healthz"))

    def info(self) -> dict[str, Any]:
        return _result(self._http.get("/v1/info"))

    def explain(self, text: str, positions: list[int] | None = None, *, n: int = 1, max_new_tokens: int | None = None,
                sample: bool | None = None, temperature: float = 1.0, top_p: float = 1.0) -> dict[str, Any]:
        """Tokens of ``text`` and, per position (default all; ``[]``: none), explanation + metrics."""
        return self._post("/v1/explain", {"text": text, "positions": positions,
                                          **_gen(n, max_new_tokens, sample, temperature, top_p)})

    def verbalize(self, vectors: Any, *, n: int = 1, max_new_tokens: int | None = None, sample: bool | None = None,
                  temperature: float = 1.0, top_p: float = 1.0, round_trip: bool = False) -> dict[str, Any]:
        return self._post("/v1/verbalize", {"vectors": _as_lists(vectors), "round_trip": round_trip,
                                            **_gen(n, max_new_tokens, sample, temperature, top_p)})

    def reconstruct(self, texts: list[str]) -> dict[str, Any]:
        return self._post("/v1/reconstruct", {"texts": list(texts)})

    def parse_vectors(self, data: bytes, format: str | None = None) -> dict[str, Any]:
        """Vectors from the bytes of a ``.npy`` or ``.safetensors`` file, parsed by the server."""
        params = {"format": format} if format else None
        return _result(self._http.post("/v1/vectors/parse", content=data, params=params,
                                       headers={"Content-Type": "application/octet-stream"}))


class AsyncClient:
    """The same calls as :class:`Client`, awaitable; share one instance across tasks."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout: float = 300.0, **httpx_kwargs: Any):
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout, **httpx_kwargs)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        return _result(await self._http.post(path, content=_encode(body)))

    async def health(self) -> dict[str, Any]:
        return _result(await self._http.get("/healthz"))

    async def info(self) -> dict[str, Any]:
        return _result(await self._http.get("/v1/info"))

    async def explain(self, text: str, positions: list[int] | None = None, *, n: int = 1,
                      max_new_tokens: int | None = None, sample: bool | None = None, temperature: float = 1.0,
                      top_p: float = 1.0) -> dict[str, Any]:
        return await self._post("/v1/explain", {"text": text, "positions": positions,
                                                **_gen(n, max_new_tokens, sample, temperature, top_p)})

    async def verbalize(self, vectors: Any, *, n: int = 1, max_new_tokens: int | None = None,
                        sample: bool | None = None, temperature: float = 1.0, top_p: float = 1.0,
                        round_trip: bool = False) -> dict[str, Any]:
        return await self._post("/v1/verbalize", {"vectors": _as_lists(vectors), "round_trip": round_trip,
                                                  **_gen(n, max_new_tokens, sample, temperature, top_p)})

    async def reconstruct(self, texts: list[str]) -> dict[str, Any]:
        return await self._post("/v1/reconstruct", {"texts": list(texts)})

    async def parse_vectors(self, data: bytes, format: str | None = None) -> dict[str, Any]:
        params = {"format": format} if format else None
        return _result(await self._http.post("/v1/vectors/parse", content=data, params=params,
                                             headers={"Content-Type": "application/octet-stream"}))
