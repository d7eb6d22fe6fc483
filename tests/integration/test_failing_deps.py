"""Failing dependencies (issue 6): the trainer, Ollama, our own disk and SQLite misbehave.

Whatever fails, the cycle ends with one line that says what happened, a failed training backs off before the next
try, a registration Ollama could not take stays ``pending`` (shown by ``status``) and a later cycle registers it,
nothing is half-registered, a full state disk leaves the state intact, and the service stays alive. Real things
throughout: the fake trainer interpreter (a subprocess checking its argv), the Ollama stand-in (a real HTTP server),
a real tmpfs for the disk, real SQLite connections.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import fb, feedback_file, logs_file, need, rec, write_lines
from ollama_standin import StandinServer
from structlog.testing import capture_logs

from daemon import api, cli, settings
from daemon.cycle.pipeline import CycleRequest, CycleResult, run_cycle
from daemon.dataset import builder as dataset
from daemon.demo.storegen import append_records, generate_store
from daemon.state import State, StateError, storage_problem

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_trainer.py"
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture
def converter(tmp_path: Path) -> Path:
    """A llama.cpp checkout as far as the pipeline checks one (the fake exporter never runs the converter)."""
    d = tmp_path / "llama.cpp"
    (d / "gguf-py" / "gguf").mkdir(parents=True)
    (d / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (d / "convert_hf_to_gguf.py").write_text("raise SystemExit('not used')\n")
    return d


@pytest.fixture
def records(store: Path) -> Path:
    write_lines(logs_file(store), [rec(f"e0000000000{i}", quality="good", answer=f"answer {i}") for i in range(6)])
    return store


class Clock:
    """An injected clock for run_cycle (policy and backoff read it; nothing sleeps)."""

    def __init__(self, start: datetime = T0) -> None:
        self.t = start

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


def one_line(text: str | None) -> bool:
    return bool(text) and "\n" not in str(text) and "Traceback" not in str(text)


def make(make_settings: Any, fake_python: Path, base_model: Path, *, mode: str = "ok", export: dict[str, Any] | None
         = None, ollama: dict[str, Any] | None = None, **training: Any) -> settings.Settings:
    s: settings.Settings = make_settings(
        training={"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                  "max_steps": 3, "retry_backoff": 60, "timeout": 60, "env": {"FAKE_TRAINER_MODE": mode}, **training},
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0, "max_runs_per_day": 100},
        dataset={"min_train_examples": 1, "min_eval_examples": 1},
        export=export or {"enabled": False},
        ollama=ollama or {},
    )
    return s


# -- the trainer -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "status", "words"), [
    ("crash", "failed", "trainer error: RuntimeError: boom"),
    ("oom", "failed", "out of memory: CUDA out of memory"),
    ("noresult", "failed", "exited 0 but wrote no result.json"),
    ("garbage_crash", "failed", "trainer error: ValueError: bad batch"),
    ("hang", "timeout", "no result after training.timeout (1s)"),
    ("missing", "failed", "cannot start the trainer"),
])
def test_a_failing_trainer_fails_the_job_in_one_line_then_backs_off(
    make_settings: Any, records: Path, fake_python: Path, base_model: Path, tmp_path: Path, mode: str, status: str,
    words: str,
) -> None:
    python = tmp_path / "no" / "such" / "python" if mode == "missing" else fake_python
    s = make(make_settings, python, base_model, mode=mode, timeout=1)
    clock = Clock()
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None), now=clock)
        assert r.outcome == "train_failed" and r.job_status == status, r.reason
        assert words in r.reason and one_line(r.reason), r.reason
        job = st.jobs.recent()[0]
        assert job.status == status and job.error is not None and one_line(job.error)
        assert words.split(": ")[-1] in job.error
        backoff = datetime.fromisoformat(st.service.get().train_backoff_until or "")
        assert backoff == T0 + timedelta(seconds=60)  # training.retry_backoff, first failure
        # the next try waits for the backoff, even with new data; the service (this loop) is alive and answering
        write_lines(logs_file(records, "2025-12-06"), [rec("e00000000099", quality="good", answer="more")])
        clock.advance(30)
        again = run_cycle(s, st, CycleRequest(None), now=clock)
        assert again.outcome == "skipped" and "backing off after a failed job" in again.reason
        assert len(st.jobs.recent()) == 1 and api.store_status(s, st).conversations["total"] == 7
        # after the backoff, a working trainer trains again and the failure count resets
        clock.advance(31)
        fixed = make(make_settings, fake_python, base_model, mode="ok")
        ok = run_cycle(fixed, st, CycleRequest(None), now=clock)
        assert ok.outcome == "promoted", ok.reason
        assert st.service.get().train_failures == 0 and st.service.get().train_backoff_until is None


def test_backoff_doubles_with_each_failure(make_settings: Any, records: Path, fake_python: Path,
                                           base_model: Path) -> None:
    s = make(make_settings, fake_python, base_model, mode="oom")
    clock = Clock()
    with State(s.state_dir()) as st:
        waits = []
        for _ in range(3):
            r = run_cycle(s, st, CycleRequest(None), now=clock)
            assert r.outcome == "train_failed" and "out of memory" in r.reason
            until = datetime.fromisoformat(st.service.get().train_backoff_until or "")
            waits.append((until - clock()).total_seconds())
            clock.t = until + timedelta(seconds=1)
        assert waits == [60, 120, 240]


def test_garbage_metrics_do_not_fail_a_job_that_succeeded(make_settings: Any, records: Path, fake_python: Path,
                                                          base_model: Path) -> None:
    s = make(make_settings, fake_python, base_model, mode="garbage")
    seen: list[tuple[str, str]] = []
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None), progress=lambda p, d: seen.append((p, d)))
        assert r.outcome == "promoted", r.reason
    last = [d for p, d in seen if p == "training" and "step" in d][-1]
    # the plan's steps (issue 19), all done; the fake trainer's lines have no time: no pace, yet no steps left
    assert re.search(r"step (\d+)/\1 \(100%\), 100 tokens/s, loss \d+\.\d{4}, ETA 0s$", last), last


def test_the_real_service_stays_alive_when_the_trainer_crashes(tmp_path: Path, records: Path, fake_python: Path,
                                                                base_model: Path) -> None:
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(yaml.safe_dump({
        "store": {"root": str(records)}, "state": {"dir": str(tmp_path / "st")},
        "service": {"runtime_dir": str(tmp_path / "run")}, "log": {"format": "json"},
        "training": {"python": str(fake_python), "base_model": str(base_model), "max_steps": 2,
                     "env": {"FAKE_TRAINER_MODE": "crash"}, "retry_backoff": 3600},
        "dataset": {"min_train_examples": 1, "min_eval_examples": 1}, "export": {"enabled": False},
        "policy": {"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATOS_RETRAIN_")}

    def cli(*args: str) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), *args, "--json"],
                             capture_output=True, text=True, timeout=120, env=env)
        assert "Traceback" not in out.stderr, out.stderr
        res: dict[str, Any] = json.loads(out.stdout)
        return res

    svc = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(cfg), "run"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, env=env)
    try:
        assert svc.stdout is not None
        for raw in svc.stdout:  # the start-up cycle trains (and fails) first
            ev = json.loads(raw)
            if ev["event"] == "cycle.summary":
                assert ev["outcome"] == "train_failed" and "RuntimeError: boom" in ev["reason"], ev
                break
        first = cli("trigger", "--wait")  # forced: runs despite the backoff, fails the same way
        assert first["outcome"] == "train_failed" and one_line(first["reason"]), first
        status = cli("status")
        assert status["service"]["pid"] == svc.pid and status["last_cycle"]["outcome"] == "train_failed"
        assert svc.poll() is None
    finally:
        svc.send_signal(signal.SIGTERM)
        assert svc.wait(60) == 0
        if svc.stdout is not None:
            svc.stdout.close()
    with State(tmp_path / "st") as st:
        assert [j.status for j in st.jobs.recent()] == ["failed", "failed"]
        assert st.service.get().train_failures == 2


# -- Ollama ------------------------------------------------------------------------------------------------------


@pytest.fixture
def exporting(make_settings: Any, fake_python: Path, base_model: Path, converter: Path,
              ollama_standin: StandinServer) -> Callable[..., settings.Settings]:
    def build(**ollama: Any) -> settings.Settings:
        return make(make_settings, fake_python, base_model, export={"llama_cpp_dir": str(converter), "timeout": 60},
                    ollama={"host": ollama_standin.url, "model_name": "chatos", "timeout_s": 5, "retry_backoff": 60,
                            **ollama})
    return build


def tags(srv: StandinServer) -> dict[str, str]:
    return {m["name"]: m["digest"] for m in httpx.get(srv.url + "/api/tags").json()["models"]}


@pytest.mark.parametrize("fault", [{"down": True}, {"status_500": True}, {"slow_s": 3.0}, {"error_mid_stream": True},
                                   {"disk_full": True}, {"no_success": True}], ids=lambda f: next(iter(f)))
def test_ollama_failing_leaves_a_pending_registration_that_a_later_cycle_registers(
    exporting: Callable[..., settings.Settings], records: Path, ollama_standin: StandinServer, fault: dict[str, Any],
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    s = exporting(timeout_s=1)  # 'slow' answers after 3 s: past the timeout
    clock = Clock()
    ollama_standin.set_faults(**fault)
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None), now=clock)
        assert r.outcome == "pending_registration", r.reason
        assert "artifact kept, will retry" in r.reason and one_line(r.reason), r.reason
        (m,) = st.models.all()
        assert m.status == "pending" and m.last_error is not None and one_line(m.last_error) and m.attempts == 1
        assert datetime.fromisoformat(m.next_attempt_at or "") == T0 + timedelta(seconds=60)
        assert Path(m.gguf_path).is_file()  # the verified artifact is kept
        pending = api.store_status(s, st).pending_registrations
        assert pending and pending[0]["version"] == 1 and pending[0]["tag"] == "chatos:v1"
        cfg = tmp_path / "retrain.yaml"  # what `chatos-retrain status` shows (no service running: state only)
        cfg.write_text(yaml.safe_dump(s.model_dump(mode="json")))
        capsys.readouterr()
        assert cli.main(["--config", str(cfg), "status", "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)["store"]["pending_registrations"]
        assert [(p["tag"], p["last_error"]) for p in shown] == [("chatos:v1", m.last_error)]
        ollama_standin.reset_faults()
        assert tags(ollama_standin) == {} and st.service.get().latest_model is None  # nothing half-registered
        # before the backoff: not retried; after it, the next cycle (no new data) registers it and moves latest
        clock.advance(30)
        assert run_cycle(s, st, CycleRequest(set()), now=clock).model_tag is None
        assert st.models.get(1).status == "pending"  # type: ignore[union-attr]
        clock.advance(31)
        later = run_cycle(s, st, CycleRequest(set()), now=clock)
        assert later.counts["registrations_retried"] == ["v1:registered"] and later.model_tag == "chatos:v1"
        row = st.models.get(1)
        assert row is not None and row.status == "registered" and row.attempts == 2
        t = tags(ollama_standin)
        assert t["chatos:latest"] == t["chatos:v1"] == row.ollama_digest and st.service.get().latest_model == 1
        assert api.store_status(s, st).pending_registrations == []


def test_a_digest_mismatch_is_a_hard_failure_and_the_next_model_registers(
    exporting: Callable[..., settings.Settings], records: Path, ollama_standin: StandinServer,
) -> None:
    s = exporting()
    with State(s.state_dir()) as st:
        ollama_standin.set_faults(digest_mismatch=True)
        r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "register_failed" and "digest mismatch" in r.reason and one_line(r.reason), r.reason
        assert st.models.get(1).status == "failed"  # type: ignore[union-attr]
        ollama_standin.reset_faults()
        assert tags(ollama_standin) == {} and st.service.get().latest_model is None
        assert run_cycle(s, st, CycleRequest(set())).counts.get("registrations_retried") is None  # not retried
        r2 = run_cycle(s, st, CycleRequest(None, forced=True))
        assert r2.outcome == "registered" and r2.model_tag == "chatos:v2", r2.reason
        assert set(tags(ollama_standin)) == {"chatos:v2", "chatos:latest"} and st.service.get().latest_model == 2


@pytest.mark.parametrize(("mode", "words"), [("fail", "the GGUF converter failed: convert_hf_to_gguf.py failed"),
                                             ("badtemplate", "tokenizer.chat_template differs"),
                                             ("hang", "timed out after 1s"),
                                             ("engine", "the llama.cpp engine check failed: llama.cpp could not "
                                                        "load the GGUF: tensor 'blk.0.attn_q.weight' data is not"),
                                             ("rambles", "engine check failed: llama.cpp's smoke answer is empty; "
                                                         "llama.cpp's smoke answer did not end on a stop")])
def test_a_failing_export_registers_nothing(make_settings: Any, records: Path, fake_python: Path, base_model: Path,
                                            converter: Path, ollama_standin: StandinServer, mode: str,
                                            words: str) -> None:
    s = make(make_settings, fake_python, base_model, export={"llama_cpp_dir": str(converter), "timeout": 1,
                                                             "engine": {"require_stop": True}},
             ollama={"host": ollama_standin.url, "model_name": "chatos"})
    s.training.env["FAKE_EXPORT_MODE"] = mode
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "export_failed" and words in r.reason and one_line(r.reason), r.reason
        assert st.models.all() == [] and tags(ollama_standin) == {}
        assert st.service.pending_export() is None  # failed on its own: not resumed by the next cycle


# -- our own disk ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root only); skipped where mounting is not allowed (a failure under ``CI=true``, run as root)."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        need(False, f"cannot mount a tmpfs: {exc}")
        raise  # unreachable: need() raised
    need(out.returncode == 0, f"cannot mount a tmpfs (needs root / CAP_SYS_ADMIN): {out.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == 28  # ENOSPC
    finally:
        os.close(fd)
    return filler


def snapshot(st: State) -> dict[str, Any]:
    return {**st.conversations.counts(), "datasets": [d.version for d in st.datasets.all()],
            "integrity": st.conn.execute("PRAGMA integrity_check").fetchone()[0]}


def test_a_full_state_disk_is_one_clear_line_and_state_survives(make_settings: Any, tmp_path: Path, store: Path,
                                                                small_disk: Path) -> None:
    truth = generate_store(store, 120, days=3, seed=3, extras=False)
    s = make_settings(state={"dir": str(small_disk / "state")},
                      dataset={"min_train_examples": 1, "min_eval_examples": 1},
                      policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0})
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"root": str(store)}, "state": {"dir": str(small_disk / "state")}}))
    with State(s.state_dir()) as st:
        first = run_cycle(s, st, CycleRequest(None))
        assert first.outcome == "not_configured" and first.dataset_version == 1, first.reason
        before = snapshot(st)
        assert before["conversations"] == 120 and before["feedback_events"] == truth.feedback_events
        filler = fill(small_disk)
        new = append_records(store, 80, seed=9)
        write_lines(feedback_file(store), [fb(cid) for cid in new[:10]])
        with capture_logs() as logs:
            r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "error" and one_line(r.reason), r.reason
        assert r.reason.startswith(f"cycle failed: cannot write the state dir {small_disk / 'state'}: "), r.reason
        failed = [e for e in logs if e["event"] == "cycle.failed"]
        assert failed and "exc_info" not in failed[0] and failed[0]["log_level"] == "error"  # no traceback
        assert snapshot(st) == before  # the ingest transaction rolled back whole
        # a dataset build that has to write (other filters: a new eligible set) on a full disk: the same kind of
        # line, and no version appears
        with pytest.raises((StateError, OSError)) as caught:
            dataset.build(st, s.dataset.model_copy(update={"include_unrated": True}), str(store))
        problem = storage_problem(caught.value, st.dir)
        assert problem is not None and one_line(problem) and str(st.dir) in problem
        assert snapshot(st) == before and not (st.dir / "datasets" / "v2").exists()
        # the CLI says it in one line too
        out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "ingest"], capture_output=True,
                             text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                         if not k.startswith("CHATOS_RETRAIN_")})
        assert out.returncode == 1 and out.stderr.startswith("chatos-retrain: cannot write the state dir"), out
        assert len(out.stderr.strip().splitlines()) == 1
        assert snapshot(st) == before
        # space returns: the next run completes and counts everything exactly once
        filler.unlink()
        ok = run_cycle(s, st, CycleRequest(None))
        assert ok.outcome == "not_configured" and ok.dataset_version == 2, ok.reason
        after = snapshot(st)
        assert after["integrity"] == "ok" and after["conversations"] == 200
        assert after["feedback_events"] == truth.feedback_events + 10 and after["datasets"] == [1, 2]
        for d in st.datasets.all():
            assert dataset.verify(Path(d.path)) == []
        assert not [p.name for p in (st.dir / "datasets").iterdir() if p.name.startswith(".tmp-")]


def test_a_state_dir_that_cannot_be_opened_is_one_line(tmp_path: Path, store: Path, small_disk: Path) -> None:
    fill(small_disk)
    with pytest.raises(StateError, match=r"^cannot write the state dir .*small-disk/state: "):
        State(small_disk / "state")
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"root": str(store)}, "state": {"dir": str(small_disk / "state")}}))
    for verb in ("status", "run"):  # the service cannot run without its state: one line, exit 1 (systemd retries)
        out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), verb], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.splitlines()[-1].startswith("chatos-retrain: cannot write the state dir"), out.stderr


# -- SQLite locks ------------------------------------------------------------------------------------------------


def test_readers_and_a_held_write_lock_are_waited_for_not_errors(make_settings: Any, tmp_path: Path,
                                                                  store: Path) -> None:
    generate_store(store, 300, days=3, seed=4, extras=False)
    s = make_settings(dataset={"min_train_examples": 1, "min_eval_examples": 1},
                      policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0})
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"root": str(store)}, "state": {"dir": str(s.state_dir())},
                                   "service": {"runtime_dir": str(tmp_path / "run")}}))
    with State(s.state_dir()) as st:
        api.ingest(s, st)
    db = s.state_dir() / "state.sqlite3"
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    held = reader.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]  # a read snapshot stays open
    locker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the write lock for a moment
    release = threading.Timer(1.0, lambda: locker.execute("COMMIT"))
    release.start()
    append_records(store, 50, seed=8)
    statuses: list[subprocess.CompletedProcess[str]] = []
    results: list[CycleResult] = []

    def cycle() -> None:
        with State(s.state_dir()) as st:
            results.append(run_cycle(s, st, CycleRequest(None)))

    worker = threading.Thread(target=cycle)
    t0 = time.monotonic()
    worker.start()
    while worker.is_alive() or not statuses:  # `status` (state only: no service) while the cycle writes
        statuses.append(subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "status", "--json"],
                                       capture_output=True, text=True, timeout=60))
    worker.join()
    release.join()
    assert time.monotonic() - t0 >= 1.0  # the cycle waited for the write lock (busy_timeout), it did not fail
    assert results[0].outcome == "not_configured" and results[0].dataset_version == 1, results[0].reason
    assert all(p.returncode == 0 and "locked" not in p.stderr for p in statuses), [p.stderr for p in statuses]
    assert all(json.loads(p.stdout)["store"]["conversations"]["total"] in (300, 350) for p in statuses)
    assert reader.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == held == 300  # its snapshot held
    reader.execute("COMMIT")
    assert reader.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 350
    reader.close()
    locker.close()
