"""SQLite state (WAL) under the state dir: the only module that speaks SQL.

Tables: file cursors, conversations (+ where each was seen), feedback events and the latest label per
conversation, rejected lines, dataset versions and their members, eval pins. Schema changes are migrations
keyed by ``PRAGMA user_version``. Files and folders created here are private (0700 / 0600).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.state.rows import Cursor

DB_NAME = "state.sqlite3"

MIGRATIONS: list[str] = [
    # 1: foundation
    """
    CREATE TABLE files (
        path TEXT PRIMARY KEY, kind TEXT NOT NULL, dev INTEGER NOT NULL, ino INTEGER NOT NULL,
        size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, offset INTEGER NOT NULL, lines INTEGER NOT NULL,
        head_len INTEGER NOT NULL, head_hash TEXT NOT NULL, tail_len INTEGER NOT NULL, tail_hash TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE conversations (
        cid TEXT PRIMARY KEY, rank INTEGER NOT NULL, messages TEXT NOT NULL, mode TEXT NOT NULL, model TEXT,
        quality TEXT, thumbs_up INTEGER, inline_score INTEGER NOT NULL, inline_rated INTEGER NOT NULL,
        usable INTEGER NOT NULL, started_at TEXT, src_path TEXT NOT NULL, src_offset INTEGER NOT NULL,
        src_len INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, deleted_at TEXT,
        first_seen TEXT NOT NULL, updated_at TEXT NOT NULL
    );
    CREATE TABLE sightings (
        path TEXT NOT NULL, cid TEXT NOT NULL, rank INTEGER NOT NULL, PRIMARY KEY (path, cid)
    ) WITHOUT ROWID;
    CREATE INDEX sightings_cid ON sightings (cid);
    CREATE TABLE feedback (
        id INTEGER PRIMARY KEY, path TEXT NOT NULL, line INTEGER NOT NULL, cid TEXT NOT NULL,
        thumbs_up INTEGER, quality TEXT, note TEXT, ts TEXT NOT NULL, score INTEGER NOT NULL
    );
    CREATE INDEX feedback_path ON feedback (path);
    CREATE INDEX feedback_cid ON feedback (cid, ts, id);
    CREATE TABLE labels (
        cid TEXT PRIMARY KEY, score INTEGER NOT NULL, thumbs_up INTEGER, quality TEXT, ts TEXT NOT NULL,
        feedback_id INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE rejects (
        path TEXT NOT NULL, line INTEGER NOT NULL, reason TEXT NOT NULL, line_hash TEXT NOT NULL,
        PRIMARY KEY (path, line)
    ) WITHOUT ROWID;
    CREATE TABLE datasets (
        version INTEGER PRIMARY KEY, created_at TEXT NOT NULL, path TEXT NOT NULL, fingerprint TEXT NOT NULL,
        content_hash TEXT NOT NULL, train_count INTEGER NOT NULL, eval_count INTEGER NOT NULL, manifest TEXT NOT NULL
    );
    CREATE TABLE dataset_members (
        version INTEGER NOT NULL, cid TEXT NOT NULL, split TEXT NOT NULL, PRIMARY KEY (version, cid)
    ) WITHOUT ROWID;
    CREATE INDEX dataset_members_cid ON dataset_members (cid);
    CREATE TABLE eval_pins (cid TEXT PRIMARY KEY, pinned_at TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    """,
    # 2: service cycles (one row per cycle, with its canonical summary)
    """
    CREATE TABLE cycles (
        cycle_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, outcome TEXT NOT NULL, reason TEXT NOT NULL,
        trained INTEGER NOT NULL DEFAULT 0, summary TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX cycles_started ON cycles (started_at);
    """,
    # 3: training jobs
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY, cycle_id TEXT, dataset_version INTEGER NOT NULL, status TEXT NOT NULL,
        pid INTEGER, pid_start INTEGER, job_dir TEXT NOT NULL, config_path TEXT NOT NULL, log_path TEXT NOT NULL,
        metrics_path TEXT NOT NULL, result_path TEXT NOT NULL, params TEXT NOT NULL, latest_metrics TEXT,
        result TEXT, error TEXT, exit_code INTEGER, created_at TEXT NOT NULL, started_at TEXT, finished_at TEXT
    ) WITHOUT ROWID;
    CREATE INDEX jobs_status ON jobs (status);
    """,
    # 4: model versions (exported GGUFs and their Ollama registration)
    """
    CREATE TABLE models (
        version INTEGER PRIMARY KEY, job_id TEXT NOT NULL, dataset_version INTEGER NOT NULL,
        manifest_hash TEXT, gguf_path TEXT NOT NULL, gguf_sha256 TEXT NOT NULL, gguf_size INTEGER NOT NULL,
        architecture TEXT, chat_template TEXT NOT NULL, eval TEXT, status TEXT NOT NULL, tag TEXT NOT NULL,
        ollama_digest TEXT, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at TEXT, last_error TEXT,
        created_at TEXT NOT NULL, registered_at TEXT
    );
    CREATE INDEX models_status ON models (status);
    """,
    # 5: processed-example cache for dataset builds. conversations.rev counts content changes; a cached example is
    # valid while its (rev, cfg) match, cfg naming the settings and code that shape the line (dataset.example_cfg).
    # line is NULL when the example line is '{"messages":' + messages + '}\n' (nothing dropped or scrubbed).
    # Sightings name their file by a small id instead of its path, and lose their cid index: a cold ingest writes
    # 170k of them, and one small b-tree stays in cache (-1.0 s of a cold ingest's ~5 s of CPU). The only lookup by
    # cid, reconcile_vanished (a file re-read or gone), scans the table once instead (~20 ms per 100k records).
    """
    ALTER TABLE conversations ADD COLUMN rev INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE examples (
        cid TEXT PRIMARY KEY, rev INTEGER NOT NULL, cfg TEXT NOT NULL, dedup BLOB NOT NULL, pii TEXT, line BLOB,
        bucket REAL NOT NULL
    );
    CREATE TABLE paths (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE);
    INSERT INTO paths (path) SELECT DISTINCT path FROM sightings ORDER BY path;
    CREATE TABLE sightings_v5 (
        file INTEGER NOT NULL, cid TEXT NOT NULL, rank INTEGER NOT NULL, PRIMARY KEY (file, cid)
    ) WITHOUT ROWID;
    INSERT INTO sightings_v5 (file, cid, rank)
        SELECT p.id, s.cid, s.rank FROM sightings s JOIN paths p ON p.path = s.path;
    DROP TABLE sightings;
    ALTER TABLE sightings_v5 RENAME TO sightings;
    """,
    # 6: dataset members lose their cid index: every build writes one row per example (34k) into two b-trees for
    # a lookup only `forget` makes (datasets_containing), which scans the table instead (~10 ms per 100k rows).
    """
    DROP INDEX dataset_members_cid;
    """,
]


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make the leaf 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _json_ids(ids: Iterable[str]) -> str | None:
    """``ids`` as one JSON array parameter (read back with ``json_each``), or None when there are none."""
    listed = list(ids)
    return json.dumps(listed) if listed else None


@dataclass(frozen=True, slots=True)
class Eligible:
    cid: str
    messages: str
    mode: str
    model: str | None
    score: int
    rated: bool
    src_path: str
    src_offset: int
    src_len: int


@dataclass(frozen=True, slots=True)
class DatasetRow:
    version: int
    created_at: str
    path: str
    fingerprint: str
    content_hash: str
    train_count: int
    eval_count: int
    manifest: dict[str, Any]


def _jsonish(v: Any) -> Any:
    return json.dumps(v, default=str) if isinstance(v, dict | list) else v


def _job_dict(description: Any, row: Sequence[Any]) -> dict[str, Any]:
    d = dict(zip([c[0] for c in description], row, strict=True))
    for k in ("params", "latest_metrics", "result"):
        if d.get(k):
            d[k] = json.loads(d[k])
    return d


def _model_dict(description: Any, row: Sequence[Any]) -> dict[str, Any]:
    d = dict(zip([c[0] for c in description], row, strict=True))
    if d.get("eval"):
        d["eval"] = json.loads(d["eval"])
    return d


def _dataset_row(r: Sequence[Any]) -> DatasetRow:
    return DatasetRow(int(r[0]), r[1], r[2], r[3], r[4], int(r[5]), int(r[6]), json.loads(r[7]))


class StateError(Exception):
    """The state database cannot be opened (disk full, read-only, unreadable); ``str()`` is one line."""


_STORAGE_MESSAGES = ("database or disk is full", "disk i/o error", "readonly database", "unable to open database")


def storage_problem(exc: BaseException, where: Path) -> str | None:
    """One line naming the state dir and its free space when ``exc`` is its storage failing (disk full, I/O error,
    read-only); None for any other error."""
    if isinstance(exc, StateError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES):
        what = exc.strerror or str(exc)
    elif isinstance(exc, sqlite3.OperationalError) and any(m in str(exc).lower() for m in _STORAGE_MESSAGES):
        what = str(exc)
    else:
        return None
    try:
        free = f"; {shutil.disk_usage(where).free // 1024} KiB free there"
    except OSError:
        free = ""
    return f"cannot write the state dir {where}: {what}{free}"


class State:
    """One connection to the state database. Not shared between threads; open one per thread."""

    def __init__(self, state_dir: Path, *, timeout_s: float = 30.0) -> None:
        try:
            self._open(Path(state_dir), timeout_s)
        except (sqlite3.Error, OSError) as exc:  # disk full, read-only, unreadable: one line, not a traceback
            if getattr(self, "conn", None) is not None:
                self.conn.close()
            raise StateError(storage_problem(exc, Path(state_dir))
                             or f"cannot open the state database in {state_dir}: {exc}") from None

    def _open(self, state_dir: Path, timeout_s: float) -> None:
        self.dir = private_dir(state_dir)
        self.path = self.dir / DB_NAME
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        self.conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        # Only takes effect on a new, empty database (before WAL is set). Rows hold whole conversations (~1-4 KiB):
        # 16 KiB pages make a cold ingest of a 200 MB store ~25% cheaper (fewer page writes, splits and syscalls).
        self.conn.execute("PRAGMA page_size=16384")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.conn.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
        # Up to 16 MiB of page cache (default 2 MiB): the id indexes of a 100k-conversation store stay in memory
        # during bulk ingest instead of being re-read for every random insert. Grows only as used.
        self.conn.execute("PRAGMA cache_size=-16384")
        self._depth = 0
        self.migrate()

    # -- plumbing -------------------------------------------------------------------------------------------

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> State:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction (BEGIN IMMEDIATE); nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
            self.conn.execute("COMMIT")
        except BaseException as exc:
            if self.conn.in_transaction:  # a failed COMMIT (disk full) leaves it open; SQLite may have ended it
                self.conn.execute("ROLLBACK")
            problem = storage_problem(exc, self.dir) if isinstance(exc, sqlite3.OperationalError) else None
            if problem:  # disk full, read-only: one line naming the state dir (nothing was written)
                raise StateError(problem) from exc
            raise
        finally:
            self._depth = 0

    @contextmanager
    def atomic(self) -> Iterator[None]:
        """All or nothing for one block: a transaction, or inside one a savepoint, so that an exception undoes just
        this block's writes and leaves the enclosing transaction usable (bulk ingest groups many files into one
        transaction; one unreadable file must not undo the others)."""
        if not self._depth:
            with self.transaction():
                yield
            return
        self.conn.execute("SAVEPOINT atomic")
        self._depth += 1
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK TO atomic")
            self.conn.execute("RELEASE atomic")
            raise
        else:
            self.conn.execute("RELEASE atomic")
        finally:
            self._depth -= 1

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        current = self.schema_version
        if current > len(MIGRATIONS):
            raise RuntimeError(
                f"state database {self.path} has schema v{current}, newer than this version knows (v{len(MIGRATIONS)})"
            )
        for version in range(current, len(MIGRATIONS)):
            with self.transaction():
                for stmt in MIGRATIONS[version].split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                self.conn.execute(f"PRAGMA user_version={version + 1}")
        for suffix in ("-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.chmod(p, 0o600)

    # -- cursors -------------------------------------------------------------------------------------------

    def cursors(self) -> dict[str, Cursor]:
        rows = self.conn.execute(
            "SELECT path, kind, dev, ino, size, mtime_ns, offset, lines, head_len, head_hash, tail_len, tail_hash"
            " FROM files"
        )
        return {r[0]: Cursor(*r) for r in rows}

    def cursor(self, path: str) -> Cursor | None:
        r = self.conn.execute(
            "SELECT path, kind, dev, ino, size, mtime_ns, offset, lines, head_len, head_hash, tail_len, tail_hash"
            " FROM files WHERE path = ?",
            (path,),
        ).fetchone()
        return Cursor(*r) if r else None

    def save_cursor(self, c: Cursor) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO files (path, kind, dev, ino, size, mtime_ns, offset, lines, head_len, head_hash,"
            " tail_len, tail_hash, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (c.path, c.kind, c.dev, c.ino, c.size, c.mtime_ns, c.offset, c.lines, c.head_len, c.head_hash,
             c.tail_len, c.tail_hash, utcnow()),
        )

    def drop_cursor(self, path: str) -> None:
        self.conn.execute("DELETE FROM files WHERE path = ?", (path,))

    # -- conversations -------------------------------------------------------------------------------------

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

    def upsert_conversations(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert or update conversations given as ``(cid, rank, messages, mode, model, quality, thumbs_up,
        inline_score, inline_rated, usable, started_at, path, offset, length)`` (tuples: bulk ingest makes 100k rows,
        and a tuple costs a fraction of a dataclass). Content from a higher-ranked source (logs/) wins; deleted
        stays deleted; a content change bumps ``rev``, which invalidates the conversation's cached example."""
        now = utcnow()
        self.conn.executemany(self._UPSERT, [(*r, now, now) for r in rows])
        self.add_sightings([(r[11], r[0], r[1]) for r in rows])

    def add_sightings(self, rows: Sequence[tuple[str, str, int]]) -> None:
        """Record that ``(path, cid, rank)`` holds a copy of the conversation (without touching its content)."""
        ids = {path: self._path_id(path) for path in {r[0] for r in rows}}
        self.conn.executemany(
            "INSERT OR REPLACE INTO sightings (file, cid, rank) VALUES (?,?,?)", [(ids[p], c, r) for p, c, r in rows]
        )

    def _path_id(self, path: str) -> int:
        """The id that stands for ``path`` in sightings (created on first use; never cached across transactions,
        since a rolled-back one would leave a stale id behind)."""
        self.conn.execute("INSERT OR IGNORE INTO paths (path) VALUES (?)", (path,))
        return int(self.conn.execute("SELECT id FROM paths WHERE path = ?", (path,)).fetchone()[0])

    def outranked(self, cids: Iterable[str], rank: int) -> set[str]:
        """Those of ``cids`` whose content comes from a source ranked above ``rank``: an upsert at ``rank`` would not
        change them (see :meth:`upsert_conversations`)."""
        ids = _json_ids(cids)
        if ids is None:
            return set()
        sql = "SELECT cid FROM conversations WHERE rank > ? AND cid IN (SELECT value FROM json_each(?))"
        return {r[0] for r in self.conn.execute(sql, (rank, ids))}

    def sighted_in(self, path: str) -> set[str]:
        sql = "SELECT cid FROM sightings WHERE file = (SELECT id FROM paths WHERE path = ?)"
        return {r[0] for r in self.conn.execute(sql, (path,))}

    def forget_path(self, path: str) -> None:
        """Drop everything read from ``path`` (before it is read again from byte 0)."""
        self.conn.execute("DELETE FROM sightings WHERE file = (SELECT id FROM paths WHERE path = ?)", (path,))
        cids = [r[0] for r in self.conn.execute("SELECT DISTINCT cid FROM feedback WHERE path = ?", (path,))]
        self.conn.execute("DELETE FROM feedback WHERE path = ?", (path,))
        self.refresh_labels(cids)

    def reconcile_vanished(self, vanished: Iterable[str]) -> int:
        """Conversations no longer in any logs/ file (or in no file at all) are marked deleted. Returns how many."""
        ids = _json_ids(vanished)
        if ids is None:
            return 0
        # One statement for the whole set: a per-id loop costs three queries per conversation of a re-read file.
        # sightings has no cid index (migration 5): each NOT IN list is built by one scan of it (~10 ms per 100k).
        cur = self.conn.execute(
            "UPDATE conversations SET deleted = 1, deleted_at = ?1"
            " WHERE deleted = 0 AND cid IN (SELECT value FROM json_each(?2))"
            " AND cid NOT IN (SELECT cid FROM sightings WHERE rank = 2 AND cid IN (SELECT value FROM json_each(?2)))"
            " AND (rank = 2 OR cid NOT IN (SELECT cid FROM sightings WHERE cid IN (SELECT value FROM json_each(?2))))",
            (utcnow(), ids),
        )
        return cur.rowcount

    def mark_deleted(self, cid: str) -> bool:
        cur = self.conn.execute(
            "UPDATE conversations SET deleted = 1, deleted_at = ? WHERE cid = ? AND deleted = 0", (utcnow(), cid)
        )
        return cur.rowcount > 0

    # -- feedback ------------------------------------------------------------------------------------------

    def add_feedback(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Add feedback events ``(path, line, cid, thumbs_up, quality, note, ts, score)`` and refresh the labels of
        their conversations."""
        self.conn.executemany(
            "INSERT INTO feedback (path, line, cid, thumbs_up, quality, note, ts, score) VALUES (?,?,?,?,?,?,?,?)",
            rows,
        )
        self.refresh_labels({r[2] for r in rows})

    def refresh_labels(self, cids: Iterable[str]) -> None:
        """Recompute the effective label (latest event by timestamp, then arrival) for ``cids``."""
        ids = _json_ids(cids)
        if ids is None:
            return
        # Set-based: a SELECT + INSERT per id made feedback ingest the slowest part of a cold ingest.
        self.conn.execute(
            "DELETE FROM labels WHERE cid IN (SELECT value FROM json_each(?))"
            " AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.cid = labels.cid)",
            (ids,),
        )
        self.conn.execute(
            "INSERT OR REPLACE INTO labels (cid, score, thumbs_up, quality, ts, feedback_id)"
            " SELECT f.cid, f.score, f.thumbs_up, f.quality, f.ts, f.id"
            " FROM (SELECT DISTINCT value AS cid FROM json_each(?)) t JOIN feedback f ON f.id ="
            " (SELECT id FROM feedback WHERE cid = t.cid ORDER BY ts DESC, id DESC LIMIT 1)",
            (ids,),
        )

    # -- rejected lines ------------------------------------------------------------------------------------

    def rejects_for(self, path: str) -> dict[int, str]:
        return {r[0]: r[1] for r in self.conn.execute("SELECT line, line_hash FROM rejects WHERE path = ?", (path,))}

    def replace_rejects(self, path: str, rows: Sequence[tuple[int, str, str]], *, from_line: int = 0) -> None:
        """Record rejected lines ``(line, reason, line_hash)`` of ``path`` at or after ``from_line``."""
        self.conn.execute("DELETE FROM rejects WHERE path = ? AND line >= ?", (path, from_line))
        self.conn.executemany(
            "INSERT OR REPLACE INTO rejects (path, line, reason, line_hash) VALUES (?,?,?,?)",
            [(path, line, reason, h) for line, reason, h in rows],
        )

    def drop_rejects(self, path: str) -> None:
        self.conn.execute("DELETE FROM rejects WHERE path = ?", (path,))

    # -- queries for datasets and status -------------------------------------------------------------------

    _ELIGIBLE = (
        " FROM conversations c LEFT JOIN labels l ON l.cid = c.cid"
        " WHERE c.deleted = 0 AND c.usable = 1 AND c.mode IN ({modes})"
        " AND COALESCE(l.score, c.inline_score) >= ? AND (l.cid IS NOT NULL OR c.inline_rated = 1 OR ?)"
    )

    def _eligible_sql(self, select: str, modes: Sequence[str]) -> str:
        return select + self._ELIGIBLE.format(modes=",".join("?" * len(modes)))

    def eligible(self, modes: Sequence[str], min_score: int, include_unrated: bool) -> Iterator[Eligible]:
        sql = self._eligible_sql(
            "SELECT c.cid, c.messages, c.mode, c.model, COALESCE(l.score, c.inline_score),"
            " (l.cid IS NOT NULL OR c.inline_rated = 1), c.src_path, c.src_offset, c.src_len",
            modes,
        ) + " ORDER BY +c.cid"  # '+': scan the table and sort; walking the id index costs a random read per row
        for r in self.conn.execute(sql, (*modes, min_score, include_unrated)):
            yield Eligible(r[0], r[1], r[2], r[3], int(r[4]), bool(r[5]), r[6], r[7], r[8])

    def eligible_examples(
        self, modes: Sequence[str], min_score: int, include_unrated: bool
    ) -> Iterator[tuple[Any, ...]]:
        """The rows of :meth:`eligible` (same filter), in no particular order, as
        ``(cid, rev, mode, model, score, src_path, src_offset, src_len, messages)`` with ``messages`` as UTF-8 bytes.
        Unordered and streamed: sorting 50 MB of rows in SQLite costs more than sorting their ids in Python."""
        sql = self._eligible_sql(
            "SELECT c.cid, c.rev, c.mode, c.model, COALESCE(l.score, c.inline_score), c.src_path, c.src_offset,"
            " c.src_len, CAST(c.messages AS BLOB)",
            modes,
        )
        yield from self.conn.execute(sql, (*modes, min_score, include_unrated))

    def cached_examples(self, cfg: str) -> dict[str, tuple[str, int, bytes, str | None, bytes | None, float]]:
        """Cached examples made under ``cfg``: cid -> (cid, rev, dedup, pii, line, bucket); valid while ``rev`` is
        current."""
        rows = self.conn.execute("SELECT cid, rev, dedup, pii, line, bucket FROM examples WHERE cfg = ?", (cfg,))
        return {r[0]: r for r in rows}

    def put_examples(self, rows: Iterable[tuple[str, int, str, bytes, str | None, bytes | None, float]]) -> None:
        """Cache processed examples ``(cid, rev, cfg, dedup, pii, line, bucket)`` (see migration 5)."""
        self.conn.executemany(
            "INSERT OR REPLACE INTO examples (cid, rev, cfg, dedup, pii, line, bucket) VALUES (?,?,?,?,?,?,?)", rows
        )

    def put_entries(self, cfg: str, rows: Iterable[tuple[Any, ...]]) -> None:
        """Cache examples ``(cid, dedup, pii, line, bucket)`` made under ``cfg`` from the content each conversation
        has now (its current ``rev``): the parse worker's, stored right after the records they were made from."""
        # Staged in a temporary table and joined in one statement: an INSERT ... SELECT per row cost 3x as much.
        self.conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS new_entries (cid TEXT, dedup BLOB, pii TEXT, line BLOB, bucket REAL)"
        )
        self.conn.executemany("INSERT INTO temp.new_entries VALUES (?,?,?,?,?)", rows)
        self.conn.execute(
            "INSERT OR REPLACE INTO examples (cid, rev, cfg, dedup, pii, line, bucket)"
            " SELECT e.cid, c.rev, ?, e.dedup, e.pii, e.line, e.bucket"
            " FROM temp.new_entries e JOIN conversations c ON c.cid = e.cid ORDER BY e.rowid",
            (cfg,),
        )
        self.conn.execute("DELETE FROM temp.new_entries")

    def eligible_counts(
        self, modes: Sequence[str], min_score: int, include_unrated: bool, since_version: int | None = None
    ) -> dict[str, int]:
        """Eligible total, positives among them, and how many are not in dataset ``since_version`` (default: the
        latest version)."""
        latest = self.latest_dataset_version() or 0 if since_version is None else since_version
        sql = self._eligible_sql(
            "SELECT COUNT(*), SUM(COALESCE(l.score, c.inline_score) > 0),"
            " SUM(NOT EXISTS (SELECT 1 FROM dataset_members m WHERE m.version = ? AND m.cid = c.cid))",
            modes,
        )
        row = self.conn.execute(sql, (latest, *modes, min_score, include_unrated)).fetchone()
        return {"eligible": row[0] or 0, "positive": row[1] or 0, "new_since_dataset": row[2] or 0}

    def counts(self) -> dict[str, int]:
        one = self.conn.execute
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

    def conversation(self, cid: str) -> dict[str, Any] | None:
        cur = self.conn.execute(
            "SELECT c.*, l.score AS label_score, l.ts AS label_ts FROM conversations c"
            " LEFT JOIN labels l ON l.cid = c.cid WHERE c.cid = ?",
            (cid,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return dict(zip([d[0] for d in cur.description], row, strict=True))

    # -- datasets ------------------------------------------------------------------------------------------

    def dataset_versions(self) -> set[int]:
        return {int(r[0]) for r in self.conn.execute("SELECT version FROM datasets")}

    def latest_dataset_version(self) -> int | None:
        row = self.conn.execute("SELECT MAX(version) FROM datasets").fetchone()
        return int(row[0]) if row[0] is not None else None

    def dataset(self, version: int, *, manifest: bool = True) -> DatasetRow | None:
        """Dataset ``version``; without its manifest (``{}``) when ``manifest`` is False (a 34k-example manifest
        takes ~15 ms to decode)."""
        r = self.conn.execute(
            "SELECT version, created_at, path, fingerprint, content_hash, train_count, eval_count,"
            + (" manifest" if manifest else " '{}'") + " FROM datasets WHERE version = ?",
            (version,),
        ).fetchone()
        return _dataset_row(r) if r else None

    def datasets(self) -> list[DatasetRow]:
        rows = self.conn.execute(
            "SELECT version, created_at, path, fingerprint, content_hash, train_count, eval_count, manifest"
            " FROM datasets ORDER BY version"
        ).fetchall()
        return [_dataset_row(r) for r in rows]

    def add_dataset(self, row: DatasetRow, splits: Mapping[str, Sequence[str]], manifest_text: str | None = None
                    ) -> None:
        """Record a dataset version and its members (``splits``: split name -> conversation ids); ``manifest_text``:
        ``row.manifest`` as JSON, when the caller has it already (a 34k-example manifest takes ~30 ms to encode)."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO datasets (version, created_at, path, fingerprint, content_hash, train_count, eval_count,"
                " manifest) VALUES (?,?,?,?,?,?,?,?)",
                (row.version, row.created_at, row.path, row.fingerprint, row.content_hash, row.train_count,
                 row.eval_count, manifest_text if manifest_text is not None else json.dumps(row.manifest)),
            )
            for split, cids in splits.items():
                self.conn.executemany(
                    "INSERT INTO dataset_members (version, cid, split) VALUES (?,?,?)",
                    zip(itertools.repeat(row.version), cids, itertools.repeat(split)),
                )

    def member_ids(self, version: int) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT cid FROM dataset_members WHERE version = ?", (version,))}

    def datasets_containing(self, cid: str) -> list[int]:
        return [r[0] for r in self.conn.execute(
            "SELECT version FROM dataset_members WHERE cid = ? ORDER BY version", (cid,))]

    def eval_pins(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT cid FROM eval_pins")}

    def add_eval_pins(self, cids: Iterable[str]) -> None:
        now = utcnow()
        self.conn.executemany("INSERT OR IGNORE INTO eval_pins (cid, pinned_at) VALUES (?,?)", ((c, now) for c in cids))

    # -- cycles ---------------------------------------------------------------------------------------------

    def record_cycle(self, cycle_id: str, started_at: str, outcome: str, reason: str, summary: dict[str, Any],
                     *, trained: bool = False) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO cycles (cycle_id, started_at, outcome, reason, trained, summary)"
            " VALUES (?,?,?,?,?,?)",
            (cycle_id, started_at, outcome, reason, trained, json.dumps(summary, default=str)),
        )

    def last_cycle(self) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT summary FROM cycles ORDER BY started_at DESC LIMIT 1").fetchone()
        return json.loads(row[0]) if row else None

    def runs_since(self, iso: str) -> int:
        """Training runs started at or after ``iso`` (for the policy's daily limit)."""
        return int(self.conn.execute(
            "SELECT COUNT(*) FROM cycles WHERE trained = 1 AND started_at >= ?", (iso,)
        ).fetchone()[0])

    # -- jobs -----------------------------------------------------------------------------------------------

    _JOB_COLS = (
        "job_id, cycle_id, dataset_version, status, pid, pid_start, job_dir, config_path, log_path, metrics_path,"
        " result_path, params, latest_metrics, result, error, exit_code, created_at, started_at, finished_at"
    )

    def add_job(self, job: dict[str, Any]) -> None:
        cols = [c.strip() for c in self._JOB_COLS.split(",")]
        row = [_jsonish(job.get(c)) for c in cols]
        self.conn.execute(f"INSERT INTO jobs ({self._JOB_COLS}) VALUES ({','.join('?' * len(cols))})", row)

    def update_job(self, job_id: str, **fields: Any) -> None:
        if not fields:
            return
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?", [*map(_jsonish, fields.values()), job_id])

    def job(self, job_id: str) -> dict[str, Any] | None:
        cur = self.conn.execute(f"SELECT {self._JOB_COLS} FROM jobs WHERE job_id = ?", (job_id,))
        row = cur.fetchone()
        return _job_dict(cur.description, row) if row else None

    def jobs(self, *, status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = f"SELECT {self._JOB_COLS} FROM jobs"
        args: list[Any] = []
        if status:
            sql += " WHERE status = ?"
            args.append(status)
        cur = self.conn.execute(sql + " ORDER BY created_at DESC, job_id DESC LIMIT ?", (*args, limit))
        return [_job_dict(cur.description, r) for r in cur.fetchall()]

    # -- model versions -------------------------------------------------------------------------------------

    _MODEL_COLS = (
        "version, job_id, dataset_version, manifest_hash, gguf_path, gguf_sha256, gguf_size, architecture,"
        " chat_template, eval, status, tag, ollama_digest, attempts, next_attempt_at, last_error, created_at,"
        " registered_at"
    )

    def next_model_version(self) -> int:
        row = self.conn.execute("SELECT MAX(version) FROM models").fetchone()
        return int(row[0] or 0) + 1

    def add_model(self, m: dict[str, Any]) -> None:
        cols = [c.strip() for c in self._MODEL_COLS.split(",")]
        self.conn.execute(f"INSERT INTO models ({self._MODEL_COLS}) VALUES ({','.join('?' * len(cols))})",
                          [_jsonish(m.get(c)) for c in cols])

    def update_model(self, version: int, **fields: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE models SET {sets} WHERE version = ?", [*map(_jsonish, fields.values()), version])

    def model(self, version: int) -> dict[str, Any] | None:
        cur = self.conn.execute(f"SELECT {self._MODEL_COLS} FROM models WHERE version = ?", (version,))
        row = cur.fetchone()
        return _model_dict(cur.description, row) if row else None

    def models(self, *, status: str | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {self._MODEL_COLS} FROM models"
        args: list[Any] = []
        if status:
            sql += " WHERE status = ?"
            args.append(status)
        cur = self.conn.execute(sql + " ORDER BY version", args)
        return [_model_dict(cur.description, r) for r in cur.fetchall()]

    # -- key/value -----------------------------------------------------------------------------------------

    def get_kv(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_kv(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?,?)", (key, value))

