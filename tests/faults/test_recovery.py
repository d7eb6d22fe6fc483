"""What the crash harness found, pinned by fast tests: a stopped export is resumed by the next cycle (not left as a
champion without a model), a trainer whose pid never reached state is found again, and a job that finished while no
service watched keeps its result instead of being thrown away as interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import logs_file, rec, write_lines
from ollama_standin import StandinServer

from daemon import proc
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.state import JobRow, PendingExport, State
from daemon.train import runner

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_trainer.py"


@pytest.fixture
def world(tmp_path: Path, store: Path) -> dict[str, Path]:
    fake = tmp_path / "bin" / "fake-python"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    fake.chmod(0o755)
    base = tmp_path / "models" / "tiny"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    conv = tmp_path / "llama.cpp"
    (conv / "gguf-py" / "gguf").mkdir(parents=True)
    (conv / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (conv / "convert_hf_to_gguf.py").write_text("raise SystemExit('not used')\n")
    write_lines(logs_file(store), [rec(f"f0000000000{i}", quality="good", answer=f"a{i}") for i in range(5)])
    return {"python": fake, "base": base, "converter": conv}


def settings_for(make_settings: Any, world: dict[str, Path], url: str, **env: str) -> Any:
    return make_settings(
        training={"python": str(world["python"]), "base_model": str(world["base"]), "backend": "transformers",
                  "max_steps": 2, "env": {"FAKE_TRAINER_MODE": "ok", **env}},
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0},
        dataset={"min_train_examples": 1, "min_eval_examples": 1},
        export={"llama_cpp_dir": str(world["converter"])},
        ollama={"host": url, "model_name": "chatos", "timeout_s": 5},
    )


def test_an_export_stopped_by_the_service_is_resumed_by_the_next_cycle(
    make_settings: Any, world: dict[str, Path], ollama_standin: StandinServer
) -> None:
    s = settings_for(make_settings, world, ollama_standin.url, FAKE_EXPORT_MODE="hang")
    stop = threading.Event()
    with State(s.state_dir()) as st:
        timer = threading.Timer(1.5, stop.set)  # SIGTERM arrives while the merge/convert child runs
        timer.start()
        r = run_cycle(s, st, CycleRequest(None), stop=stop)
        timer.join()
        assert r.outcome == "export_failed" and "the service is stopping" in r.reason, r.reason
        assert st.models.all() == [] and st.service.get().champion_job == r.job_id
        pending = st.service.pending_export()
        assert pending is not None and pending.job_id == r.job_id and pending.pid  # the child is remembered
        assert not proc.alive(pending.pid, pending.pid_start)  # and was stopped with the service
        ok = settings_for(make_settings, world, ollama_standin.url)
        nxt = run_cycle(ok, st, CycleRequest(set()))  # no new data: only the resumed export
        assert nxt.counts["export_resumed"] == {"job_id": r.job_id, "outcome": "registered",
                                                "model_tag": "chatos:v1"}, nxt.counts
        assert [(m.job_id, m.status) for m in st.models.all()] == [(r.job_id, "registered")]
        assert st.service.pending_export() is None and nxt.model_tag == "chatos:v1"
        assert run_cycle(ok, st, CycleRequest(set())).counts.get("export_resumed") is None  # once only


def test_a_stray_export_child_is_stopped_before_the_export_runs_again(
    make_settings: Any, world: dict[str, Path], ollama_standin: StandinServer
) -> None:
    s = settings_for(make_settings, world, ollama_standin.url)
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "registered", r.reason
        # as if the service was SIGKILLed while a merge/convert child of the champion still ran
        stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
        with st.transaction():
            st.conn.execute("DELETE FROM models")
            st.service.set_latest_model(None)
            st.service.set_pending_export(PendingExport(r.job_id, {}, stray.pid,
                                                        proc.process_start_time(stray.pid)))
        nxt = run_cycle(s, st, CycleRequest(set()))
        assert stray.wait(15) is not None  # stopped (SIGTERM to its group) before the export ran again
        assert nxt.counts["export_resumed"]["outcome"] == "registered", nxt.counts


def test_reattach_finds_a_trainer_whose_pid_never_reached_state(state: State, tmp_path: Path,
                                                                 world: dict[str, Path]) -> None:
    job_dir = tmp_path / "state" / "jobs" / "j-lost"
    job_dir.mkdir(parents=True)
    env = {**os.environ, "CHATOS_JOB_ID": "j-lost"}
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"], env=env, start_new_session=True)
    row: dict[str, Any] = {"job_id": "j-lost", "cycle_id": None, "dataset_version": 1, "status": "starting",
           "job_dir": str(job_dir), "config_path": str(job_dir / "config.yaml"), "log_path": str(job_dir / "job.log"),
           "metrics_path": str(job_dir / "metrics.jsonl"), "result_path": str(job_dir / "result.json"),
           "params": {}, "created_at": "2026-11-25T12:00:00Z"}
    with state.transaction():
        state.jobs.add(JobRow(**row))
    live, lost = runner.reattach(state)
    assert [j.id for j in live] == ["j-lost"] and lost == [] and live[0].pid == proc.pid
    assert state.jobs.get("j-lost").status == "running"  # type: ignore[union-attr]
    (job_dir / "result.json").write_text('{"adapter_dir": "/x", "eval_loss_after": 1.0}')
    out = runner.supervise(state, live[0], timeout_s=30, cancel=threading.Event(), stop=threading.Event(),
                           tick_s=0.05)
    proc.wait()
    assert out.status == "succeeded" and out.result == {"adapter_dir": "/x", "eval_loss_after": 1.0}


def test_a_job_that_finished_while_no_service_watched_keeps_its_result(state: State, tmp_path: Path) -> None:
    job_dir = tmp_path / "state" / "jobs" / "j-done"
    job_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (job_dir / "result.json").write_text('{"adapter_dir": "/y", "eval_loss_after": 0.5}')
    with state.transaction():
        state.jobs.add(JobRow(**{"job_id": "j-done", "dataset_version": 1, "status": "running", "pid": dead.pid,
                       "pid_start": 1, "job_dir": str(job_dir), "config_path": "c", "log_path": "l",
                       "metrics_path": str(job_dir / "metrics.jsonl"), "result_path": str(job_dir / "result.json"),
                       "params": {}, "created_at": "2026-11-25T12:00:00Z"}))
        state.jobs.add(JobRow(**{"job_id": "j-gone", "dataset_version": 1, "status": "running", "pid": dead.pid,
                       "pid_start": 1, "job_dir": str(job_dir), "config_path": "c", "log_path": "l",
                       "metrics_path": "m", "result_path": str(tmp_path / "none.json"), "params": {},
                       "created_at": "2026-11-25T12:00:01Z"}))
    live, lost = runner.reattach(state)
    assert [j.id for j in live] == ["j-done"] and lost == ["j-gone"]
    t0 = time.monotonic()
    out = runner.supervise(state, live[0], timeout_s=30, cancel=threading.Event(), stop=threading.Event())
    assert out.status == "succeeded" and out.result == {"adapter_dir": "/y", "eval_loss_after": 0.5}
    assert time.monotonic() - t0 < 5 and state.jobs.get("j-gone").status == "interrupted"  # type: ignore[union-attr]
