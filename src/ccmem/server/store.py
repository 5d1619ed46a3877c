"""Durable sessions: one checked memory file per session version, metadata in SQLite (WAL).

A turn is saved by writing the new memory to a fresh file (fsync'd), then committing the SQLite row that points at it,
then deleting the previous file. A crash at any point leaves the row pointing at a complete, checksummed file: the
last committed turn (an answer is sent only after its commit). Files no row points at are removed at start-up.
Session ids are client text, so files are named by a digest of (owner, id), never by the id itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    owner TEXT NOT NULL, id TEXT NOT NULL, file TEXT, chain TEXT NOT NULL, turns INTEGER NOT NULL,
    slots INTEGER NOT NULL, bytes INTEGER NOT NULL, tokens INTEGER NOT NULL, created REAL NOT NULL,
    updated REAL NOT NULL, PRIMARY KEY (owner, id))
"""


@dataclass
class SessionMeta:
    owner: str
    id: str
    chain: list[str] = field(default_factory=list)  # digests of the compressed messages (transcript.chain)
    turns: int = 0  # compressed messages
    slots: int = 0
    bytes: int = 0
    tokens: int = 0  # text tokens compressed
    file: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "object": "session", "turns": self.turns, "slots": self.slots, "bytes": self.bytes,
                "tokens_compressed": self.tokens, "created": int(self.created), "updated": int(self.updated)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SessionStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.files = self.root / "memory"
        self.files.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "sessions.db", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(SCHEMA)
        self.lock = threading.Lock()
        self._sweep()

    def _sweep(self) -> None:
        """Remove memory files that no row points at (a crash between writing a file and committing its row)."""
        live = {r[0] for r in self.db.execute("SELECT file FROM sessions WHERE file IS NOT NULL")}
        for f in self.files.iterdir():
            if f.name not in live:
                f.unlink(missing_ok=True)

    def get(self, owner: str, sid: str) -> SessionMeta | None:
        with self.lock:
            row = self.db.execute("SELECT owner, id, file, chain, turns, slots, bytes, tokens, created, updated "
                                  "FROM sessions WHERE owner = ? AND id = ?", (owner, sid)).fetchone()
        if row is None:
            return None
        return SessionMeta(row[0], row[1], json.loads(row[3]), row[4], row[5], row[6], row[7], row[2], row[8], row[9])

    def path(self, meta: SessionMeta) -> Path | None:
        return self.files / meta.file if meta.file else None

    def save(self, meta: SessionMeta, session: Any) -> None:
        """Write the session's memory to a new file, commit the row that points at it, drop the old file."""
        key = hashlib.sha256(f"{meta.owner}\0{meta.id}".encode()).hexdigest()[:24]
        name = f"{key}-{time.time_ns()}.safetensors"
        tmp = self.files / (name + ".tmp")
        session.save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.files / name)
        _fsync_dir(self.files)
        old = meta.file
        meta.file, meta.updated = name, time.time()
        with self.lock:
            self.db.execute(
                "INSERT INTO sessions (owner, id, file, chain, turns, slots, bytes, tokens, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(owner, id) DO UPDATE SET file = excluded.file, "
                "chain = excluded.chain, turns = excluded.turns, slots = excluded.slots, bytes = excluded.bytes, "
                "tokens = excluded.tokens, updated = excluded.updated",
                (meta.owner, meta.id, name, json.dumps(meta.chain), meta.turns, meta.slots, meta.bytes, meta.tokens,
                 meta.created, meta.updated))
        if old and old != name:
            (self.files / old).unlink(missing_ok=True)

    def delete(self, owner: str, sid: str) -> bool:
        meta = self.get(owner, sid)
        if meta is None:
            return False
        with self.lock:
            self.db.execute("DELETE FROM sessions WHERE owner = ? AND id = ?", (owner, sid))
        if meta.file:
            (self.files / meta.file).unlink(missing_ok=True)
        return True

    def count(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])

    def close(self) -> None:
        self.db.close()
