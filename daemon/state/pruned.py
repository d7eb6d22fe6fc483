"""What disk retention removed (migration 8): one row per job, dataset version or model GGUF whose files went."""

from __future__ import annotations

from typing import Literal

from daemon.state.db import Database

PrunedKind = Literal["job", "dataset", "gguf"]


class Pruned:
    """The ``pruned`` table: the rows of jobs, datasets and models stay; this says their bulky files are gone."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def mark(self, kind: PrunedKind, key: str, *, at: str, freed: int) -> None:
        self._db.conn.execute("INSERT OR REPLACE INTO pruned (kind, key, pruned_at, freed) VALUES (?,?,?,?)",
                              (kind, key, at, freed))

    def keys(self, kind: PrunedKind) -> set[str]:
        return {r[0] for r in self._db.conn.execute("SELECT key FROM pruned WHERE kind = ?", (kind,))}

    def freed(self) -> int:
        """Bytes freed by retention so far."""
        return int(self._db.conn.execute("SELECT COALESCE(SUM(freed), 0) FROM pruned").fetchone()[0])
