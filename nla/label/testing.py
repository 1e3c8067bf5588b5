"""A local fake teacher server for tests, benchmarks and trying a setup without spending money.

It speaks both the OpenAI chat-completions protocol (``POST /v1/chat/completions``) and the
Anthropic Messages protocol (``POST /v1/messages``) on 127.0.0.1, answers every passage with a
well-formed, passage-specific ``<analysis>`` block, and can misbehave on purpose: answer 429
(sometimes with ``Retry-After``) or 500, hang past the client's timeout, or return malformed
text, each with a given probability. It counts requests per passage so a test can prove that
nothing was asked twice.

    with FakeTeacherServer(FaultPlan(p_429=0.2)) as server:
        ... --teacher openai:fake-teacher --base-url {server.url}/v1 ...
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAKE_MODEL = "fake-teacher"


@dataclass
class FaultPlan:
    """How the fake server misbehaves; probabilities are per request."""

    p_429: float = 0.0
    p_500: float = 0.0
    p_hang: float = 0.0
    p_malformed: float = 0.0
    retry_after: float | None = 0.05  # sent with every other 429; None: never
    hang_s: float = 5.0
    latency: float = 0.0  # fixed delay before every answer
    api_key: str | None = None  # if set, requests without it get 401
    fail_after: int | None = None  # after this many requests, every request gets 401 (key revoked)
    models: tuple[str, ...] = (FAKE_MODEL,)
    seed: int = 0


def passage_of(prompt: str) -> str:
    """The passage inside the user message built by :mod:`nla.label.prompt`."""
    start, end = prompt.find("<passage>\n"), prompt.rfind("\n</passage>")
    return prompt[start + len("<passage>\n"):end] if start >= 0 and end >= 0 else prompt


def fake_features(passage: str) -> list[str]:
    """The features the server answers for a passage: deterministic and passage-specific."""
    digest = hashlib.sha256(passage.encode()).hexdigest()[:10]
    last = (passage.split() or ["nothing"])[-1].replace('"', "'")[:20]
    return [
        f"The passage carries the test fingerprint {digest} and comes from the built-in corpus.",
        f'The text ends with the word "{last}", which the model uses to guess the next token.',
    ]


@dataclass
class ServerStats:
    requests: Counter[str] = field(default_factory=Counter)  # passage → requests received
    answered: Counter[str] = field(default_factory=Counter)  # passage → well-formed answers sent
    statuses: Counter[int] = field(default_factory=Counter)
    malformed: int = 0
    hangs: int = 0
    late: int = 0  # answers sent after a hang, when the client had already given up

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def reset(self) -> None:
        self.requests.clear()
        self.answered.clear()
        self.statuses.clear()
        self.malformed = self.hangs = self.late = 0


def _outcome(roll: float, plan: FaultPlan) -> str:
    edge = 0.0
    for name, p in (("429", plan.p_429), ("500", plan.p_500), ("hang", plan.p_hang),
                    ("malformed", plan.p_malformed)):
        edge += p
        if roll < edge:
            return name
    return "ok"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses its connections
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout) before we answered

    def do_POST(self) -> None:
        srv = self.server
        plan = srv.plan
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._send(400, {"error": {"message": "body is not JSON"}})
            return
        anthropic = self.path.rstrip("/").endswith("/messages")
        if not anthropic and not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        with srv.lock:
            srv.seen += 1
            revoked = plan.fail_after is not None and srv.seen > plan.fail_after
        if revoked:
            self._send(401, {"error": {"message": "key revoked"}})
            return
        if plan.api_key is not None:
            given = self.headers.get("x-api-key") if anthropic else (
                self.headers.get("Authorization", "").removeprefix("Bearer "))
            if given != plan.api_key:
                self._send(401, {"error": {"message": f"Incorrect API key provided: {given}"}})
                return
        if body.get("model") not in plan.models:
            self._send(404, {"error": {"message": f"The model {body.get('model')!r} does not exist"}})
            return
        messages = body.get("messages") or [{}]
        prompt = messages[-1].get("content", "")
        passage = passage_of(prompt if isinstance(prompt, str) else json.dumps(prompt))
        with srv.lock:
            srv.stats.requests[passage] += 1
            roll = srv.rng.random()
            n429 = sum(srv.stats.statuses[s] for s in (429,))
        if plan.latency:
            time.sleep(plan.latency)
        name = _outcome(roll, plan)
        if name == "429":
            with srv.lock:
                srv.stats.statuses[429] += 1
            headers = {"Retry-After": f"{plan.retry_after:g}"} if plan.retry_after is not None and n429 % 2 else {}
            self._send(429, {"error": {"message": "rate limited"}}, headers)
            return
        if name == "500":
            with srv.lock:
                srv.stats.statuses[500] += 1
            self._send(500, {"error": {"message": "internal error"}})
            return
        if name == "hang":
            with srv.lock:
                srv.stats.hangs += 1
            time.sleep(plan.hang_s)
            with srv.lock:
                srv.stats.late += 1
        features = fake_features(passage)
        if name == "malformed":
            with srv.lock:
                srv.stats.malformed += 1
            text = srv.rng.choice([
                "I think the next token is probably a noun.",
                "<analysis>\n- only one feature here, which is not enough\n</analysis>",
                "<analysis>\n- " + features[0] + "\n- " + features[1],  # never closed
            ])
        else:
            text = "<analysis>\n" + "\n".join(f"- {f}" for f in features) + "\n</analysis>"
            if name == "ok":
                with srv.lock:
                    srv.stats.answered[passage] += 1
        with srv.lock:
            srv.stats.statuses[200] += 1
        n_in, n_out = len(prompt.split()), len(text.split())
        if anthropic:
            self._send(200, {"id": "msg_fake", "type": "message", "role": "assistant",
                             "content": [{"type": "text", "text": text}], "model": body["model"],
                             "stop_reason": "end_turn",
                             "usage": {"input_tokens": n_in, "output_tokens": n_out}})
        else:
            self._send(200, {"id": "chatcmpl-fake", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": n_in, "completion_tokens": n_out,
                                       "total_tokens": n_in + n_out}})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, plan: FaultPlan):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.plan = plan
        self.stats = ServerStats()
        self.lock = threading.Lock()
        self.seen = 0
        self.rng = random.Random(plan.seed)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-answer is part of the test, not an error


class FakeTeacherServer:
    """Run the fake server in a background thread (a context manager)."""

    def __init__(self, plan: FaultPlan | None = None):
        self._server = _Server(plan or FaultPlan())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def stats(self) -> ServerStats:
        return self._server.stats

    @property
    def plan(self) -> FaultPlan:
        return self._server.plan

    def __enter__(self) -> FakeTeacherServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    """``python -m nla.label.testing [LATENCY]``: serve until interrupted, print the URL."""
    import sys

    plan = FaultPlan(latency=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
    with FakeTeacherServer(plan) as server:
        print(f"fake teacher at {server.url}/v1 (model {FAKE_MODEL})", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
