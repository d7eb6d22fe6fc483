"""The state package: typed rows round-trip through their repositories, updates set what they name and nothing
else, one transaction spans repositories, migration 7 carries the old key/value domain state over, and ``migrate``
fails with :class:`StateError`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from daemon.state import CycleRow, JobRow, ModelRow, PendingExport, ServiceRow, State, StateError
from daemon.state.db import DB_NAME
from daemon.state.migrations import MIGRATIONS


def job(job_id: str = "j-1", **over: object) -> JobRow:
    fields: dict[str, object] = {
        "job_id": job_id, "cycle_id": "c-1", "dataset_version": 3, "status": "starting", "job_dir": "/j",
        "config_path": "/j/config.yaml", "log_path": "/j/job.log", "metrics_path": "/j/m.jsonl",
        "result_path": "/j/result.json", "params": {"backend": "x", "lora": {"r": 8}},
        "created_at": "2026-01-01T00:00:00Z", **over,
    }
    return JobRow(**fields)  # type: ignore[arg-type]


def model(version: int = 1, **over: object) -> ModelRow:
    fields: dict[str, object] = {
        "version": version, "job_id": "j-1", "dataset_version": 3, "gguf_path": "/m.gguf", "gguf_sha256": "sha256:ab",
        "gguf_size": 10, "chat_template": "chatml", "status": "exported", "tag": f"chatos:v{version}",
        "created_at": "2026-01-01T00:00:00Z", "eval": {"eval_loss_after": 1.5}, **over,
    }
    return ModelRow(**fields)  # type: ignore[arg-type]


@pytest.fixture
def state(tmp_path: Path) -> State:
    return State(tmp_path / "st")


def test_a_job_round_trips_and_each_update_sets_only_what_it_names(state: State) -> None:
    with state.transaction():
        state.jobs.add(job())
    assert state.jobs.get("j-1") == job()
    with state.transaction():
        state.jobs.running("j-1", pid=42, pid_start=7, started_at="2026-01-01T00:00:01Z")
        state.jobs.progress("j-1", {"step": 2, "train_loss": 0.5})
    row = state.jobs.get("j-1")
    assert row is not None and (row.status, row.pid, row.pid_start, row.started_at) == (
        "running", 42, 7, "2026-01-01T00:00:01Z")
    with state.transaction():
        state.jobs.running("j-1", pid=43, pid_start=8)  # found again after a restart: started_at stays
        state.jobs.stopped("j-1", status="interrupted", error="gone", finished_at="2026-01-01T00:00:09Z")
    row = state.jobs.get("j-1")
    assert row is not None and row.started_at == "2026-01-01T00:00:01Z" and row.pid == 43
    assert row.latest_metrics == {"step": 2, "train_loss": 0.5}  # stopping keeps the last progress
    assert (row.status, row.error, row.result, row.exit_code) == ("interrupted", "gone", None, None)
    with state.transaction():
        state.jobs.finished("j-1", status="succeeded", exit_code=0, error=None, result={"adapter_dir": "/a"},
                            latest_metrics=None, finished_at="2026-01-01T00:00:10Z")
        state.jobs.judged("j-1", status="rejected", error="worse")
    row = state.jobs.get("j-1")
    assert row is not None and row.result == {"adapter_dir": "/a"} and row.latest_metrics is None
    assert (row.status, row.error, row.exit_code) == ("rejected", "worse", 0)
    assert state.jobs.get("nope") is None


def test_jobs_list_newest_first_and_by_status(state: State) -> None:
    with state.transaction():
        state.jobs.add(job("j-a", created_at="2026-01-01T00:00:00Z", status="running"))
        state.jobs.add(job("j-b", created_at="2026-01-02T00:00:00Z"))
        state.jobs.add(job("j-c", created_at="2026-01-03T00:00:00Z", status="running"))
    assert [j.job_id for j in state.jobs.recent()] == ["j-c", "j-b", "j-a"]
    assert [j.job_id for j in state.jobs.recent(status="running")] == ["j-c", "j-a"]
    assert [j.job_id for j in state.jobs.recent(limit=1)] == ["j-c"]


def test_a_job_prints_as_the_columns_did(state: State) -> None:
    with state.transaction():
        state.jobs.add(job())
    cols = [r[1] for r in state.conn.execute("PRAGMA table_info(jobs)")]
    row = state.jobs.get("j-1")
    assert row is not None and list(row.as_dict()) == cols
    assert row.as_dict()["params"] == {"backend": "x", "lora": {"r": 8}}


def test_a_model_round_trips_and_its_updates(state: State) -> None:
    with state.transaction():
        assert state.models.next_version() == 1
        state.models.add(model(1))
        state.models.add(model(2, status="pending"))
    assert state.models.get(1) == model(1) and state.models.next_version() == 3
    cols = [r[1] for r in state.conn.execute("PRAGMA table_info(models)")]
    assert list(model(1).as_dict()) == cols
    with state.transaction():
        state.models.attempt_failed(1, status="pending", attempts=1, last_error="down",
                                    next_attempt_at="2026-01-01T01:00:00Z")
    m = state.models.get(1)
    assert m is not None and (m.status, m.attempts, m.last_error, m.next_attempt_at) == (
        "pending", 1, "down", "2026-01-01T01:00:00Z")
    with state.transaction():
        state.models.registered(1, registered_at="2026-01-01T02:00:00Z", ollama_digest="d", attempts=2)
        state.models.deleted(2)
    m = state.models.get(1)
    assert m is not None and (m.status, m.attempts, m.last_error, m.next_attempt_at, m.ollama_digest) == (
        "registered", 2, None, None, "d")
    assert [x.version for x in state.models.all(status="registered")] == [1]
    assert [x.status for x in state.models.all()] == ["registered", "deleted"]


def test_cycles_record_the_last_one_and_count_training_runs(state: State) -> None:
    with state.transaction():
        state.cycles.record(CycleRow("c-1", "2026-01-01T00:00:00Z", "promoted", "ok", {"cycle_id": "c-1"},
                                     trained=True))
        state.cycles.record(CycleRow("c-2", "2026-01-02T00:00:00Z", "waiting", "no data", {"cycle_id": "c-2"}))
    last = state.cycles.last()
    assert last == CycleRow("c-2", "2026-01-02T00:00:00Z", "waiting", "no data", {"cycle_id": "c-2"}, False)
    assert state.cycles.runs_since("2026-01-01T00:00:00Z") == 1
    assert state.cycles.runs_since("2026-01-01T00:00:01Z") == 0


def test_the_service_row_and_the_pending_export(state: State) -> None:
    assert state.service.get() == ServiceRow() and state.service.pending_export() is None
    with state.transaction():
        state.service.set_champion("j-1", dataset_version=3)
        state.service.set_train_backoff(failures=2, until="2026-01-01T00:02:00+00:00")
        state.service.set_latest_model(4)
        state.service.set_previous_latest_model(3)
        state.service.set_last_run_at("2026-01-01T00:00:00+00:00")
        state.service.set_last_ingest_at("2026-01-01T00:00:05Z")
        state.service.set_pending_export(PendingExport("j-1", {"eval_loss_after": 1.0}, 99, 5))
    assert state.service.get() == ServiceRow(
        champion_job="j-1", last_trained_dataset=3, last_run_at="2026-01-01T00:00:00+00:00",
        last_ingest_at="2026-01-01T00:00:05Z", train_failures=2, train_backoff_until="2026-01-01T00:02:00+00:00",
        latest_model=4, previous_latest_model=3)
    assert state.service.pending_export() == PendingExport("j-1", {"eval_loss_after": 1.0}, 99, 5)
    with state.transaction():
        state.service.set_train_backoff(failures=0, until=None)
        state.service.set_latest_model(None)
        state.service.clear_pending_export()
    got = state.service.get()
    assert (got.train_failures, got.train_backoff_until, got.latest_model, got.champion_job) == (0, None, None, "j-1")
    assert state.service.pending_export() is None


def test_one_transaction_spans_the_repositories(state: State) -> None:
    with pytest.raises(RuntimeError), state.transaction():
        state.jobs.add(job())
        state.service.set_champion("j-1", dataset_version=3)
        raise RuntimeError("boom")
    assert state.jobs.get("j-1") is None and state.service.get().champion_job is None
    with state.transaction():
        state.jobs.add(job())
        with pytest.raises(RuntimeError), state.atomic():  # a savepoint undoes only its own block
            state.service.set_champion("j-1", dataset_version=3)
            raise RuntimeError("boom")
    assert state.jobs.get("j-1") is not None and state.service.get().champion_job is None


def _old_database(state_dir: Path, kv: dict[str, str]) -> None:
    """A database at schema v6 (before migration 7), with ``kv`` in its key/value table."""
    state_dir.mkdir(parents=True)
    conn = sqlite3.connect(state_dir / DB_NAME, isolation_level=None)
    for version, script in enumerate(MIGRATIONS[:6], start=1):
        conn.executescript(script)
        conn.execute(f"PRAGMA user_version={version}")
    conn.executemany("INSERT INTO kv (key, value) VALUES (?,?)", kv.items())
    conn.close()


def test_migration_7_carries_the_key_value_state_over(tmp_path: Path) -> None:
    pending = {"job_id": "j-7", "gate": {"eval_loss_after": 1.25, "champion": None}, "pid": 321, "pid_start": 55}
    _old_database(tmp_path / "st", {
        "champion_job": "j-7", "last_trained_dataset": "4", "last_run_at": "2026-01-02T03:04:05+00:00",
        "last_ingest_at": "2026-01-02T03:00:00Z", "train_failures": "3",
        "train_backoff_until": "2026-01-02T04:00:00+00:00", "latest_model": "6", "previous_latest_model": "5",
        "export_pending": json.dumps(pending),
    })
    with State(tmp_path / "st") as st:
        assert st.schema_version == len(MIGRATIONS) == 12
        assert st.service.get() == ServiceRow(
            champion_job="j-7", last_trained_dataset=4, last_run_at="2026-01-02T03:04:05+00:00",
            last_ingest_at="2026-01-02T03:00:00Z", train_failures=3, train_backoff_until="2026-01-02T04:00:00+00:00",
            latest_model=6, previous_latest_model=5)
        assert st.service.pending_export() == PendingExport("j-7", {"eval_loss_after": 1.25, "champion": None},
                                                            321, 55)
        tables = {r[0] for r in st.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "kv" not in tables


def test_migration_7_reads_cleared_values_as_unset(tmp_path: Path) -> None:
    _old_database(tmp_path / "st", {"train_failures": "0", "train_backoff_until": "", "latest_model": "",
                                    "export_pending": ""})
    with State(tmp_path / "st") as st:
        assert st.service.get() == ServiceRow()
        assert st.service.pending_export() is None


def test_migration_7_on_a_database_that_never_set_a_key(tmp_path: Path) -> None:
    _old_database(tmp_path / "st", {})
    with State(tmp_path / "st") as st:
        assert st.service.get() == ServiceRow() and st.service.pending_export() is None
        with st.transaction():
            st.service.set_latest_model(1)
        assert st.service.get().latest_model == 1


def test_migrate_raises_state_error_for_a_newer_schema(tmp_path: Path) -> None:
    State(tmp_path / "st").close()
    conn = sqlite3.connect(tmp_path / "st" / DB_NAME)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(StateError, match="newer than this version knows"):
        State(tmp_path / "st")


def test_migrate_raises_state_error_when_a_migration_fails_and_leaves_nothing_half_done(tmp_path: Path) -> None:
    _old_database(tmp_path / "st", {})
    conn = sqlite3.connect(tmp_path / "st" / DB_NAME)
    conn.execute("CREATE TABLE service (x INTEGER)")  # migration 7 cannot create its table
    conn.close()
    with pytest.raises(StateError, match="cannot migrate the state database") as caught:
        State(tmp_path / "st")
    assert "\n" not in str(caught.value)
    conn = sqlite3.connect(tmp_path / "st" / DB_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 6
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'kv'").fetchone() is not None
    conn.close()


def test_pruned_records_what_retention_removed(state: State) -> None:
    assert state.pruned.keys("job") == set() and state.pruned.freed() == 0
    with state.transaction():
        state.pruned.mark("job", "j-1", at="2026-12-05T00:00:00+00:00", freed=100)
        state.pruned.mark("dataset", "3", at="2026-12-05T00:00:00+00:00", freed=50)
        state.pruned.mark("job", "j-1", at="2026-12-06T00:00:00+00:00", freed=100)  # again: one row
    assert state.pruned.keys("job") == {"j-1"} and state.pruned.keys("dataset") == {"3"}
    assert state.pruned.keys("gguf") == set() and state.pruned.freed() == 150


def test_latest_moves_and_feedback_per_day_for_the_report(state: State) -> None:
    assert state.service.latest_moves() == [] and state.feedback.per_day() == []
    with state.transaction():
        state.service.latest_moved(1, previous=None, how="registered", at="2026-01-01T00:00:00Z")
        state.service.latest_moved(2, previous=1, how="registered", at="2026-01-02T00:00:00Z")
        state.service.latest_moved(1, previous=2, how="rollback", at="2026-01-03T00:00:00Z")
        state.feedback.add([("f.jsonl", 1, "c1", 1, None, None, "2026-01-01T10:00:00", 1),
                            ("f.jsonl", 2, "c2", 0, None, None, "2026-01-01T11:00:00", -1),
                            ("f.jsonl", 3, "c3", None, "good", None, "2026-01-01T12:00:00", 1),
                            ("f.jsonl", 4, "c1", 0, None, None, "2026-01-03T09:00:00", -1)])
    moves = state.service.latest_moves()
    assert [(m.version, m.previous, m.how) for m in moves] == [(1, None, "registered"), (2, 1, "registered"),
                                                               (1, 2, "rollback")]
    assert state.feedback.per_day() == [("2026-01-01", 1, 1, 3), ("2026-01-03", 0, 1, 1)]
