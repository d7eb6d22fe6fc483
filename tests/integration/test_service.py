"""The service as a real subprocess: sd_notify, cycles from file changes, control socket, reload, signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import fb, feedback_file, logs_file, rec, write_lines
from service_proc import Proc

from daemon.service import control
from daemon.state import State


@pytest.fixture
def service_env(tmp_path: Path, store: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(extra: str = "", env: dict[str, str] | None = None) -> Proc:
        cfg = tmp_path / "retrain.yaml"
        cfg.write_text(
            f"store:\n  root: {store}\nstate:\n  dir: {tmp_path / 'state'}\n"
            "watch:\n  settle_s: 0.3s\n  max_wait_s: 2s\n  selftest_timeout_s: 2s\n"
            "policy:\n  min_new_examples: 3\n  min_total_examples: 3\n  cooldown: 0s\n"
            "dataset:\n  min_train_examples: 2\n  min_eval_examples: 1\n"
            "service:\n  stop_timeout_s: 10s\n"
            "log:\n  format: json\n" + extra
        )
        p = Proc(tmp_path, cfg, env)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.close()


def _ready(p: Proc) -> None:
    p.wait_for(lambda: p.notice("READY=1"), "READY=1")


def test_ready_status_watchdog_and_a_cycle_from_appended_feedback(service_env: Any, store: Path,
                                                                  tmp_path: Path) -> None:
    write_lines(logs_file(store), [rec(f"a0000000000{i}", answer=f"answer {i}") for i in range(5)])
    p = service_env()
    _ready(p)
    scan = p.events("service.startup_scan")
    assert scan and scan[0]["conversations"] == 5  # READY came after the start-up scan
    assert p.notice("STATUS=")
    first = p.wait_for(lambda: p.events("cycle.summary"), "the start-up cycle")[0]
    assert first["decision"] == "wait" and "0/3 new rated examples" in first["reason"]
    assert first["cycle_id"].startswith("c-")
    p.wait_for(lambda: p.notice("WATCHDOG=1"), "a watchdog ping", timeout=5)
    # feedback arrives: one debounced batch -> a cycle that decides to train and builds a dataset
    write_lines(feedback_file(store), [fb(f"a0000000000{i}", True) for i in range(5)])
    summary = p.wait_for(lambda: [e for e in p.events("cycle.summary") if e["decision"] == "train"], "a train cycle")[0]
    assert summary["dataset_version"] == 1 and summary["outcome"] == "not_configured"
    assert "training not configured" in summary["reason"]
    cycle_lines = [e for e in p.lines if e.get("cycle_id") == summary["cycle_id"]]
    assert {"cycle.started", "cycle.decided", "dataset.built", "cycle.summary"} <= {e["event"] for e in cycle_lines}
    assert all({"event", "level", "timestamp"} <= set(e) for e in p.lines)
    assert p.wait_for(lambda: [n for n in p.notice("STATUS=idle") if "training not configured" in n], "idle status")
    # live status over the control socket
    live = control.request(tmp_path / "state" / "control.sock", {"cmd": "status"}, timeout=10)
    assert live["service"]["phase"] == "idle" and live["service"]["watcher"] in ("inotify", "polling")
    assert live["store"]["conversations"]["eligible"] == 5
    assert live["last_cycle"]["dataset_version"] == 1
    p.p.send_signal(signal.SIGTERM)
    assert p.p.wait(20) == 0
    assert p.notice("STOPPING=1") and p.events("service.stopped")


def test_trigger_wait_runs_one_cycle_and_streams_progress(service_env: Any, store: Path, tmp_path: Path) -> None:
    write_lines(logs_file(store), [rec(f"b0000000000{i}", quality="good", answer=f"b{i}") for i in range(4)])
    p = service_env()
    _ready(p)
    progress: list[dict[str, Any]] = []
    out = control.request(tmp_path / "state" / "control.sock", {"cmd": "trigger", "wait": True}, timeout=None,
                          on_progress=progress.append)
    assert out["forced"] is True and out["decision"] == "train" and out["dataset_version"] == 1
    assert {u["phase"] for u in progress} >= {"ingesting", "deciding", "building dataset"}
    # the CLI verb goes through the same socket
    cli = subprocess.run([sys.executable, "-m", "daemon", "--config", str(tmp_path / "retrain.yaml"), "trigger",
                          "--wait", "--json"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    res = json.loads(cli.stdout)
    assert res["decision"] == "train" and res["dataset_version"] == 1 and res["job_id"] is None
    assert "ran" not in res  # it ran in the service, not in the CLI process


def test_reload_good_then_bad_config_keeps_running(service_env: Any, tmp_path: Path) -> None:
    p = service_env()
    _ready(p)
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(cfg.read_text().replace("min_new_examples: 3", "min_new_examples: 7"))
    p.p.send_signal(signal.SIGHUP)
    p.wait_for(lambda: p.events("config.reloaded"), "config.reloaded")
    assert p.notice("RELOADING=1")
    good = cfg.read_text()
    cfg.write_text(good + "bogus_section: 1\n")
    p.p.send_signal(signal.SIGHUP)
    rejected = p.wait_for(lambda: p.events("config.reload_rejected"), "config.reload_rejected")[0]
    assert rejected["errors"] == ["At 'bogus_section': unknown key"]
    assert p.p.poll() is None
    out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "reload"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "At 'bogus_section': unknown key" in out.stderr
    cfg.write_text(good)
    out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "reload", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["reloaded"] is True
    live = control.request(tmp_path / "state" / "control.sock", {"cmd": "status"}, timeout=10)
    assert live["service"]["phase"] == "idle"
    p.p.send_signal(signal.SIGINT)
    assert p.p.wait(20) == 0


def test_status_without_a_service_is_state_only(tmp_path: Path, store: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: {tmp_path / 'st'}\n")
    out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "status", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["service"] is None
    out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "trigger", "--json"],
                         capture_output=True, text=True, timeout=60)
    res = json.loads(out.stdout)
    assert res["ran"].startswith("in this process") and res["decision"] == "train" and res["outcome"] == "no_data"
    with State(tmp_path / "st") as st:
        assert st.cycles.last().summary["cycle_id"] == res["cycle_id"]  # type: ignore[union-attr]


def test_kill_9_and_restart_loses_nothing_and_counts_nothing_twice(service_env: Any, store: Path,
                                                                  tmp_path: Path) -> None:
    write_lines(logs_file(store), [rec(f"c0000000000{i}") for i in range(8)])
    write_lines(feedback_file(store), [fb(f"c0000000000{i}", True) for i in range(8)])
    p = service_env()
    _ready(p)
    p.wait_for(lambda: p.events("cycle.summary"), "first cycle")
    write_lines(logs_file(store, "2026-11-26"), [rec(f"d0000000000{i}") for i in range(4)])
    p.p.kill()
    p.p.wait(10)
    q = service_env()
    _ready(q)
    q.wait_for(lambda: q.events("cycle.summary"), "first cycle after restart")
    with State(tmp_path / "state") as st:
        assert st.conversations.counts()["conversations"] == 12
        assert st.conversations.counts()["feedback_events"] == 8
        assert st.conn.execute("SELECT COUNT(*) FROM sightings").fetchone()[0] == 12
    q.p.send_signal(signal.SIGTERM)
    assert q.p.wait(20) == 0
