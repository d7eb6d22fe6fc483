"""Dataset versions, the conversations in each, and the conversations pinned to the eval split."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from daemon.state.core import utcnow
from daemon.state.db import Database
from daemon.state.rows import DatasetRow

_COLS = "version, created_at, path, fingerprint, content_hash, train_count, eval_count"


def _row(r: Sequence[Any]) -> DatasetRow:
    return DatasetRow(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), int(r[6]), json.loads(r[7]))


class Datasets:
    """The ``datasets``, ``dataset_members``, ``preference_members`` and ``eval_pins`` tables."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def versions(self) -> set[int]:
        return {int(r[0]) for r in self._db.conn.execute("SELECT version FROM datasets")}

    def latest_version(self) -> int | None:
        row = self._db.conn.execute("SELECT MAX(version) FROM datasets").fetchone()
        return int(row[0]) if row[0] is not None else None

    def get(self, version: int, *, manifest: bool = True) -> DatasetRow | None:
        """Dataset ``version``; without its manifest (``{}``) when ``manifest`` is False (a 34k-example manifest
        takes a while to decode)."""
        r = self._db.conn.execute(
            f"SELECT {_COLS}," + (" manifest" if manifest else " '{}'") + " FROM datasets WHERE version = ?",
            (version,),
        ).fetchone()
        return _row(r) if r else None

    def all(self, *, manifest: bool = True) -> list[DatasetRow]:
        """Every version, oldest first; without manifests (``{}``) when ``manifest`` is False."""
        rows = self._db.conn.execute(
            f"SELECT {_COLS}," + (" manifest" if manifest else " '{}'") + " FROM datasets ORDER BY version"
        ).fetchall()
        return [_row(r) for r in rows]

    def add(self, row: DatasetRow, splits: Mapping[str, Sequence[str]], manifest_text: str | None = None,
            since: Mapping[str, int] | None = None) -> None:
        """Record a dataset version and its members (``splits``: split name -> conversation ids); ``manifest_text``:
        ``row.manifest`` as JSON, when the caller has it already (a 34k-example manifest is slow to encode);
        ``since``: the version where each member first appeared (default: this one)."""
        first = since or {}
        with self._db.transaction():
            self._db.conn.execute(
                f"INSERT INTO datasets ({_COLS}, manifest) VALUES (?,?,?,?,?,?,?,?)",
                (row.version, row.created_at, row.path, row.fingerprint, row.content_hash, row.train_count,
                 row.eval_count, manifest_text if manifest_text is not None else json.dumps(row.manifest)),
            )
            for split, cids in splits.items():
                self._db.conn.executemany(
                    "INSERT INTO dataset_members (version, cid, split, since) VALUES (?,?,?,?)",
                    ((row.version, cid, split, first.get(cid, row.version)) for cid in cids),
                )

    def add_preference_members(self, version: int, rows: Iterable[tuple[str, str, str, int]]) -> None:
        """Record the preference examples of dataset ``version``: ``(split, cid, variant, since)`` with split one of
        prefs_train, prefs_eval, pairs_train, pairs_eval (call it inside the transaction that adds the version)."""
        self._db.conn.executemany(
            "INSERT INTO preference_members (version, split, cid, variant, since) VALUES (?,?,?,?,?)",
            ((version, *r) for r in rows),
        )

    def preference_members(self, version: int, kind: str) -> dict[str, tuple[str, int]]:
        """The preference examples of ``kind`` ("prefs" or "pairs", train and eval) in ``version``: conversation id
        -> (variant, the version where it first appeared)."""
        sql = "SELECT cid, variant, since FROM preference_members WHERE version = ? AND split IN (?, ?)"
        return {r[0]: (r[1], int(r[2])) for r in self._db.conn.execute(sql, (version, f"{kind}_train",
                                                                              f"{kind}_eval"))}

    def member_ids(self, version: int) -> set[str]:
        sql = "SELECT cid FROM dataset_members WHERE version = ?"
        return {r[0] for r in self._db.conn.execute(sql, (version,))}

    def since(self, version: int) -> dict[str, int]:
        """Member id -> the dataset version where it first appeared, for version ``version``."""
        sql = "SELECT cid, COALESCE(since, version) FROM dataset_members WHERE version = ?"
        return {r[0]: int(r[1]) for r in self._db.conn.execute(sql, (version,))}

    def containing(self, cid: str) -> list[int]:
        """The versions that hold conversation ``cid``, in any file (a scan: members have no cid index, see
        migration 6)."""
        sql = ("SELECT version FROM dataset_members WHERE cid = ?"
               " UNION SELECT version FROM preference_members WHERE cid = ? ORDER BY version")
        return [int(r[0]) for r in self._db.conn.execute(sql, (cid, cid))]

    def eval_pins(self) -> set[str]:
        return {r[0] for r in self._db.conn.execute("SELECT cid FROM eval_pins")}

    def add_eval_pins(self, cids: Iterable[str]) -> None:
        now = utcnow()
        self._db.conn.executemany(
            "INSERT OR IGNORE INTO eval_pins (cid, pinned_at) VALUES (?,?)", ((c, now) for c in cids)
        )
