"""The schema of the state database as migrations keyed by ``PRAGMA user_version``: migration N (1-based) takes a
database from version N-1 to N. Never edit a released one; add the next."""

from __future__ import annotations

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
    # 7: the service's own state out of the old key/value table into typed columns: one row of scalars (the
    # champion, the latest model, the training backoff, when ingest and training last ran) and at most one pending
    # export. Values carry over ('' meant unset, numbers were text); the kv table held nothing else and goes.
    """
    CREATE TABLE service (
        id INTEGER PRIMARY KEY CHECK (id = 1), champion_job TEXT, last_trained_dataset INTEGER, last_run_at TEXT,
        last_ingest_at TEXT, train_failures INTEGER NOT NULL DEFAULT 0, train_backoff_until TEXT,
        latest_model INTEGER, previous_latest_model INTEGER
    );
    INSERT INTO service (id, champion_job, last_trained_dataset, last_run_at, last_ingest_at, train_failures,
                         train_backoff_until, latest_model, previous_latest_model)
    SELECT 1,
        (SELECT NULLIF(value, '') FROM kv WHERE key = 'champion_job'),
        (SELECT CAST(NULLIF(value, '') AS INTEGER) FROM kv WHERE key = 'last_trained_dataset'),
        (SELECT NULLIF(value, '') FROM kv WHERE key = 'last_run_at'),
        (SELECT NULLIF(value, '') FROM kv WHERE key = 'last_ingest_at'),
        COALESCE((SELECT CAST(NULLIF(value, '') AS INTEGER) FROM kv WHERE key = 'train_failures'), 0),
        (SELECT NULLIF(value, '') FROM kv WHERE key = 'train_backoff_until'),
        (SELECT CAST(NULLIF(value, '') AS INTEGER) FROM kv WHERE key = 'latest_model'),
        (SELECT CAST(NULLIF(value, '') AS INTEGER) FROM kv WHERE key = 'previous_latest_model');
    CREATE TABLE pending_export (
        id INTEGER PRIMARY KEY CHECK (id = 1), job_id TEXT NOT NULL, gate TEXT NOT NULL, pid INTEGER,
        pid_start INTEGER
    );
    INSERT INTO pending_export (id, job_id, gate, pid, pid_start)
    SELECT 1, json_extract(value, '$.job_id'), COALESCE(json_extract(value, '$.gate'), '{}'),
        json_extract(value, '$.pid'), json_extract(value, '$.pid_start')
    FROM kv WHERE key = 'export_pending' AND json_valid(value) AND json_type(value, '$.job_id') = 'text';
    DROP TABLE kv;
    """,
    # 8: what disk retention removed: a job's bulky artifacts, a dataset version's files, a model version's GGUF
    # (kind, key), when, and how many bytes it freed. The rows they belonged to stay, for history and lineage.
    """
    CREATE TABLE pruned (
        kind TEXT NOT NULL, key TEXT NOT NULL, pruned_at TEXT NOT NULL, freed INTEGER NOT NULL,
        PRIMARY KEY (kind, key)
    ) WITHOUT ROWID;
    """,
    # 9: every vote is learned (issue 19). A dataset member records the version where its conversation first
    # appeared (carried forward from the version before); a job records the conversations it trained on (its plan)
    # and the sign of the vote it learned (1 a good answer, -1 a thumbs-down), so a model's lineage (its own and its
    # warm-start ancestors') is exact and a retracted or reversed vote is noticed.
    """
    ALTER TABLE dataset_members ADD COLUMN since INTEGER;
    CREATE TEMP TABLE first_seen AS SELECT cid, MIN(version) AS v FROM dataset_members GROUP BY cid;
    UPDATE dataset_members SET since = first_seen.v FROM first_seen WHERE first_seen.cid = dataset_members.cid;
    DROP TABLE first_seen;
    CREATE TABLE job_examples (
        job_id TEXT NOT NULL, cid TEXT NOT NULL, score INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (job_id, cid)
    ) WITHOUT ROWID;
    """,
    # 10: learning from thumbs-down (issue 12). A feedback event may carry a corrected answer ('better'); a label
    # keeps the correction of its latest thumbs vote when that vote is down. Preference examples (prefs_*.jsonl,
    # pairs_*.jsonl) have members of their own: a conversation is in train.jsonl and prefs_train.jsonl of the same
    # version, which dataset_members' key (version, cid) cannot hold. 'variant' names what the example says
    # (desirable/undesirable, or a digest of the correction): 'since' carries forward only while it stays the same.
    """
    ALTER TABLE feedback ADD COLUMN better TEXT;
    CREATE INDEX feedback_better ON feedback (cid) WHERE better IS NOT NULL;
    ALTER TABLE labels ADD COLUMN better TEXT;
    CREATE TABLE preference_members (
        version INTEGER NOT NULL, split TEXT NOT NULL, cid TEXT NOT NULL, variant TEXT NOT NULL,
        since INTEGER NOT NULL, PRIMARY KEY (version, split, cid)
    ) WITHOUT ROWID;
    """,
    # 11: the gate's verdict on a job, check by check (its numbers, as the cycle summary has them), for status
    """
    ALTER TABLE jobs ADD COLUMN gate TEXT;
    """,
    # 12: every move of <model_name>:latest (a registration promoting a version, or a rollback), for the report's
    # history; 'previous' is the version it pointed at before (NULL: none)
    """
    CREATE TABLE latest_moves (
        id INTEGER PRIMARY KEY, at TEXT NOT NULL, version INTEGER NOT NULL, previous INTEGER, how TEXT NOT NULL
    );
    """,
]
