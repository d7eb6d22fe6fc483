"""Model versions: exported GGUFs and their registration with Ollama. Each update names the columns it sets."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from daemon.state.db import Database
from daemon.state.rows import ModelRow

_COLS = (
    "version, job_id, dataset_version, gguf_path, gguf_sha256, gguf_size, chat_template, status, tag, created_at,"
    " manifest_hash, architecture, eval, ollama_digest, attempts, next_attempt_at, last_error, registered_at"
)


def _row(r: Sequence[Any]) -> ModelRow:
    return ModelRow(
        version=int(r[0]), job_id=r[1], dataset_version=int(r[2]), gguf_path=r[3], gguf_sha256=r[4],
        gguf_size=int(r[5]), chat_template=r[6], status=r[7], tag=r[8], created_at=r[9], manifest_hash=r[10],
        architecture=r[11], eval=json.loads(r[12]) if r[12] else None, ollama_digest=r[13], attempts=int(r[14]),
        next_attempt_at=r[15], last_error=r[16], registered_at=r[17],
    )


class Models:
    """The ``models`` table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def next_version(self) -> int:
        row = self._db.conn.execute("SELECT MAX(version) FROM models").fetchone()
        return int(row[0] or 0) + 1

    def add(self, m: ModelRow) -> None:
        self._db.conn.execute(
            f"INSERT INTO models ({_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (m.version, m.job_id, m.dataset_version, m.gguf_path, m.gguf_sha256, m.gguf_size, m.chat_template,
             m.status, m.tag, m.created_at, m.manifest_hash, m.architecture,
             json.dumps(m.eval, default=str) if m.eval is not None else None, m.ollama_digest, m.attempts,
             m.next_attempt_at, m.last_error, m.registered_at),
        )

    def get(self, version: int) -> ModelRow | None:
        r = self._db.conn.execute(f"SELECT {_COLS} FROM models WHERE version = ?", (version,)).fetchone()
        return _row(r) if r else None

    def all(self, *, status: str | None = None) -> list[ModelRow]:
        """Every version (with ``status``, when given), oldest first."""
        where, args = (" WHERE status = ?", (status,)) if status else ("", ())
        rows = self._db.conn.execute(f"SELECT {_COLS} FROM models{where} ORDER BY version", args).fetchall()
        return [_row(r) for r in rows]

    def registered(self, version: int, *, registered_at: str, ollama_digest: str | None, attempts: int) -> None:
        """Ollama serves ``version`` and it checked out: no error, nothing left to retry."""
        self._db.conn.execute(
            "UPDATE models SET status = 'registered', registered_at = ?, ollama_digest = ?, attempts = ?,"
            " last_error = NULL, next_attempt_at = NULL WHERE version = ?",
            (registered_at, ollama_digest, attempts, version),
        )

    def attempt_failed(self, version: int, *, status: str, attempts: int, last_error: str,
                       next_attempt_at: str | None) -> None:
        """A registration failed: ``pending`` with the time of the next try, or ``failed`` for good."""
        self._db.conn.execute(
            "UPDATE models SET status = ?, attempts = ?, last_error = ?, next_attempt_at = ? WHERE version = ?",
            (status, attempts, last_error, next_attempt_at, version),
        )

    def deleted(self, version: int) -> None:
        """Retention took ``version`` out of Ollama."""
        self._db.conn.execute("UPDATE models SET status = 'deleted' WHERE version = ?", (version,))
