"""The persistent label cache: every answer paid for is on disk before anything else happens.

SQLite in WAL mode, one commit per answer: a ``kill -9`` loses at most the requests still in
flight, and a re-run asks the teacher nothing it has already answered. The key is
``sha256(provider, model, prompt version, context)``; only hashes and answers are stored, never
request headers, so no API key can end up here.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from nla.errors import NLAError

OK = "ok"
MALFORMED = "malformed"


def cache_key(provider: str, model: str, prompt_version: str, context: str) -> str:
    h = hashlib.sha256()
    for part in (provider, model, prompt_version, context):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")  # separator: ("ab","c") and ("a","bc") must not collide
    return h.hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    status: str  # OK or MALFORMED
    explanation: str | None
    raw: str | None


class LabelCache:
    """``key → answer`` on disk; safe to share between runs (and between processes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed answer survives the process dying; only a power
            # cut could lose the last few, which is fine for a cache.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, provider TEXT, model TEXT,"
                " prompt_version TEXT, status TEXT, explanation TEXT, raw TEXT, created REAL)"
            )
            self.db.commit()
        except sqlite3.DatabaseError as exc:
            raise NLAError(f"{self.path}: cannot open label cache ({exc})") from None

    def get(self, key: str) -> CachedAnswer | None:
        row = self.db.execute("SELECT status, explanation, raw FROM answers WHERE key = ?", (key,)).fetchone()
        return CachedAnswer(*row) if row else None

    def get_many(self, keys: list[str]) -> dict[str, CachedAnswer]:
        out: dict[str, CachedAnswer] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for key, *rest in self.db.execute(
                f"SELECT key, status, explanation, raw FROM answers WHERE key IN ({marks})", chunk
            ):
                out[key] = CachedAnswer(*rest)
        return out

    def put(self, key: str, *, provider: str, model: str, prompt_version: str, status: str,
            explanation: str | None, raw: str | None) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, provider, model, prompt_version, status, explanation, raw, time.time()),
        )
        self.db.commit()

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self.db.close()
