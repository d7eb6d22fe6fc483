"""The cold-ingest parse worker (a child process that parses while this one writes): same state as parsing here,
and every way it can fail (cannot start, dies, the file changes under it) falls back to parsing here, losing
nothing. Real child processes, started through proc.spawn_piped."""

from __future__ import annotations

import errno
import json
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import fb, feedback_file, logs_file, rec, write_lines
from structlog.testing import capture_logs

from daemon import proc
from daemon.demo.storegen import generate_store
from daemon.ingest import ingestor as ingest
from daemon.ingest import worker as parse_worker
from daemon.ingest.ingestor import Ingestor
from daemon.state import State

TABLES = {
    "conversations": "SELECT cid, rank, messages, mode, model, quality, thumbs_up, inline_score, inline_rated, usable,"
                     " started_at, src_path, src_offset, src_len, deleted, rev FROM conversations ORDER BY cid",
    "sightings": "SELECT p.path, s.cid, s.rank FROM sightings s JOIN paths p ON p.id = s.file ORDER BY 1, 2",
    "feedback": "SELECT path, line, cid, thumbs_up, quality, note, ts, score FROM feedback ORDER BY path, line",
    "labels": "SELECT cid, score, thumbs_up, quality, ts FROM labels ORDER BY cid",
    "rejects": "SELECT path, line, reason, line_hash FROM rejects ORDER BY path, line",
    "files": "SELECT path, kind, size, offset, lines, head_len, head_hash, tail_len, tail_hash FROM files"
             " ORDER BY path",
}


def dump(state_dir: Path) -> dict[str, list[tuple[Any, ...]]]:
    db = sqlite3.connect(state_dir / "state.sqlite3")
    try:
        return {name: db.execute(sql).fetchall() for name, sql in TABLES.items()}
    finally:
        db.close()


@pytest.fixture
def hostile_store(store: Path) -> Path:
    """A generated store plus the lines a reader must survive, spread over files of every kind."""
    generate_store(store, 300, days=3, seed=5, assistant_words=(5, 30))
    day = logs_file(store, "2026-11-20")
    write_lines(day, [rec("aaaaaaaaaaa1", user="café 😀 \u2028"), rec("aaaaaaaaaaa2", user="  ", answer="x")])
    with day.open("a", encoding="utf-8") as f:
        f.write('{"not json\n')
        f.write('[1, 2]\n')
        f.write(json.dumps(rec("aaaaaaaaaaa3", user="\ud800 lone")) + "\n")  # a lone surrogate escape
        f.write(json.dumps(rec("aaaaaaaaaaa4", thumbs_up="yes")) + "\n")
        f.write("x" * 5000 + "\n")  # over the line cap set below
        f.write(json.dumps(rec("aaaaaaaaaaa5"))[:50])  # a partial last line: waits for its newline
    with (store / "training_data" / "training_2026-11-20.jsonl").open("a", encoding="ascii") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                            "metadata": {"conversation_id": "aaaaaaaaaaa1", "quality": "good"}}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "q"}],
                            "metadata": {"conversation_id": "bbbbbbbbbbb1", "mode": 5}}) + "\n")
    write_lines(feedback_file(store, "2026-11-20"), [fb("aaaaaaaaaaa1"), fb("aaaaaaaaaaa2", thumbs_up=False,
                                                                          ts="2026-11-20T01:02:03+02:00")])
    with feedback_file(store, "2026-11-20").open("a") as f:
        f.write('{"conversation_id": "aaaaaaaaaaa1", "quality": "stellar", "timestamp": "2026-11-20T10:00:00"}\n')
    return store


class Spawns:
    """proc.spawn_piped, counted, with something done to each child right after it starts."""

    def __init__(self, then: Callable[[subprocess.Popen[bytes]], None] | None = None) -> None:
        self.then = then
        self.count = 0

    def __call__(self, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        self.count += 1
        child = proc.spawn_piped(argv)
        if self.then is not None:
            self.then(child)
        return child


def scan(state_dir: Path, root: Path, spawn: Callable[[Sequence[str]], Any] | None = None) -> ingest.IngestReport:
    st = State(state_dir)
    try:
        return Ingestor(st, root, max_line_bytes=4096, spawn=spawn).scan()
    finally:
        st.close()


def reference(tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The state a scan gives when it parses everything itself."""
    with monkeypatch.context() as m:
        m.setattr(ingest, "PARALLEL_BYTES", 0)
        scan(tmp_path / "ref", root)
    return dump(tmp_path / "ref")


@pytest.fixture
def worker_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest, "PARALLEL_BYTES", 1)  # every new file goes to the worker


def test_worker_gives_the_same_state_as_parsing_here(
    hostile_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_on: None
) -> None:
    want = reference(tmp_path, hostile_store, monkeypatch)
    spawns = Spawns()
    with capture_logs() as logs:
        report = scan(tmp_path / "w", hostile_store, spawns)
    assert spawns.count == 1
    assert not [e for e in logs if e["event"].startswith("ingest.parse_worker")]
    got = dump(tmp_path / "w")
    assert got == want
    assert report.rejected == len(want["rejects"]) >= 7
    assert {r[0] for r in got["conversations"]} >= {"aaaaaaaaaaa1", "aaaaaaaaaaa2"}
    assert "aaaaaaaaaaa5" not in {r[0] for r in got["conversations"]}  # still partial
    # The next scan reads only what is new, whoever parsed the first one.
    with logs_file(hostile_store, "2026-11-20").open("a") as f:
        f.write(json.dumps(rec("aaaaaaaaaaa5"))[50:] + "\n")
    assert scan(tmp_path / "w", hostile_store, spawns).conversations == 1
    assert spawns.count == 1  # nothing new to hand over: no worker


def test_a_worker_that_cannot_start_is_a_warning(
    hostile_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_on: None
) -> None:
    want = reference(tmp_path, hostile_store, monkeypatch)

    def refuse(argv: Sequence[str]) -> Any:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    with capture_logs() as logs:
        scan(tmp_path / "w", hostile_store, refuse)
    assert [e["reason"] for e in logs if e["event"] == "ingest.parse_worker_unavailable"] == [
        "Resource temporarily unavailable"]
    assert dump(tmp_path / "w") == want


def test_a_worker_dead_before_it_takes_its_tasks_is_a_warning(
    hostile_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_on: None
) -> None:
    want = reference(tmp_path, hostile_store, monkeypatch)

    def kill(proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait()

    spawns = Spawns(kill)
    with capture_logs() as logs:
        scan(tmp_path / "w", hostile_store, spawns)
    assert spawns.count == 1
    assert [(e["event"], e["reason"]) for e in logs if e["event"].startswith("ingest.parse_worker")] == [
        ("ingest.parse_worker_unavailable", "Broken pipe")]
    assert dump(tmp_path / "w") == want


def test_a_worker_dying_at_a_fault_point_loses_nothing(
    hostile_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_on: None
) -> None:
    """The worker dies (as kill -9 would) after it has sent some files: those are used, the rest parsed here."""
    want = reference(tmp_path, hostile_store, monkeypatch)
    monkeypatch.setenv("CHATOS_RETRAIN_FAULT", "parse_worker.file@4")  # read by the child's daemon.faults
    with capture_logs() as logs:
        scan(tmp_path / "w", hostile_store)
    assert [e["event"] for e in logs if e["event"].startswith("ingest.parse_worker")] == ["ingest.parse_worker_stopped"]
    assert dump(tmp_path / "w") == want


def test_a_file_rewritten_after_the_worker_read_it_is_read_again_here(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker_on: None
) -> None:
    """The worker reads first; ChatOS then rewrites the file in place (a chat deleted, another added). The cursor
    hashes of what the worker parsed do not match the file any more, so this process reads the file itself."""
    day = logs_file(store)
    write_lines(day, [rec(f"{i:012x}") for i in range(20)])
    write_lines(logs_file(store, "2025-12-06"), [rec(f"{i:012x}") for i in range(100, 110)])

    started = parse_worker.ParseWorker.__init__

    def start_then_rewrite(self: Any, *args: Any, **kw: Any) -> None:
        started(self, *args, **kw)
        self._proc.wait(timeout=60)  # it has parsed everything: a small store's frames all sit in the pipe
        with day.open("r+") as f:  # same inode, new content
            f.truncate(0)
            f.write("".join(json.dumps(rec(f"{i:012x}")) + "\n" for i in [*range(1, 20), 999]))

    monkeypatch.setattr(parse_worker.ParseWorker, "__init__", start_then_rewrite)
    with capture_logs() as logs:
        scan(tmp_path / "w", store)
    assert not [e for e in logs if e["event"].startswith("ingest.parse_worker")]  # a fallback, not a failure
    got = dump(tmp_path / "w")
    live = {r[0] for r in got["conversations"] if not r[14]}
    assert live == {f"{i:012x}" for i in [*range(1, 20), 999, *range(100, 110)]}
    files = {r[0]: r for r in got["files"]}
    assert files[str(day)][3] == day.stat().st_size  # the cursor is at the end of the new content


def _build_dir(root: Path, state_dir: Path, make_settings: Any, worker: bool, monkeypatch: pytest.MonkeyPatch
               ) -> tuple[list[str], dict[str, bytes], list[tuple[Any, ...]]]:
    """Ingest ``root`` through api.ingest (the worker making cache entries, or not), add a late feedback event and
    ingest again, then build: the ids the build made entries for, the dataset's files, and the cache entries as
    they were before the build."""
    from daemon import api
    from daemon.dataset import examples

    s = make_settings(**{"state": {"dir": str(state_dir)}, "store": {"root": str(root)},
                         "dataset": {"include_unrated": False, "min_score": 1}})
    made: list[str] = []
    real = examples.cache_entry

    def counted(cid: str, *a: Any, **kw: Any) -> Any:
        made.append(cid)
        return real(cid, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(ingest, "PARALLEL_BYTES", 1 if worker else 0)
        with State(s.state_dir()) as st:
            api.ingest(s, st)
            write_lines(feedback_file(root, "2026-11-30"), [fb("ccccccccccc3")])  # after the worker's guesses
            api.ingest(s, st)
            entries = st.conn.execute("SELECT cid, rev, cfg, dedup, pii, line, bucket FROM examples ORDER BY cid"
                                      ).fetchall()
            m.setattr(examples, "cache_entry", counted)
            res = api.build_dataset(s, st, ingest_first=False)
    files = {p.name: p.read_bytes() for p in sorted(Path(str(res.path)).iterdir())}
    files["manifest.json"] = json.dumps({k: v for k, v in json.loads(files["manifest.json"]).items()
                                         if k not in ("created_at", "sources", "store_root")}).encode()
    return made, files, entries


def test_worker_made_cache_entries_give_the_same_dataset(
    store: Path, tmp_path: Path, make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker makes the build's cache entries for the conversations it expects to be eligible (from the
    feedback it parsed first): the build then makes almost none itself, and writes the same files. Covers lines
    that are not the stored messages (a system message dropped, PII scrubbed) and a missed guess (feedback that
    arrives after the worker ran: the build makes that entry)."""
    generate_store(store, 400, days=2, seed=9, assistant_words=(5, 30))
    write_lines(logs_file(store, "2026-11-21"), [
        rec("ccccccccccc1", user="mail me at a@b.co"),
        {**rec("ccccccccccc2"), "messages": [{"role": "system", "content": "Be brief."}, *rec("x")["messages"]]},
        rec("ccccccccccc3", user="late feedback"),
    ])
    write_lines(feedback_file(store, "2026-11-21"), [fb("ccccccccccc1"), fb("ccccccccccc2")])
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    made_ref, want, _ = _build_dir(copy, tmp_path / "ref", make_settings, False, monkeypatch)
    made, got, entries = _build_dir(store, tmp_path / "w", make_settings, True, monkeypatch)
    assert len(made_ref) > 100  # without the worker, the build makes every entry
    assert len(entries) > 100 and made == ["ccccccccccc3"]  # with it, only the one it could not foresee
    by_cid = {e[0]: e for e in entries}
    assert by_cid["ccccccccccc1"][4] == '{"email": 1}' and by_cid["ccccccccccc1"][5] is not None  # scrubbed line
    assert by_cid["ccccccccccc2"][5] is not None  # the system message dropped
    assert got == want
