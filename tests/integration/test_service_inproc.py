"""The service in-process with the watcher seam scripted, plus reconcile and polling on a real filesystem."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import fb, feedback_file, logs_file, rec, write_lines
from structlog.testing import capture_logs

from daemon.ingest import watch
from daemon.service.lifecycle import Service
from daemon.service.sdnotify import Notifier


def wait_until(pred: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def running(make_settings: Any) -> Iterator[Callable[..., tuple[Service, list[dict[str, Any]]]]]:
    started: list[tuple[Service, threading.Thread]] = []
    cm = capture_logs()
    logs = cm.__enter__()

    def start(watcher: Any = None, **sections: dict[str, Any]) -> tuple[Service, list[dict[str, Any]]]:
        base = {"watch": {"settle_s": 0.2, "max_wait_s": 1.0}, "policy": {"min_new_examples": 2,
                "min_total_examples": 2, "cooldown": 0}, "dataset": {"min_train_examples": 1, "min_eval_examples": 1}}
        for k, v in sections.items():
            base.setdefault(k, {}).update(v)
        s = make_settings(**base)
        factory = (lambda root, **kw: watcher) if watcher is not None else None
        svc = Service(None, initial=s, watcher_factory=factory, notifier=Notifier(None))
        t = threading.Thread(target=svc.run, daemon=True)
        t.start()
        started.append((svc, t))
        wait_until(lambda: svc.phase == "idle" and svc.last_result is not None, "start-up cycle")
        return svc, logs

    yield start
    for svc, t in started:
        svc.stop_event.set()
        svc.wake.set()
        t.join(20)
        assert not t.is_alive()
    cm.__exit__(None, None, None)


def summaries(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "cycle.summary"]


def test_scripted_events_are_debounced_into_one_cycle(running: Any, store: Path) -> None:
    w = watch.ScriptedWatcher(root=store)
    svc, logs = running(watcher=w)
    before = len(summaries(logs))
    write_lines(logs_file(store), [rec(f"a0000000000{i}", answer=f"x{i}") for i in range(3)])
    write_lines(feedback_file(store), [fb(f"a0000000000{i}") for i in range(3)])
    for _ in range(20):  # a burst of hints for two files
        w.emit(logs_file(store))
        w.emit(feedback_file(store))
    s = wait_until(lambda: summaries(logs)[before:], "a cycle")
    time.sleep(0.5)  # nothing else is pending: no second cycle appears
    assert len(summaries(logs)) == before + 1
    assert s[0]["decision"] == "train" and s[0]["dataset_version"] == 1
    assert [e for e in logs if e["event"] == "watch.batch"][-1]["files"] == 2


def test_missed_event_is_caught_by_the_reconcile_scan(running: Any, store: Path) -> None:
    w = watch.ScriptedWatcher(root=store)  # never emits: inotify "missed" everything
    svc, logs = running(watcher=w, watch={"reconcile_interval": 1.0})
    write_lines(logs_file(store), [rec(f"b0000000000{i}", quality="good", answer=f"y{i}") for i in range(3)])
    s = wait_until(lambda: [e for e in summaries(logs) if e["decision"] == "train"], "reconcile cycle", 15)
    assert s[0]["counts"]["ingest"]["conversations"] == 3
    assert any(e["event"] == "service.rescan" and e["reason"] == "reconcile" for e in logs)


def test_observer_error_triggers_a_rescan(running: Any, store: Path) -> None:
    w = watch.ScriptedWatcher(root=store)
    svc, logs = running(watcher=w)
    write_lines(logs_file(store), [rec(f"c0000000000{i}", quality="good", answer=f"z{i}") for i in range(3)])
    w.emit_rescan("queue overflow")
    s = wait_until(lambda: [e for e in summaries(logs) if e["decision"] == "train"], "rescan cycle")
    assert s[0]["counts"]["ingest"]["conversations"] == 3


def test_polling_mode_on_a_real_filesystem(running: Any, store: Path) -> None:
    svc, logs = running(watch={"polling": True, "poll_interval_s": 0.2})
    assert svc.watcher is not None and svc.watcher.mode == "polling"
    write_lines(logs_file(store), [rec(f"d0000000000{i}", quality="good", answer=f"w{i}") for i in range(3)])
    s = wait_until(lambda: [e for e in summaries(logs) if e["decision"] == "train"], "polling cycle")
    assert s[0]["dataset_version"] == 1


def test_inotify_mode_on_a_real_filesystem(running: Any, store: Path) -> None:
    svc, logs = running()
    assert svc.watcher is not None and svc.watcher.mode == "inotify"
    write_lines(logs_file(store), [rec(f"e0000000000{i}", quality="good", answer=f"v{i}") for i in range(3)])
    s = wait_until(lambda: [e for e in summaries(logs) if e["decision"] == "train"], "inotify cycle")
    assert s[0]["dataset_version"] == 1
    # our own writes (state dir, datasets) never trigger another cycle
    n = len(summaries(logs))
    time.sleep(1.0)
    assert len(summaries(logs)) == n
