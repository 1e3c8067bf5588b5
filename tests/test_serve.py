"""`nla serve`: a real uvicorn server on a loopback port, a tiny-model bundle, the real client."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from nla.bundle import NLA
from nla.serve import APIError, AsyncClient, Client, ServeConfig, create_app, running_server

TEXT = "The cat sat on the mat."

# Small limits so every "too large" case fits in a few kilobytes and generation stays short.
LIMITS = dict(max_body_bytes=256 * 1024, max_text_chars=2000, max_tokens=600, max_positions=16, max_vectors=8,
              max_texts=8, max_n=4, max_new_tokens=16, default_new_tokens=4, timeout_s=120.0,
              # One torch thread: two threads on a CPU shared with other jobs run ~6x slower.
              torch_threads=1)


@pytest.fixture(scope="module")
def bundle_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve") / "run"
    NLA.initialize("tiny:llama", dataset=tiny_dataset).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def nla(bundle_dir: Path) -> NLA:
    return NLA.from_pretrained(bundle_dir)


@pytest.fixture(scope="module")
def server(nla: NLA) -> Iterator[str]:
    with running_server(create_app(nla, ServeConfig(**LIMITS))) as url:  # type: ignore[arg-type]
        yield url


@pytest.fixture()
def client(server: str) -> Iterator[Client]:
    with Client(server) as c:
        yield c


# ---------------------------------------------------------------- each endpoint
def test_health_info_and_openapi(client: Client, server: str, nla: NLA) -> None:
    assert client.health() == {"status": "ok", "auth_required": False}
    info = client.info()
    assert info["d_model"] == nla.meta.d_model
    assert info["bundle"]["base_model"] == "tiny:llama"
    assert info["bundle"]["layer_index"] == nla.meta.layer_index
    assert info["bundle"]["tokens"]["marker_id"] == nla.meta.tokens.marker_id
    assert info["has_mean_vector"] is True
    assert info["limits"]["max_vectors"] == LIMITS["max_vectors"]
    schema = httpx.get(f"{server}/openapi.json").json()
    for path in ("/v1/explain", "/v1/verbalize", "/v1/reconstruct", "/v1/info", "/healthz", "/v1/vectors/parse"):
        assert path in schema["paths"], path
    assert {"ExplainRequest", "VerbalizeRequest", "ReconstructResponse", "ErrorResponse"} <= set(
        schema["components"]["schemas"])


def test_explain_matches_the_library(client: Client, nla: NLA) -> None:
    out = client.explain(TEXT, positions=[3, -1], max_new_tokens=6)
    ids = nla.tokenizer.encode(TEXT, add_special_tokens=True)
    assert [t["id"] for t in out["tokens"]] == ids
    assert [r["position"] for r in out["results"]] == [3, len(ids) - 1]
    assert out["fve_baseline"] > 0
    # Same text, position and greedy settings straight through the Python API: same answer.
    direct = nla.explain(TEXT, [3], max_new_tokens=6)[0]
    got = out["results"][0]
    assert got["raw"] == direct["raw"]
    assert got["explanation"] == direct["explanation"]
    assert got["context"] == direct["context"]
    assert got["token"] == direct["token"]
    assert got["mse_nrm"] == pytest.approx(direct["mse_nrm"], abs=1e-4)
    assert got["cosine"] == pytest.approx(direct["cosine"], abs=1e-4)
    assert 0.0 <= got["mse_nrm"] <= 4.0
    # fve_nrm = 1 − mse_nrm / B with B over all of the text's positions.
    assert got["fve_nrm"] == pytest.approx(1 - got["mse_nrm"] / out["fve_baseline"], rel=1e-4)
    assert len(got["samples"]) == 1


def test_explain_all_positions_tokens_only_and_samples(client: Client) -> None:
    full = client.explain("a b c", max_new_tokens=3)
    assert [r["position"] for r in full["results"]] == list(range(len(full["tokens"])))
    assert all(r["fve_nrm"] is not None for r in full["results"])
    tokens_only = client.explain("a b c", positions=[])
    assert tokens_only["results"] == [] and tokens_only["tokens"] == full["tokens"]
    sampled = client.explain("a b c", positions=[1], n=3, max_new_tokens=3)
    assert len(sampled["results"][0]["samples"]) == 3


def test_verbalize_reconstruct_and_round_trip(client: Client, nla: NLA) -> None:
    _, states = nla.base_states(TEXT)
    vecs = states[[2, 5]].float()
    out = client.verbalize(vecs, n=2, max_new_tokens=5, round_trip=True)
    assert [r["index"] for r in out["results"]] == [0, 1]
    for r in out["results"]:
        assert len(r["samples"]) == 2
        for s in r["samples"]:
            assert isinstance(s["raw"], str) and 0.0 <= s["mse_nrm"] <= 4.0 and -1.0 <= s["cosine"] <= 1.0
    one = client.verbalize(vecs[0].tolist(), max_new_tokens=5)  # a single [d] vector is accepted
    assert len(one["results"]) == 1 and one["results"][0]["samples"][0]["mse_nrm"] is None
    greedy = nla.verbalize(vecs[:1], max_new_tokens=5)[0][0]
    assert one["results"][0]["samples"][0]["raw"] == greedy.raw

    texts = ["a cat on a mat", "numbers and code"]
    rec = client.reconstruct(texts)
    got = torch.tensor(rec["vectors"])
    assert got.shape == (2, nla.meta.d_model)
    assert torch.allclose(got, nla.reconstruct(texts), atol=1e-4)
    assert rec["norms"] == pytest.approx(torch.linalg.norm(got, dim=-1).tolist(), rel=1e-5)


def test_parse_vectors_npy_and_safetensors(client: Client, nla: NLA) -> None:
    d = nla.meta.d_model
    arr = np.random.default_rng(0).normal(size=(3, d)).astype("float32")
    buf = io.BytesIO()
    np.save(buf, arr)
    parsed = client.parse_vectors(buf.getvalue())
    assert parsed["format"] == "npy" and parsed["shape"] == [3, d]
    assert np.allclose(np.array(parsed["vectors"]), arr)
    st = save_safetensors({"v": torch.from_numpy(arr[0]).to(torch.bfloat16)})
    parsed = client.parse_vectors(st)
    assert parsed["format"] == "safetensors" and parsed["shape"] == [1, d]
    assert np.allclose(parsed["vectors"][0], arr[0], atol=0.05)


# ---------------------------------------------------------------- bad input
def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def _big_chunks(n_bytes: int) -> Iterator[bytes]:
    # A generator body has no Content-Length: the server must count it as it streams in.
    sent = 0
    while sent < n_bytes:
        yield b" " * 65536
        sent += 65536


D = 64  # tiny:llama's d_model (checked in test_bad_input)


def _json(body: Any) -> dict[str, Any]:
    return {"content": json.dumps(body), "headers": {"Content-Type": "application/json"}}


BAD_INPUTS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    # (name, method, path, request kwargs, status, message fragment)
    ("not json", "POST", "/v1/explain", {"content": b"{text: nope", "headers": {"Content-Type": "application/json"}},
     400, "not valid JSON"),
    ("not utf-8", "POST", "/v1/explain", {"content": b'{"text": "\xc3\x28"}', "headers": {"Content-Type": "application/json"}},
     400, "could not be read"),
    ("no body", "POST", "/v1/explain", {"headers": {"Content-Type": "application/json"}}, 422,
     "request body is missing"),
    ("json array, not object", "POST", "/v1/explain", _json([1, 2]), 422, "valid dictionary"),
    ("missing text", "POST", "/v1/explain", _json({"positions": [1]}), 422, "body.text: Field required"),
    ("text not a string", "POST", "/v1/explain", _json({"text": 5}), 422, "body.text"),
    ("empty text", "POST", "/v1/explain", _json({"text": "   "}), 422, "text is empty"),
    ("text too long", "POST", "/v1/explain", _json({"text": "x" * 2001}), 413, "--max-text-chars"),
    ("position out of range", "POST", "/v1/explain", _json({"text": "ab", "positions": [99]}), 422,
     "position 99 is out of range"),
    ("too many positions", "POST", "/v1/explain", _json({"text": "abcdefghijklmnopqrstuvwxyz"}), 413,
     "--max-positions"),
    ("n zero", "POST", "/v1/explain", _json({"text": "ab", "positions": [1], "n": 0}), 422, "n=0 is out of range"),
    ("n too large", "POST", "/v1/verbalize", _json({"vectors": [[1.0] * D], "n": 50}), 422, "--max-n"),
    ("n not a number", "POST", "/v1/verbalize", _json({"vectors": [[1.0] * D], "n": "many"}), 422, "body.n"),
    ("max_new_tokens too large", "POST", "/v1/verbalize", _json({"vectors": [[1.0] * D], "max_new_tokens": 10_000}),
     422, "--max-new-tokens"),
    ("bad temperature", "POST", "/v1/verbalize", _json({"vectors": [[1.0] * D], "sample": True, "temperature": -1}),
     422, "temperature"),
    ("wrong width", "POST", "/v1/verbalize", _json({"vectors": [[1.0] * 10]}), 422, "width 10"),
    ("ragged vectors", "POST", "/v1/verbalize", _json({"vectors": [[1.0] * D, [1.0] * (D - 1)]}), 422,
     f"vector 1 has width {D - 1}"),
    ("NaN", "POST", "/v1/verbalize", {"content": "{\"vectors\": [[NaN" + ", 1.0" * (D - 1) + "]]}",
                                      "headers": {"Content-Type": "application/json"}}, 422, "NaN or inf"),
    ("overflows float32", "POST", "/v1/verbalize", _json({"vectors": [[1e39] * D]}), 422, "NaN or inf"),
    ("all-zero vector", "POST", "/v1/verbalize", _json({"vectors": [[0.0] * D]}), 422, "all zeros"),
    ("string in vector", "POST", "/v1/verbalize", _json({"vectors": [["a"] * D]}), 422, "valid number"),
    ("no vectors", "POST", "/v1/verbalize", _json({"vectors": []}), 422, "vectors is empty"),
    ("too many vectors", "POST", "/v1/verbalize", _json({"vectors": [[1.0] * D] * 9}), 413, "--max-vectors"),
    ("no texts", "POST", "/v1/reconstruct", _json({"texts": []}), 422, "texts is empty"),
    ("texts not a list", "POST", "/v1/reconstruct", _json({"texts": "hello"}), 422, "body.texts"),
    ("too many texts", "POST", "/v1/reconstruct", _json({"texts": ["a"] * 9}), 413, "--max-texts"),
    ("empty text in list", "POST", "/v1/reconstruct", _json({"texts": ["ok", ""]}), 422, "texts[1] is empty"),
    ("body too large", "POST", "/v1/reconstruct", _json({"texts": ["x" * 300_000]}), 413, "--max-body-bytes"),
    ("chunked body too large", "POST", "/v1/reconstruct",
     {"content": _big_chunks(400_000), "headers": {"Content-Type": "application/json"}}, 413, "--max-body-bytes"),
    ("garbage vector file", "POST", "/v1/vectors/parse", {"content": b"\x00\x01garbage"}, 422,
     "not a readable .safetensors"),
    ("pickled npy", "POST", "/v1/vectors/parse", {"content": _npy(np.array([{"a": 1}], dtype=object))}, 422,
     "not a readable .npy"),
    ("npy of wrong width", "POST", "/v1/vectors/parse", {"content": _npy(np.ones((2, 5), dtype="float32"))}, 422,
     "width 5"),
    ("unknown vector format", "POST", "/v1/vectors/parse?format=pt", {"content": b"abc"}, 422,
     "format 'pt' is not supported"),
    ("empty vector file", "POST", "/v1/vectors/parse", {"content": b""}, 422, "empty body"),
    ("unknown endpoint", "GET", "/v1/nope", {}, 404, "Not Found"),
    ("wrong method", "GET", "/v1/explain", {}, 405, "Method Not Allowed"),
]


@pytest.mark.parametrize(("name", "method", "path", "kwargs", "status", "fragment"), BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(server: str, nla: NLA, name: str, method: str, path: str, kwargs: dict[str, Any],
                   status: int, fragment: str) -> None:
    assert nla.meta.d_model == D
    with httpx.Client(base_url=server, timeout=60) as http:
        r = http.request(method, path, **kwargs)
        assert r.status_code == status, r.text
        body = r.json()
        assert set(body) == {"error", "detail"}, body
        assert fragment in body["detail"], body
        # The server keeps serving after every bad request.
        assert http.get("/healthz").json()["status"] == "ok"


def test_client_raises_api_error_with_the_server_message(client: Client) -> None:
    with pytest.raises(APIError) as err:
        client.verbalize(torch.full((1, D), float("nan")))
    assert err.value.status == 422 and err.value.kind == "invalid" and "NaN" in err.value.detail
    with pytest.raises(APIError, match="width 3"):
        client.verbalize([[1.0, 2.0, 3.0]])
    assert client.explain("ok", positions=[0], max_new_tokens=2)["results"][0]["position"] == 0


# ---------------------------------------------------------------- load, batching, timeout
async def _mixed_load(url: str, count: int, d: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    async with AsyncClient(url) as c:
        calls = []
        for i in range(count):
            kind = i % 4
            if kind in (0, 1):
                calls.append(c.verbalize(torch.randn(1, d, generator=gen), max_new_tokens=4))
            elif kind == 2:
                calls.append(c.reconstruct([f"explanation number {i}"]))
            else:
                calls.append(c.explain(f"text {i} here", positions=[-1], max_new_tokens=4))
        return list(await asyncio.gather(*calls))


def test_200_concurrent_requests_all_succeed(server: str, client: Client) -> None:
    before = client.info()["batching"]["verbalize"]
    results = asyncio.run(_mixed_load(server, 200, D))
    assert len(results) == 200
    for i, r in enumerate(results):
        if i % 4 in (0, 1):
            assert len(r["results"]) == 1 and isinstance(r["results"][0]["samples"][0]["raw"], str)
        elif i % 4 == 2:
            assert len(r["vectors"]) == 1 and len(r["vectors"][0]) == D
        else:
            assert r["results"][0]["explanation"] is None or isinstance(r["results"][0]["explanation"], str)
    after = client.info()["batching"]["verbalize"]
    # 150 requests generated (100 verbalize + 50 explain); concurrent ones shared model calls.
    assert after["requests"] - before["requests"] == 150
    assert after["model_calls"] - before["model_calls"] < 150
    assert after["largest_call_rows"] > 1
    assert client.health()["status"] == "ok"


def test_no_batching_serves_one_request_per_call(nla: NLA) -> None:
    cfg = ServeConfig(**{**LIMITS, "batching": False})  # type: ignore[arg-type]
    with running_server(create_app(nla, cfg)) as url:
        results = asyncio.run(_mixed_load(url, 24, D))
        assert len(results) == 24
        with Client(url) as c:
            stats = c.info()["batching"]
    assert stats["enabled"] is False
    assert stats["verbalize"]["requests"] == stats["verbalize"]["model_calls"] == 18
    assert stats["reconstruct"]["requests"] == stats["reconstruct"]["model_calls"] == 6 + 6
    assert stats["verbalize"]["largest_call_rows"] == 1


def test_timeout_gives_504_and_the_server_keeps_serving(bundle_dir: Path) -> None:
    # Its own model copy: the timed-out generation finishes in the background and must not
    # share forward hooks with another server's model.
    own = NLA.from_pretrained(bundle_dir)
    cfg = ServeConfig(**{**LIMITS, "timeout_s": 0.001})  # type: ignore[arg-type]
    with running_server(create_app(own, cfg)) as url, Client(url) as c:
        with pytest.raises(APIError) as err:
            c.verbalize(torch.ones(1, D), max_new_tokens=16)
        assert err.value.status == 504 and "--timeout-s" in err.value.detail
        assert c.health()["status"] == "ok"


# ---------------------------------------------------------------- auth and the real CLI
def test_bearer_token(nla: NLA) -> None:
    with running_server(create_app(nla, ServeConfig(**LIMITS), api_key="s3cret-token")) as url:  # type: ignore[arg-type]
        with Client(url) as anon:
            assert anon.health()["auth_required"] is True  # liveness needs no key
            with pytest.raises(APIError) as err:
                anon.info()
            assert err.value.status == 401 and "Authorization: Bearer" in err.value.detail
        with Client(url, api_key="wrong") as wrong, pytest.raises(APIError, match="invalid API key"):
            wrong.reconstruct(["x"])
        with Client(url, api_key="s3cret-token") as ok:
            info = ok.info()
            assert "s3cret-token" not in json.dumps(info)
            assert len(ok.reconstruct(["x"])["vectors"]) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_on_loopback_with_key_from_env_and_never_logs_it(bundle_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    secret = "cli-secret-7f3a9"
    env = {**os.environ, "NLA_TEST_KEY": secret, "HF_HUB_OFFLINE": "1"}
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nla.cli", "serve", "--nla", str(bundle_dir), "--port", str(port),
             "--api-key-env", "NLA_TEST_KEY", "--default-new-tokens", "3", "--no-batching"],
            stdout=sink, stderr=subprocess.STDOUT, env=env,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "server did not start:\n" + log.read_text()
                time.sleep(0.2)
            assert httpx.get(f"{url}/v1/info").status_code == 401
            # A key sent in the query string (some clients do) must not reach the access log either.
            assert httpx.get(f"{url}/healthz?api_key={secret}").status_code == 200
            with Client(url, api_key=secret) as c:
                assert c.info()["batching"]["enabled"] is False
                assert len(c.explain("hi there", positions=[-1])["results"]) == 1
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    text = log.read_text()
    assert "127.0.0.1" in text and "POST /v1/explain" in text  # the access log ran…
    assert "GET /healthz" in text and secret not in text  # …and never saw the token, header or query
    assert re.search(r"auth=bearer token from \$NLA_TEST_KEY", text)


def test_cli_refuses_a_missing_key_variable(bundle_dir: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from nla.cli import main

    monkeypatch.delenv("NLA_UNSET_KEY", raising=False)
    assert main(["serve", "--nla", str(bundle_dir), "--api-key-env", "NLA_UNSET_KEY"]) == 2
    err = capsys.readouterr().err
    assert "NLA_UNSET_KEY" in err and "unset or empty" in err
