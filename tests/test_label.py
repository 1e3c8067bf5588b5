"""`nla label` against a real local HTTP server that misbehaves on purpose."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nla.cli import main
from nla.data.store import ActivationDataset
from nla.errors import NLAError
from nla.label.cache import cache_key
from nla.label.prompt import PROMPT_VERSION, format_explanation
from nla.label.runner import LabelConfig, label
from nla.label.testing import FAKE_MODEL, FakeTeacherServer, FaultPlan, fake_features
from nla.meta import read_yaml

KEY = "sk-test-NLA-FAKE-KEY-0123456789abcdef"
REPO = Path(__file__).resolve().parents[1]


def fake_table(data: Path) -> Path:
    """Where the fake teacher's labels go by default (DATA/labels/<teacher>)."""
    return data / "labels" / f"openai-{FAKE_MODEL}"


@pytest.fixture
def data(tiny_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dataset (labeling writes in place)."""
    return Path(shutil.copytree(tiny_dataset, tmp_path / "data"))


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return KEY


def cfg(data: Path, url: str, **kw: object) -> LabelConfig:
    base = dict(data=str(data), teacher=f"openai:{FAKE_MODEL}", base_url=f"{url}/v1", concurrency=16,
                max_retries=6, timeout=0.5, backoff=0.02, progress=False)
    base.update(kw)
    return LabelConfig(**base)  # type: ignore[arg-type]


def rows(data: Path) -> list[dict]:
    return ActivationDataset.open(data).rows()


def assert_no_secret(paths: list[Path], *texts: str) -> None:
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            assert KEY.encode() not in f.read_bytes(), f"API key leaked into {f}"
    for text in texts:
        assert KEY not in text


def test_chaos_server_every_row_labelled_or_failed_once(data: Path, api_key: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The client timeout is well above an answer's time even on a loaded CI machine (at 0.5 s a
    # slow "ok" answer was sometimes asked again and counted twice), and hangs outlast it.
    plan = FaultPlan(p_429=0.15, p_500=0.15, p_hang=0.04, p_malformed=0.1, hang_s=3.0, seed=1)
    with FakeTeacherServer(plan) as server:
        summary = label(cfg(data, server.url, allow_partial=True, timeout=2.0))  # a row or two may fail here
        stats = server.stats
    out = capsys.readouterr()
    table = rows(data)
    assert summary.todo == len(table) == 160
    assert summary.labelled + summary.failed == summary.todo
    assert summary.failed <= 2
    assert stats.statuses[429] and stats.statuses[500] and stats.hangs and stats.malformed
    for row in table:
        if row["explanation"] is None:
            continue
        # each row holds the answer to its own passage, not a neighbour's
        assert row["explanation"] == format_explanation(fake_features(row["context"]))
        assert stats.answered[row["context"]] == 1  # one paid, well-formed answer per passage
    assert sum(stats.answered.values()) == summary.labelled
    assert summary.input_tokens > 0 and summary.output_tokens > 0
    labeling = ActivationDataset.open(data).labeling
    assert labeling is not None
    assert labeling["teacher"] == f"openai:{FAKE_MODEL}"
    assert labeling["prompt_version"] == PROMPT_VERSION
    assert labeling["api_key_env"] == "OPENAI_API_KEY"
    assert labeling["rows_labelled"] == summary.labelled
    assert read_yaml(fake_table(data) / "label_config.yaml")["teacher"] == f"openai:{FAKE_MODEL}"
    assert_no_secret([data], out.out, out.err)

    # A re-run asks nothing: labelled rows are skipped.
    with FakeTeacherServer(FaultPlan()) as server:
        again = label(cfg(data, server.url))
        assert server.stats.total == summary.failed
    assert again.todo == summary.failed


def test_cache_answers_a_fresh_copy_without_requests(data: Path, tiny_dataset: Path, tmp_path: Path, api_key: str) -> None:
    with FakeTeacherServer() as server:
        first = label(cfg(data, server.url, limit=30))
        assert server.stats.total == 30 and first.labelled == 30
        # The same contexts in another copy, sharing the cache: zero requests.
        other = Path(shutil.copytree(tiny_dataset, tmp_path / "other"))
        second = label(cfg(other, server.url, limit=30, cache=str(data / "label_cache.sqlite")))
        assert server.stats.total == 30
    assert second.cached == 30 and second.requests == 0
    assert [r["explanation"] for r in rows(other)] == [r["explanation"] for r in rows(data)]


def test_splits_and_limit(data: Path, api_key: str) -> None:
    with FakeTeacherServer() as server:
        summary = label(cfg(data, server.url, splits=["eval"]))
    table = rows(data)
    assert summary.labelled == sum(r["split"] == "eval" for r in table) > 0
    assert all((r["explanation"] is not None) == (r["split"] == "eval") for r in table)


def test_anthropic_protocol(data: Path, api_key: str) -> None:
    plan = FaultPlan(p_429=0.3, api_key=KEY, seed=3)
    with FakeTeacherServer(plan) as server:
        summary = label(cfg(data, server.url, teacher=f"anthropic:{FAKE_MODEL}", base_url=server.url,
                            limit=20, price_in=1.0, price_out=5.0))
        assert server.stats.statuses[429] > 0
    assert summary.labelled == 20 and summary.failed == 0
    assert summary.cost_usd is not None and summary.cost_usd > 0
    labelled = [r for r in rows(data) if r["explanation"] is not None]
    assert all(r["explanation"] == format_explanation(fake_features(r["context"])) for r in labelled)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_faults_are_one_line_errors(data: Path, api_key: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["label", "--data", str(data), "--teacher", f"openai:{FAKE_MODEL}", "--no-progress",
            "--max-retries", "1", "--backoff", "0.01", "--timeout", "2"]
    # unreachable endpoint
    assert main([*base, "--base-url", f"http://127.0.0.1:{_free_port()}/v1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot reach" in err
    # wrong key (the server echoes it back, as OpenAI does; we must not)
    with FakeTeacherServer(FaultPlan(api_key="sk-the-right-one")) as server:
        assert main([*base, "--base-url", f"{server.url}/v1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HTTP 401" in err and "OPENAI_API_KEY" in err
    # a model that does not exist
    with FakeTeacherServer() as server:
        assert main([*base, "--teacher", "openai:no-such-model", "--base-url", f"{server.url}/v1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no-such-model" in err and "404" in err
    # no key at all for the public endpoint
    os.environ.pop("OPENAI_API_KEY")
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "OPENAI_API_KEY is not set" in err
    assert_no_secret([data], err)
    # unknown provider
    assert main(["label", "--data", str(data), "--teacher", "gemini:x"]) == 2
    assert "unknown provider" in capsys.readouterr().err


def test_missing_context_column(tmp_path: Path) -> None:
    path = tmp_path / "published.parquet"
    vecs = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(8, np.float32)), 4)
    pq.write_table(pa.table({"activation_vector": vecs}), path)
    with pytest.raises(NLAError, match="no 'context' column"):
        label(LabelConfig(data=str(path), teacher="lens:tiny:llama", progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["published.parquet"]  # nothing half-made


def test_fatal_error_mid_run_keeps_finished_rows(data: Path, api_key: str) -> None:
    with FakeTeacherServer(FaultPlan(fail_after=40)) as server, pytest.raises(NLAError, match="401") as info:
        label(cfg(data, server.url, concurrency=4))
    assert "saved" in str(info.value) and "re-run" in str(info.value)
    done = [r for r in rows(data) if r["explanation"] is not None]
    assert len(done) >= 30  # the answers before the key was revoked are on disk
    assert all(r["explanation"] == format_explanation(fake_features(r["context"])) for r in done)


def test_sigkill_then_rerun_repeats_nothing(data: Path, api_key: str) -> None:
    cache = data / "label_cache.sqlite"
    contexts = [r["context"] for r in rows(data)]
    keys = {cache_key("openai", FAKE_MODEL, PROMPT_VERSION, c): c for c in contexts}
    with FakeTeacherServer(FaultPlan(latency=0.05, p_429=0.1, seed=5)) as server:
        cmd = [sys.executable, "-m", "nla.cli", "label", "--data", str(data), "--teacher",
               f"openai:{FAKE_MODEL}", "--base-url", f"{server.url}/v1", "--concurrency", "4",
               "--backoff", "0.02", "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        committed = 0
        while time.time() < deadline and proc.poll() is None:
            if cache.exists():
                try:
                    with sqlite3.connect(cache) as db:
                        committed = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
                except sqlite3.OperationalError:
                    committed = 0
            if committed >= 40:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        with sqlite3.connect(cache) as db:
            done = {keys[k] for (k,) in db.execute("SELECT key FROM answers WHERE status = 'ok'")}
        assert 40 <= len(done) < len(set(contexts))
        server.stats.reset()
        summary = label(cfg(data, server.url, concurrency=4))
        stats = server.stats
    assert not any(stats.requests[c] for c in done), "a row answered before the kill was asked again"
    assert summary.cached >= len(done)
    table = rows(data)
    assert all(r["explanation"] == format_explanation(fake_features(r["context"])) for r in table)
    # The labels table holds every row exactly once: none lost to the kill, none written twice.
    parts = pa.concat_tables(pq.read_table(p) for p in sorted(fake_table(data).glob("*.parquet")))
    keys = list(zip(parts.column("doc_id").to_pylist(), parts.column("position").to_pylist()))
    assert len(keys) == len(set(keys)) == len(table)
    assert set(keys) == {(r["doc_id"], r["position"]) for r in table}


def test_keys_inside_the_base_url_never_reach_disk_or_console(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Some gateways take the key in the URL (user-info or ``?api-key=``): the URL is redacted
    before label_config.yaml, the sidecar or any message holds it (docs/guarantees.md)."""
    user_key, query_key = "USERINFO-KEY-7730", "QUERY-KEY-5521"
    with FakeTeacherServer() as server:
        host = server.url.removeprefix("http://")
        assert main(["label", "--data", str(data), "--teacher", f"openai:{FAKE_MODEL}", "--no-progress",
                     "--base-url", f"http://gw:{user_key}@{host}/v1", "--limit", "4"]) == 0
        assert main(["label", "--data", str(data), "--teacher", f"openai:{FAKE_MODEL}", "--no-progress",
                     "--base-url", f"{server.url}/v1?api-key={query_key}", "--limit", "4"]) == 0
    out = capsys.readouterr()
    saved = read_yaml(fake_table(data) / "label_config.yaml")["base_url"]
    assert saved.endswith("/v1?api-key=REDACTED") and query_key not in saved
    for f in [p for p in data.rglob("*") if p.is_file()]:
        blob = f.read_bytes()
        assert user_key.encode() not in blob and query_key.encode() not in blob, f"a key leaked into {f}"
    assert user_key not in out.out + out.err and query_key not in out.out + out.err
