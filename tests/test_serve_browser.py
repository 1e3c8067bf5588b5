"""The web explorer in a real browser: Playwright driving Debian's Chromium (never a downloaded one).

`./nla.sh test` installs chromium with apt; without it this test fails with the command to run,
because a skipped browser test would let a broken page pass unnoticed.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from nla.bundle import NLA
from nla.serve import Client, ServeConfig, create_app, running_server

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TEXT = "The cat sat on the mat."


def _chromium() -> str:
    for name in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(name).exists():
            return name
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    pytest.fail("Chromium is not installed: run `apt-get install -y chromium` (./nla.sh test does this); "
                "the browser test needs the system browser and never downloads one")


@pytest.fixture(scope="module")
def server(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = tmp_path_factory.mktemp("serve_browser") / "run"
    NLA.initialize("tiny:llama", dataset=tiny_dataset).save_pretrained(out)
    cfg = ServeConfig(default_new_tokens=6, max_new_tokens=16, torch_threads=1, data=str(tiny_dataset))
    with running_server(create_app(NLA.from_pretrained(out), cfg)) as url:
        yield url


@pytest.fixture(scope="module")
def page(server: str) -> Iterator[Any]:
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context()
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
        pg = context.new_page()
        errors: list[str] = []
        pg.on("pageerror", lambda exc: errors.append(str(exc)))
        pg.goto(server + "/")
        yield pg
        assert not errors, f"JavaScript errors on the page: {errors}"
        browser.close()


def _expected(sample: dict[str, Any]) -> str:
    return sample["explanation"] if sample["explanation"] is not None else "(unparseable) " + sample["raw"]


def test_click_a_token_shows_its_explanation(page: Any, server: str) -> None:
    # The header fills in from /v1/info: the page talks to the API.
    page.wait_for_function("document.getElementById('model-info').textContent.includes('layer')")
    assert "tiny:llama" in page.text_content("#model-info")

    page.fill("#text", TEXT)
    page.click("#tokenize")
    page.wait_for_selector("#tokens .token")
    with Client(server) as c:
        tokens = c.explain(TEXT, positions=[])["tokens"]
    chips = page.query_selector_all("#tokens .token")
    assert len(chips) == len(tokens)
    assert [int(ch.get_attribute("data-position")) for ch in chips] == list(range(len(tokens)))

    position = 3
    page.click(f'#tokens .token[data-position="{position}"]')
    page.wait_for_selector("#detail[data-state=done]", state="visible")
    shown = page.text_content("#explanation")
    # What the DOM shows is what the API answers for the same text, position and (greedy) settings.
    with Client(server) as c:
        want = c.explain(TEXT, positions=[position])["results"][0]
    assert shown == _expected(want)
    assert page.text_content("#d-position") == str(position)
    assert page.text_content("#d-token") == want["token"]
    assert page.text_content("#context") == want["context"]
    assert page.text_content("#fve") == f"FVE {want['fve_nrm']:.3f}"
    assert f"mse_nrm {want['mse_nrm']:.3f}" in page.text_content("#mse")
    assert "selected" in page.get_attribute(f'#tokens .token[data-position="{position}"]', "class")

    # Copy-as-JSON puts the shown result on the clipboard.
    page.click("#copy-json")
    page.wait_for_function("document.getElementById('copy-status').textContent === 'copied'")
    copied = json.loads(page.evaluate("navigator.clipboard.readText()"))
    assert copied["position"] == position and _expected(copied) == shown


def test_vector_panel_pasted_json_uploaded_npy_and_errors(page: Any, server: str, tmp_path: Path) -> None:
    with Client(server) as c:
        d = c.info()["d_model"]
    vec = np.random.default_rng(1).normal(size=d).astype("float32")

    page.fill("#vector-text", json.dumps(vec.tolist()))
    page.click("#verbalize")
    page.wait_for_selector("#vector-results .vector-result")
    shown = page.text_content("#vector-results .vector-result")
    with Client(server) as c:
        want = c.verbalize([vec.tolist()])["results"][0]["samples"][0]
    assert shown.startswith("[0] " + _expected(want))
    assert "mse_nrm" in shown  # round trip is on by default in the panel

    # A wrong width comes back as the server's message, shown on the page.
    page.fill("#vector-text", "[1, 2, 3]")
    page.click("#verbalize")
    page.wait_for_selector("#error:not([hidden])")
    assert f"d_model is {d}" in page.text_content("#error")

    # An uploaded .npy of two vectors is parsed by the server and verbalized.
    npy = tmp_path / "two.npy"
    buf = io.BytesIO()
    np.save(buf, np.stack([vec, -vec]))
    npy.write_bytes(buf.getvalue())
    page.set_input_files("#vector-file", str(npy))
    page.click("#verbalize")
    page.wait_for_function("document.querySelectorAll('#vector-results .vector-result').length === 2")
    assert page.is_hidden("#error")
    items = [el.text_content() for el in page.query_selector_all("#vector-results .vector-result")]
    assert items[0].startswith("[0] ") and items[1].startswith("[1] ")
    assert json.loads(page.text_content("#json-view"))["results"][1]["index"] == 1


def test_search_panel_lists_what_the_api_answers(page: Any, server: str) -> None:
    query = "a keyword inside Python code"
    page.fill("#search-text", query)
    page.fill("#search-k", "4")
    page.check("#search-explain")
    page.click("#search")
    page.wait_for_function("document.querySelectorAll('#search-results .search-hit').length === 4")
    assert page.is_hidden("#error")
    with httpx.Client(base_url=server) as c:
        want = c.post("/v1/search", json={"text": query, "k": 4, "explain": True}).json()["hits"]
    items = page.query_selector_all("#search-results .search-hit")
    assert [int(el.get_attribute("data-row")) for el in items] == [h["row"] for h in want]
    first = items[0]
    assert first.query_selector(".hit-av").text_content() == "AV: " + want[0]["av_explanation"]
    assert f"score {want[0]['score']:.3f}" in first.text_content()
    assert want[0]["context"].split()[-1] in first.query_selector(".hit-context").text_content()

    # A bad k comes back as the server's message.
    page.fill("#search-k", "1000")
    page.click("#search")
    page.wait_for_selector("#error:not([hidden])")
    assert "k=1000" in page.text_content("#error")


def test_chat_transcript_tokens_carry_roles(page: Any, server: str) -> None:
    messages = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]
    page.check("#chat-mode")
    page.fill("#text", json.dumps(messages))
    page.click("#tokenize")
    page.wait_for_selector("#tokens .token[data-role=assistant]")
    with httpx.Client(base_url=server) as c:
        want = c.post("/v1/explain", json={"messages": messages, "positions": []}).json()["tokens"]
    chips = page.query_selector_all("#tokens .token")
    assert [ch.get_attribute("data-role") for ch in chips] == [t["role"] for t in want]
    assert "role-user" in chips[[t["role"] for t in want].index("user")].get_attribute("class")

    # Clicking an assistant token explains the state in the rendered transcript.
    pos = max(i for i, t in enumerate(want) if t["role"] == "assistant" and t["part"] == "content")
    page.click(f'#tokens .token[data-position="{pos}"]')
    page.wait_for_function(f"document.getElementById('d-position').textContent === '{pos}'")
    page.wait_for_selector("#detail[data-state=done]", state="visible")
    with httpx.Client(base_url=server) as c:
        result = c.post("/v1/explain", json={"messages": messages, "positions": [pos]}).json()["results"][0]
    assert page.text_content("#explanation") == _expected(result)

    # Text that is not JSON is reported on the page, not sent.
    page.fill("#text", "not json")
    page.click("#tokenize")
    page.wait_for_selector("#error:not([hidden])")
    assert "not valid JSON" in page.text_content("#error")
    page.uncheck("#chat-mode")


def test_causal_check_in_the_detail(page: Any, server: str) -> None:
    page.uncheck("#chat-mode")
    page.fill("#text", TEXT)
    page.click("#tokenize")
    page.wait_for_selector("#tokens .token")
    page.check("#causal")
    page.click('#tokens .token[data-position="4"]')
    page.wait_for_selector("#causal-result:not([hidden])")
    with httpx.Client(base_url=server) as c:
        want = c.post("/v1/explain", json={"text": TEXT, "positions": [4], "causal": True}).json()["results"][0]["causal"]
    shown = page.text_content("#causal-result")
    assert f"KL {want['kl_reconstruction']:.4f} vs μ {want['kl_mean_ablation']:.4f}" in shown
    page.uncheck("#causal")
    page.click('#tokens .token[data-position="3"]')
    page.wait_for_function("document.getElementById('d-position').textContent === '3'")
    page.wait_for_selector("#causal-result", state="hidden")
