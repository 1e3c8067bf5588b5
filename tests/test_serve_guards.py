"""`nla serve` under misuse: a slow request must not hold the model past its timeout, a foreign
Host is refused (DNS rebinding), invalid text is a 4xx. A real uvicorn server on loopback."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from nla.bundle import NLA
from nla.serve import APIError, Client, ServeConfig, create_app, running_server

D = 64  # tiny:llama's d_model


@pytest.fixture(scope="module")
def bundle_dir(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serve_guards") / "run"
    NLA.initialize("tiny:llama", dataset=tiny_dataset).save_pretrained(out)
    return out


def test_a_timed_out_request_does_not_hold_the_model(bundle_dir: Path) -> None:
    """One slow request (64 vectors × 8 samples × 128 tokens) times out after 1 s; a fast request
    sent while it runs still answers. Before the fix the model thread finished the slow
    generation first, so the fast request waited for it and got a 504 too."""
    nla = NLA.from_pretrained(bundle_dir)
    torch.manual_seed(0)
    vectors = torch.randn(64, D)
    timeout = 1.0
    # The test only means something if the slow request really needs several timeouts: time an
    # eighth of its work (one model call of 64 rows) with the library.
    started = time.perf_counter()
    nla.verbalize(vectors[:8], n=8, max_new_tokens=128, do_sample=True)
    full = (time.perf_counter() - started) * 8
    assert full > 3 * timeout, f"the slow request would take only {full:.1f} s"

    cfg = ServeConfig(nla="x", timeout_s=timeout, max_vectors=64, max_n=8, max_new_tokens=128, max_batch_rows=64,
                      torch_threads=1)
    with running_server(create_app(nla, cfg)) as url:
        slow_status: list[int] = []

        def slow() -> None:
            with Client(url) as c:
                try:
                    c.verbalize(vectors, n=8, max_new_tokens=128, sample=True)
                    slow_status.append(200)
                except APIError as exc:
                    slow_status.append(exc.status)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.3)  # the slow generation is running in the model thread now
        with Client(url) as c:
            started = time.perf_counter()
            vecs = c.reconstruct(["The text is about cats."])
            fast_s = time.perf_counter() - started
        thread.join(timeout=60)
    print(f"slow request's work ~{full:.1f} s; concurrent fast request answered in {fast_s:.2f} s")
    assert slow_status == [504]
    assert len(vecs["vectors"]) == 1
    # Waits at most for the slow call's remaining time to its timeout, plus one generation step.
    assert fast_s < timeout + 1.5, f"the fast request took {fast_s:.1f} s (slow work would take {full:.1f} s)"


def test_a_foreign_host_header_is_refused(bundle_dir: Path) -> None:
    nla = NLA.from_pretrained(bundle_dir)
    with running_server(create_app(nla, ServeConfig(nla="x"))) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200  # 127.0.0.1:PORT
        assert httpx.get(f"{url}/healthz", headers={"Host": "localhost"}).status_code == 200
        foreign = httpx.get(f"{url}/healthz", headers={"Host": "attacker.example:8000"})
        assert foreign.status_code == 400
        assert httpx.post(f"{url}/v1/reconstruct", json={"texts": ["x"]},
                          headers={"Host": "attacker.example"}).status_code == 400
    with running_server(create_app(nla, ServeConfig(nla="x", allowed_hosts=["nla.internal"]))) as url:
        assert httpx.get(f"{url}/healthz", headers={"Host": "nla.internal"}).status_code == 200
        assert httpx.get(f"{url}/healthz", headers={"Host": "attacker.example"}).status_code == 400


def test_lone_surrogate_text_is_a_4xx_not_a_500(bundle_dir: Path) -> None:
    nla = NLA.from_pretrained(bundle_dir)
    with running_server(create_app(nla, ServeConfig(nla="x", default_new_tokens=2))) as url:
        body = b'{"text": "abc \\ud800 def", "positions": [0]}'  # valid JSON, not valid Unicode text
        resp = httpx.post(f"{url}/v1/explain", content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 422, resp.text
        assert "surrogate" in resp.json()["detail"]
        resp = httpx.post(f"{url}/v1/reconstruct", content=b'{"texts": ["ok", "\\udfff"]}',
                          headers={"Content-Type": "application/json"})
        assert 400 <= resp.status_code < 500, resp.text
