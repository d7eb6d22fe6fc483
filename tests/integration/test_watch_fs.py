"""The real watcher on a real temp store: inotify and polling, the self-test, fallbacks, a missing or deleted root.

Waits are Event-based with timeouts; nothing sleeps to wait for the file system.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import give_away, run_python_unprivileged, unprivileged_dir
from structlog.testing import capture_logs
from watchdog.observers.api import BaseObserver, EventEmitter

from daemon.ingest import watch
from daemon.ingest.watch import WatchdogWatcher, Watcher

WAIT = 5.0  # generous upper bound; every wait returns as soon as its condition holds
POLL = 0.05


class Recorder:
    """Collects callbacks from watcher threads; ``wait_for`` blocks until a predicate holds (or times out)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.rescans: list[str] = []
        self._cond = threading.Condition()

    def on_event(self, path: str) -> None:
        with self._cond:
            self.events.append(path)
            self._cond.notify_all()

    def on_rescan(self, reason: str) -> None:
        with self._cond:
            self.rescans.append(reason)
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(pred, timeout)

    def wait_event(self, path: Path) -> bool:
        return self.wait_for(lambda: str(path) in self.events)

    def wait_rescan(self, fragment: str) -> bool:
        return self.wait_for(lambda: any(fragment in r for r in self.rescans))


Start = Callable[[Watcher], Recorder]


@pytest.fixture
def started() -> Iterator[Start]:
    """Start watchers and always stop them, so no test leaves threads behind."""
    running: list[Watcher] = []

    def start(w: Watcher) -> Recorder:
        rec = Recorder()
        w.start(rec.on_event, rec.on_rescan)
        running.append(w)
        return rec

    yield start
    for w in running:
        w.stop()
    assert not [t for t in threading.enumerate() if t.name == "chatos-retrain-watch"]


def append(path: Path, text: str = '{"conversation_id": "c1"}\n') -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(text)


def make(store: Path, tmp_path: Path, **kw: object) -> Watcher:
    args: dict[str, object] = {
        "polling": False,
        "poll_interval_s": POLL,
        "selftest_timeout_s": 2.0,
        "probe_dir": tmp_path / "state",
    }
    args.update(kw)
    return watch.make_watcher(store, **args)  # type: ignore[arg-type]


class _SilentEmitter(EventEmitter):
    """An emitter that never reports anything (inotify on a filesystem that delivers no events)."""

    def queue_events(self, timeout: float) -> None:
        self.stopped_event.wait(timeout)


class SilentObserver(BaseObserver):
    def __init__(self) -> None:
        super().__init__(_SilentEmitter, timeout=0.05)


class LimitObserver(BaseObserver):
    """Fails like InotifyObserver at the watch limit: adding the root watch raises ENOSPC."""

    def __init__(self) -> None:
        super().__init__(_SilentEmitter, timeout=0.05)

    def start(self) -> None:
        raise OSError(errno.ENOSPC, "inotify watch limit reached")


def no_instances() -> BaseObserver:
    raise OSError(errno.EMFILE, "inotify instance limit reached")


def test_inotify_reports_appends_to_data_files_only(store: Path, tmp_path: Path, started: Start) -> None:
    w = make(store, tmp_path)
    assert w.mode == "inotify"
    assert "self-test passed" in w.reason
    assert not [p for p in store.iterdir() if p.name.startswith(watch.PROBE_PREFIX)], "probe dir left behind"
    rec = started(w)

    noise = [
        store / "training_data" / "export_20251205.json",
        store / "training_data" / "run_7.jsonl",
        store / "analytics" / "stats.json",
        store / "tool.py",
        store / "logs" / "notes.txt",
    ]
    for p in noise:
        append(p)
    data = store / "logs" / "conversations_2025-12-05.jsonl"
    append(data)
    assert rec.wait_event(data)
    # events arrive in order through one queue: once the data file's is here, the noise's would have been too
    assert set(rec.events) == {str(data)}

    fb = store / "feedback" / "feedback_2025-12.jsonl"
    append(fb)
    assert rec.wait_event(fb)
    before = len(rec.events)
    data.unlink()
    assert rec.wait_for(lambda: str(data) in rec.events[before:])
    assert rec.rescans == []


def test_reading_the_store_triggers_nothing(store: Path, tmp_path: Path, started: Start) -> None:
    data = store / "logs" / "conversations_1.jsonl"
    append(data)
    rec = started(make(store, tmp_path))
    data.read_bytes()  # ingest reads the files we watch: open/close-nowrite must not come back as events
    sentinel = store / "feedback" / "f.jsonl"
    append(sentinel)
    assert rec.wait_event(sentinel)
    assert set(rec.events) == {str(sentinel)}


def test_a_rename_into_place_is_reported(store: Path, tmp_path: Path, started: Start) -> None:
    rec = started(make(store, tmp_path))
    tmp = store / "logs" / ".conversations_1.jsonl.tmp"
    append(tmp)
    final = store / "logs" / "conversations_1.jsonl"
    os.replace(tmp, final)  # how ChatOS rewrites a day file when a chat is deleted
    assert rec.wait_event(final)


def test_data_folder_moved_away_asks_for_a_rescan(store: Path, tmp_path: Path, started: Start) -> None:
    append(store / "logs" / "conversations_1.jsonl")
    rec = started(make(store, tmp_path))
    shutil.move(str(store / "logs"), str(tmp_path / "logs-elsewhere"))
    assert rec.wait_rescan("logs/ was deleted or moved")


def test_polling_mode_reports_changes(store: Path, tmp_path: Path, started: Start) -> None:
    w = make(store, tmp_path, polling=True)
    assert w.mode == "polling"
    assert w.reason == "watch.polling is set"
    with capture_logs() as logs:
        rec = started(w)
    started_lines = [e for e in logs if e["event"] == "watch.started"]
    assert started_lines and started_lines[0]["mode"] == "polling"
    append(store / "training_data" / "export_1.json")
    data = store / "training_data" / "train_1.jsonl"
    append(data)
    assert rec.wait_event(data)
    assert rec.events == [str(data)] * len(rec.events)


def test_selftest_that_sees_nothing_falls_back_to_polling(store: Path, tmp_path: Path, started: Start) -> None:
    with capture_logs() as logs:
        w = make(store, tmp_path, selftest_timeout_s=0.2, observer_factory=SilentObserver)
    assert w.mode == "polling"
    assert "no event within 0.2s" in w.reason
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["watch.selftest_failed"]
    assert warnings[0]["fallback"] == "polling"
    assert not [p for p in store.iterdir() if p.name.startswith(watch.PROBE_PREFIX)]
    rec = started(w)
    data = store / "logs" / "conversations_1.jsonl"
    append(data)
    assert rec.wait_event(data)


def test_watch_limit_gives_one_warning_naming_the_sysctl_then_polls(
    store: Path, tmp_path: Path, started: Start
) -> None:
    with capture_logs() as logs:
        w = make(store, tmp_path, observer_factory=LimitObserver)
        rec = started(w)
    assert w.mode == "polling"
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, warnings
    (warn,) = warnings
    assert warn["event"] == "watch.inotify_limit"
    assert warn["sysctl"] == "fs.inotify.max_user_watches"
    assert warn["fix"].startswith("sysctl -w fs.inotify.max_user_watches=")
    assert warn["fallback"] == "polling"
    data = store / "feedback" / "f.jsonl"
    append(data)
    assert rec.wait_event(data)


def test_instance_limit_names_max_user_instances(store: Path, tmp_path: Path) -> None:
    with capture_logs() as logs:
        w = make(store, tmp_path, observer_factory=no_instances)
    assert w.mode == "polling"
    assert [e["sysctl"] for e in logs if e["event"] == "watch.inotify_limit"] == ["fs.inotify.max_user_instances"]


def test_limit_reached_when_arming_after_a_good_selftest(store: Path, tmp_path: Path, started: Start) -> None:
    from watchdog.observers.inotify import InotifyObserver

    calls: list[int] = []

    def first_real_then_limit() -> BaseObserver:
        calls.append(1)
        return InotifyObserver() if len(calls) == 1 else LimitObserver()

    w = make(store, tmp_path, observer_factory=first_real_then_limit)
    assert w.mode == "inotify"
    with capture_logs() as logs:
        rec = started(w)
    assert w.mode == "polling"
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["watch.inotify_limit"]
    data = store / "logs" / "conversations_1.jsonl"
    append(data)
    assert rec.wait_event(data)


def test_missing_root_is_probed_in_the_state_dir_and_picked_up_when_it_appears(tmp_path: Path, started: Start) -> None:
    root = tmp_path / "not-yet"
    state = tmp_path / "state"
    w = make(root, tmp_path)
    assert w.mode == "inotify"
    assert "state dir" in w.reason
    assert not [p for p in state.iterdir() if p.name.startswith(watch.PROBE_PREFIX)]
    with capture_logs() as logs:
        rec = started(w)
        data = root / "logs" / "conversations_1.jsonl"
        append(data)
        assert rec.wait_rescan("store root appeared")
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["watch.root_missing"]
    append(data)
    assert rec.wait_event(data)


def test_root_deleted_then_recreated(store: Path, tmp_path: Path, started: Start) -> None:
    w = make(store, tmp_path)
    rec = started(w)
    shutil.rmtree(store)
    assert rec.wait_rescan("store root deleted")
    data = store / "logs" / "conversations_1.jsonl"
    append(data)
    assert rec.wait_rescan("store root appeared")
    append(data)
    assert rec.wait_event(data)


_MAKE_AS_CHILD = """
import json, sys
from pathlib import Path
from daemon.ingest import watch
w = watch.make_watcher(Path(sys.argv[1]), polling=False, poll_interval_s=float(sys.argv[3]), selftest_timeout_s=2.0,
                       probe_dir=Path(sys.argv[2]))
print(json.dumps({"mode": w.mode, "reason": w.reason}))
"""


def test_read_only_store_is_probed_in_the_state_dir() -> None:
    # root writes into a read-only directory anyway: make() runs in a child as an unprivileged user (helpers)
    with unprivileged_dir("perm-watch-") as base:
        store, state = base / "ChatOS-Memory", base / "state"
        for sub in ("logs", "training_data", "feedback"):
            (store / sub).mkdir(parents=True)
        give_away(base)
        store.chmod(0o555)
        try:
            w = run_python_unprivileged(_MAKE_AS_CHILD, str(store), str(state), str(POLL))
        finally:
            store.chmod(0o755)
    assert w["mode"] == "inotify"
    assert "state dir" in w["reason"]


def test_a_symlinked_root_is_watched_through_its_target(tmp_path: Path, store: Path, started: Start) -> None:
    link = tmp_path / "link-to-store"
    link.symlink_to(store)
    w = make(link, tmp_path)
    assert w.mode == "inotify"
    rec = started(w)
    append(store / "logs" / "conversations_1.jsonl")
    assert rec.wait_event(link / "logs" / "conversations_1.jsonl")


# The watcher in a child process: one JSON line per callback, so the test can SIGSTOP it (its inotify reader thread
# stops with it, and the kernel queue fills past fs.inotify.max_queued_events) and resume it.
_WATCH_CHILD = """
import json, sys, time
from pathlib import Path
from daemon.ingest.watch import WatchdogWatcher
out = lambda kind, arg: print("@@", json.dumps([kind, arg]), flush=True)  # our log lines go to stdout too
w = WatchdogWatcher(Path(sys.argv[1]), mode="inotify", reason="test", poll_interval_s=0.05)
w.start(lambda p: out("event", p), lambda r: out("rescan", r))
out("ready", "")
sys.stdin.read()  # until the test closes our stdin
w.stop()
"""


def _max_queued_events() -> int:
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())


def _wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of ``pid`` is stopped (a signal is delivered asynchronously)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(s == "T" for s in states):
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} did not stop")


def _overflow_burst(folder: Path, events: int) -> None:
    """``events`` inotify events in a watched folder, and nothing left behind (a create and a delete per file)."""
    for i in range((events + 1) // 2):
        p = folder / f"burst-{i}"
        p.touch()
        p.unlink()


def test_a_real_inotify_queue_overflow_becomes_a_rescan(store: Path) -> None:
    """Issue 11, item 7: a real IN_Q_OVERFLOW. The watcher's process is stopped, so nothing reads its inotify fd; a
    burst of more events than fs.inotify.max_queued_events overflows the kernel queue, and an append after it gets no
    event at all. Resumed, the watcher must ask for a rescan (which finds the append) and report nothing for it."""
    import json
    import select
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", _WATCH_CHILD, str(store)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert child.stdin is not None and child.stdout is not None
    seen: list[list[str]] = []

    def read_until(pred: Callable[[list[str]], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, end - time.monotonic()))
            if ready:
                line = child.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    return False
                if not line.startswith("@@ "):
                    continue
                seen.append(json.loads(line[3:]))
                if pred(seen[-1]):
                    return True
        return False

    data = store / "logs" / "conversations_1.jsonl"
    try:
        assert read_until(lambda m: m[0] == "ready", 30), seen
        os.kill(child.pid, signal.SIGSTOP)
        try:
            _wait_stopped(child.pid)
            _overflow_burst(store / "logs", _max_queued_events() * 3 // 2)  # not data files: no events of ours
            append(data)  # queued after the overflow: the kernel drops its event
        finally:
            os.kill(child.pid, signal.SIGCONT)
        assert read_until(lambda m: m[0] == "rescan" and "overflow" in m[1], WAIT * 4), seen[-5:]
        read_until(lambda m: False, 0.5)  # whatever else comes right after
    finally:
        child.stdin.close()
        child.wait(30)
        child.stdout.close()
    assert ["event", str(data)] not in seen, "the append was reported: the queue did not really overflow"
    assert child.returncode == 0


def test_a_dead_observer_is_restarted_with_a_rescan(store: Path, tmp_path: Path, started: Start) -> None:
    from watchdog.observers.inotify import InotifyObserver

    made: list[BaseObserver] = []

    def factory() -> BaseObserver:
        made.append(InotifyObserver())
        return made[-1]

    w = WatchdogWatcher(
        store, mode="inotify", reason="test", poll_interval_s=POLL, observer_factory=factory, health_interval_s=0.05
    )
    rec = started(w)
    assert len(made) == 1
    made[0].stop()  # the observer thread dies under us
    assert rec.wait_rescan("stopped unexpectedly")
    assert len(made) == 2
    data = store / "logs" / "conversations_1.jsonl"
    append(data)
    assert rec.wait_event(data)


def test_a_failing_callback_does_not_stop_the_watcher(store: Path, tmp_path: Path, started: Start) -> None:
    w = make(store, tmp_path)
    seen: list[str] = []
    got = threading.Event()

    def flaky(path: str) -> None:
        seen.append(path)
        if len(seen) == 1:
            raise RuntimeError("service queue hiccup")
        got.set()

    with capture_logs() as logs:
        w.start(flaky, lambda reason: None)
        try:
            append(store / "logs" / "conversations_1.jsonl")
            append(store / "feedback" / "f.jsonl")
            assert got.wait(WAIT)
        finally:
            w.stop()
    assert any(e["event"] == "watch.callback_failed" for e in logs)


def test_no_callbacks_after_stop(store: Path, tmp_path: Path) -> None:
    w = make(store, tmp_path, polling=True)
    rec = Recorder()
    w.start(rec.on_event, rec.on_rescan)
    w.stop()
    append(store / "logs" / "conversations_1.jsonl")
    assert not rec.wait_for(lambda: bool(rec.events), timeout=4 * POLL)
    assert not [t for t in threading.enumerate() if t.name == "chatos-retrain-watch"]
