"""What a dataset build reads: the eligible conversations (the dataset filter in SQL) and the processed-example
cache."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from daemon.state.db import Database
from daemon.state.rows import Eligible

_ELIGIBLE = (
    " FROM conversations c LEFT JOIN labels l ON l.cid = c.cid"
    " WHERE c.deleted = 0 AND c.usable = 1 AND c.mode IN ({modes})"
    " AND COALESCE(l.score, c.inline_score) >= ? AND (l.cid IS NOT NULL OR c.inline_rated = 1 OR ?)"
)

CachedExample = tuple[str, int, bytes, str | None, bytes | None, float]


def _eligible_sql(select: str, modes: Sequence[str]) -> str:
    return select + _ELIGIBLE.format(modes=",".join("?" * len(modes)))


class Examples:
    """Eligible conversations (``conversations`` with ``labels``) and the ``examples`` cache."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def eligible(self, modes: Sequence[str], min_score: int, include_unrated: bool) -> Iterator[Eligible]:
        sql = _eligible_sql(
            "SELECT c.cid, c.messages, c.mode, c.model, COALESCE(l.score, c.inline_score),"
            " (l.cid IS NOT NULL OR c.inline_rated = 1), c.src_path, c.src_offset, c.src_len",
            modes,
        ) + " ORDER BY +c.cid"  # '+': scan the table and sort; walking the id index costs a random read per row
        for r in self._db.conn.execute(sql, (*modes, min_score, include_unrated)):
            yield Eligible(r[0], r[1], r[2], r[3], int(r[4]), bool(r[5]), r[6], r[7], r[8])

    def eligible_rows(self, modes: Sequence[str], min_score: int, include_unrated: bool) -> Iterator[tuple[Any, ...]]:
        """The rows of :meth:`eligible` (same filter), in no particular order, as
        ``(cid, rev, mode, model, score, src_path, src_offset, src_len, messages)`` with ``messages`` as UTF-8 bytes.
        Unordered and streamed: sorting 50 MB of rows in SQLite costs more than sorting their ids in Python."""
        sql = _eligible_sql(
            "SELECT c.cid, c.rev, c.mode, c.model, COALESCE(l.score, c.inline_score), c.src_path, c.src_offset,"
            " c.src_len, CAST(c.messages AS BLOB)",
            modes,
        )
        yield from self._db.conn.execute(sql, (*modes, min_score, include_unrated))

    def preference_only_rows(self, modes: Sequence[str], min_score: int) -> Iterator[tuple[Any, ...]]:
        """Rows as :meth:`eligible_rows` gives them, of the rated conversations that preference data wants (score
        other than 0) and the dataset filter does not select (score below ``min_score``): the down-voted ones,
        unless min_score takes them too. (A score other than 0 is a rating, so no other eligibility term differs.)"""
        sql = ("SELECT c.cid, c.rev, c.mode, c.model, COALESCE(l.score, c.inline_score), c.src_path, c.src_offset,"
               " c.src_len, CAST(c.messages AS BLOB) FROM conversations c LEFT JOIN labels l ON l.cid = c.cid"
               f" WHERE c.deleted = 0 AND c.usable = 1 AND c.mode IN ({','.join('?' * len(modes))})"
               " AND COALESCE(l.score, c.inline_score) != 0 AND COALESCE(l.score, c.inline_score) < ?")
        yield from self._db.conn.execute(sql, (*modes, min_score))

    def no_longer_eligible(self, job_ids: Sequence[str], modes: Sequence[str], min_score: int,
                           include_unrated: bool) -> list[str]:
        """Conversations that any of ``job_ids`` trained on and that the user has since taken back: deleted from the
        store or forgotten, a good answer the dataset filter would no longer select (vote retracted, filter
        narrowed), or a thumbs-down whose vote was retracted or reversed. Sorted."""
        marks, mode_marks = ",".join("?" * len(job_ids)), ",".join("?" * len(modes))
        score = "COALESCE(l.score, c.inline_score)"
        sql = (
            "SELECT DISTINCT j.cid FROM job_examples j LEFT JOIN conversations c ON c.cid = j.cid"
            " LEFT JOIN labels l ON l.cid = j.cid"
            f" WHERE j.job_id IN ({marks}) AND (c.cid IS NULL OR c.deleted = 1 OR c.usable = 0"
            f" OR c.mode NOT IN ({mode_marks})"
            f" OR (j.score > 0 AND NOT ({score} >= ? AND (l.cid IS NOT NULL OR c.inline_rated = 1 OR ?)))"
            f" OR (j.score < 0 AND {score} >= 0)) ORDER BY j.cid"
        )
        return [r[0] for r in self._db.conn.execute(sql, (*job_ids, *modes, min_score, include_unrated))]

    def new_thumbs_down(self, modes: Sequence[str], since_version: int) -> int:
        """Rated conversations with a negative score (thumbs-down, poor/failed) that dataset ``since_version`` does
        not hold (in any split): new feedback for the preference objectives."""
        sql = (
            "SELECT COUNT(*) FROM conversations c LEFT JOIN labels l ON l.cid = c.cid"
            f" WHERE c.deleted = 0 AND c.usable = 1 AND c.mode IN ({','.join('?' * len(modes))})"
            " AND COALESCE(l.score, c.inline_score) < 0 AND (l.cid IS NOT NULL OR c.inline_rated = 1)"
            " AND NOT EXISTS (SELECT 1 FROM dataset_members m WHERE m.version = ? AND m.cid = c.cid)"
            " AND NOT EXISTS (SELECT 1 FROM preference_members p WHERE p.version = ? AND p.cid = c.cid)"
        )
        return int(self._db.conn.execute(sql, (*modes, since_version, since_version)).fetchone()[0] or 0)

    def eligible_counts(
        self, modes: Sequence[str], min_score: int, include_unrated: bool, since_version: int | None = None
    ) -> dict[str, int]:
        """Eligible total, positives among them, and how many are not in dataset ``since_version`` (default: the
        latest version)."""
        if since_version is None:
            since_version = self._db.conn.execute("SELECT COALESCE(MAX(version), 0) FROM datasets").fetchone()[0]
        sql = _eligible_sql(
            "SELECT COUNT(*), SUM(COALESCE(l.score, c.inline_score) > 0),"
            " SUM(NOT EXISTS (SELECT 1 FROM dataset_members m WHERE m.version = ? AND m.cid = c.cid))",
            modes,
        )
        row = self._db.conn.execute(sql, (since_version, *modes, min_score, include_unrated)).fetchone()
        return {"eligible": row[0] or 0, "positive": row[1] or 0, "new_since_dataset": row[2] or 0}

    def eligible_per_day(self, modes: Sequence[str], min_score: int, include_unrated: bool) -> list[tuple[str, int]]:
        """Eligible conversations (the same filter) by the day they started (else were first seen), oldest first."""
        sql = _eligible_sql("SELECT substr(COALESCE(c.started_at, c.first_seen), 1, 10) AS day, COUNT(*)", modes)
        rows = self._db.conn.execute(sql + " GROUP BY day ORDER BY day", (*modes, min_score, include_unrated))
        return [(r[0], int(r[1])) for r in rows]

    def cached(self, cfg: str) -> dict[str, CachedExample]:
        """Cached examples made under ``cfg``: cid -> (cid, rev, dedup, pii, line, bucket); valid while ``rev`` is
        current."""
        rows = self._db.conn.execute("SELECT cid, rev, dedup, pii, line, bucket FROM examples WHERE cfg = ?", (cfg,))
        return {r[0]: r for r in rows}

    def put(self, rows: Iterable[tuple[str, int, str, bytes, str | None, bytes | None, float]]) -> None:
        """Cache processed examples ``(cid, rev, cfg, dedup, pii, line, bucket)`` (see migration 5)."""
        self._db.conn.executemany(
            "INSERT OR REPLACE INTO examples (cid, rev, cfg, dedup, pii, line, bucket) VALUES (?,?,?,?,?,?,?)", rows
        )

    def put_entries(self, cfg: str, rows: Iterable[tuple[Any, ...]]) -> None:
        """Cache examples ``(cid, dedup, pii, line, bucket)`` made under ``cfg`` from the content each conversation
        has now (its current ``rev``): the parse worker's, stored right after the records they were made from."""
        # Staged in a temporary table and joined in one statement: an INSERT ... SELECT per row cost 3x as much.
        conn = self._db.conn
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS new_entries (cid TEXT, dedup BLOB, pii TEXT, line BLOB, bucket REAL)"
        )
        conn.executemany("INSERT INTO temp.new_entries VALUES (?,?,?,?,?)", rows)
        conn.execute(
            "INSERT OR REPLACE INTO examples (cid, rev, cfg, dedup, pii, line, bucket)"
            " SELECT e.cid, c.rev, ?, e.dedup, e.pii, e.line, e.bucket"
            " FROM temp.new_entries e JOIN conversations c ON c.cid = e.cid ORDER BY e.rowid",
            (cfg,),
        )
        conn.execute("DELETE FROM temp.new_entries")
