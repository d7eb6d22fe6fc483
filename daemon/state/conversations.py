"""Conversations read from the store, the files each was seen in (sightings), and the lines that were rejected."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from daemon.state.core import json_ids, utcnow
from daemon.state.db import Database
from daemon.state.feedback import Feedback

_UPSERT = (
    "INSERT INTO conversations (cid, rank, messages, mode, model, quality, thumbs_up, inline_score,"
    " inline_rated, usable, started_at, src_path, src_offset, src_len, first_seen, updated_at)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT(cid) DO UPDATE SET rank=excluded.rank, messages=excluded.messages, mode=excluded.mode,"
    " model=excluded.model, quality=excluded.quality, thumbs_up=excluded.thumbs_up,"
    " inline_score=excluded.inline_score, inline_rated=excluded.inline_rated, usable=excluded.usable,"
    " started_at=excluded.started_at, src_path=excluded.src_path, src_offset=excluded.src_offset,"
    " src_len=excluded.src_len, updated_at=excluded.updated_at,"
    " rev=conversations.rev + (conversations.messages IS NOT excluded.messages)"
    " WHERE excluded.rank >= conversations.rank"
)


class Conversations:
    """The ``conversations``, ``sightings`` and ``paths`` tables (forgetting a file also drops its feedback)."""

    def __init__(self, db: Database, feedback: Feedback) -> None:
        self._db = db
        self._feedback = feedback

    def upsert(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert or update conversations given as ``(cid, rank, messages, mode, model, quality, thumbs_up,
        inline_score, inline_rated, usable, started_at, path, offset, length)`` (tuples: bulk ingest makes 100k rows,
        and a tuple costs a fraction of a dataclass). Content from a higher-ranked source (logs/) wins; deleted
        stays deleted; a content change bumps ``rev``, which invalidates the conversation's cached example."""
        now = utcnow()
        self._db.conn.executemany(_UPSERT, [(*r, now, now) for r in rows])
        self.add_sightings([(r[11], r[0], r[1]) for r in rows])

    def add_sightings(self, rows: Sequence[tuple[str, str, int]]) -> None:
        """Record that ``(path, cid, rank)`` holds a copy of the conversation (without touching its content)."""
        ids = {path: self._path_id(path) for path in {r[0] for r in rows}}
        self._db.conn.executemany(
            "INSERT OR REPLACE INTO sightings (file, cid, rank) VALUES (?,?,?)", [(ids[p], c, r) for p, c, r in rows]
        )

    def _path_id(self, path: str) -> int:
        """The id that stands for ``path`` in sightings (created on first use; never cached across transactions,
        since a rolled-back one would leave a stale id behind)."""
        self._db.conn.execute("INSERT OR IGNORE INTO paths (path) VALUES (?)", (path,))
        return int(self._db.conn.execute("SELECT id FROM paths WHERE path = ?", (path,)).fetchone()[0])

    def outranked(self, cids: Iterable[str], rank: int) -> set[str]:
        """Those of ``cids`` whose content comes from a source ranked above ``rank``: an upsert at ``rank`` would not
        change them (see :meth:`upsert`)."""
        ids = json_ids(cids)
        if ids is None:
            return set()
        sql = "SELECT cid FROM conversations WHERE rank > ? AND cid IN (SELECT value FROM json_each(?))"
        return {r[0] for r in self._db.conn.execute(sql, (rank, ids))}

    def sighted_in(self, path: str) -> set[str]:
        sql = "SELECT cid FROM sightings WHERE file = (SELECT id FROM paths WHERE path = ?)"
        return {r[0] for r in self._db.conn.execute(sql, (path,))}

    def forget_path(self, path: str) -> None:
        """Drop everything read from ``path`` (before it is read again from byte 0)."""
        self._db.conn.execute("DELETE FROM sightings WHERE file = (SELECT id FROM paths WHERE path = ?)", (path,))
        self._feedback.forget_path(path)

    def reconcile_vanished(self, vanished: Iterable[str]) -> int:
        """Conversations no longer in any logs/ file (or in no file at all) are marked deleted. Returns how many."""
        ids = json_ids(vanished)
        if ids is None:
            return 0
        # One statement for the whole set: a per-id loop costs three queries per conversation of a re-read file.
        # sightings has no cid index (migration 5): each NOT IN list is built by one scan of it.
        cur = self._db.conn.execute(
            "UPDATE conversations SET deleted = 1, deleted_at = ?1"
            " WHERE deleted = 0 AND cid IN (SELECT value FROM json_each(?2))"
            " AND cid NOT IN (SELECT cid FROM sightings WHERE rank = 2 AND cid IN (SELECT value FROM json_each(?2)))"
            " AND (rank = 2 OR cid NOT IN (SELECT cid FROM sightings WHERE cid IN (SELECT value FROM json_each(?2))))",
            (utcnow(), ids),
        )
        return cur.rowcount

    def unlogged(self) -> list[tuple[str, str]]:
        """(cid, path) of live conversations never seen in a logs/ file, with the training_data/ files that hold
        them: the candidates for "deleted in ChatOS before this service read its day's log"."""
        sql = ("SELECT c.cid, p.path FROM conversations c JOIN sightings s ON s.cid = c.cid"
               " JOIN paths p ON p.id = s.file WHERE c.deleted = 0 AND c.rank < 2")
        return [(r[0], r[1]) for r in self._db.conn.execute(sql)]

    def mark_deleted(self, cid: str) -> bool:
        cur = self._db.conn.execute(
            "UPDATE conversations SET deleted = 1, deleted_at = ? WHERE cid = ? AND deleted = 0", (utcnow(), cid)
        )
        return cur.rowcount > 0

    def get(self, cid: str) -> dict[str, Any] | None:
        """Every column of conversation ``cid`` with its effective label (``label_score``, ``label_ts``), as the
        CLI shows it."""
        cur = self._db.conn.execute(
            "SELECT c.*, l.score AS label_score, l.ts AS label_ts FROM conversations c"
            " LEFT JOIN labels l ON l.cid = c.cid WHERE c.cid = ?",
            (cid,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    def counts(self) -> dict[str, int]:
        """What ingest holds: files, conversations (deleted, unusable), rejected lines, feedback (and how much of it
        waits for its conversation)."""
        one = self._db.conn.execute
        return {
            "files": one("SELECT COUNT(*) FROM files").fetchone()[0],
            "conversations": one("SELECT COUNT(*) FROM conversations").fetchone()[0],
            "deleted": one("SELECT COUNT(*) FROM conversations WHERE deleted = 1").fetchone()[0],
            "unusable": one("SELECT COUNT(*) FROM conversations WHERE usable = 0 AND deleted = 0").fetchone()[0],
            "rejected_lines": one("SELECT COUNT(*) FROM rejects").fetchone()[0],
            "feedback_events": one("SELECT COUNT(*) FROM feedback").fetchone()[0],
            "feedback_waiting": one(
                "SELECT COUNT(*) FROM labels l WHERE NOT EXISTS (SELECT 1 FROM conversations c WHERE c.cid = l.cid)"
            ).fetchone()[0],
        }


class Rejects:
    """The ``rejects`` table: lines of store files that did not parse, with why and a hash to notice a rewrite."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def for_path(self, path: str) -> dict[int, str]:
        """Rejected line number -> that line's hash."""
        sql = "SELECT line, line_hash FROM rejects WHERE path = ?"
        return {r[0]: r[1] for r in self._db.conn.execute(sql, (path,))}

    def replace(self, path: str, rows: Sequence[tuple[int, str, str]], *, from_line: int = 0) -> None:
        """Record rejected lines ``(line, reason, line_hash)`` of ``path`` at or after ``from_line``."""
        self._db.conn.execute("DELETE FROM rejects WHERE path = ? AND line >= ?", (path, from_line))
        self._db.conn.executemany(
            "INSERT OR REPLACE INTO rejects (path, line, reason, line_hash) VALUES (?,?,?,?)",
            [(path, line, reason, h) for line, reason, h in rows],
        )

    def drop(self, path: str) -> None:
        self._db.conn.execute("DELETE FROM rejects WHERE path = ?", (path,))
