"""The watcher seam: the scripted double, the pure event translation and the sysctl advice."""

from __future__ import annotations

import errno
from pathlib import Path, PurePosixPath

import pytest
from structlog.testing import capture_logs
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirModifiedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from daemon.ingest import watch
from daemon.ingest.watch import ScriptedWatcher, Watcher

ROOT = "/home/u/ChatOS-Memory"
REAL = "/data/chatos"  # the resolved root (the configured one is a symlink to it)


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.rescans: list[str] = []

    def on_event(self, path: str) -> None:
        self.events.append(path)

    def on_rescan(self, reason: str) -> None:
        self.rescans.append(reason)


# -- the scripted double ---------------------------------------------------------------------------------------


def test_scripted_watcher_delivers_what_the_test_scripts() -> None:
    w: Watcher = ScriptedWatcher(mode="polling")
    rec = Recorder()
    with capture_logs() as logs:
        w.start(rec.on_event, rec.on_rescan)
    assert isinstance(w, ScriptedWatcher)
    assert w.emit(f"{ROOT}/logs/conversations_2025-12-05.jsonl") is True
    w.emit_rescan("queue overflow")
    assert rec.events == [f"{ROOT}/logs/conversations_2025-12-05.jsonl"]
    assert rec.rescans == ["queue overflow"]
    assert w.mode == "polling"
    assert [e["event"] for e in logs] == ["watch.started"]
    assert logs[0]["mode"] == "polling"


def test_scripted_watcher_with_a_root_filters_like_the_real_one() -> None:
    w = ScriptedWatcher(root=Path(ROOT))
    rec = Recorder()
    w.start(rec.on_event, rec.on_rescan)
    assert w.emit(f"{ROOT}/feedback/feedback_2025-12.jsonl")
    assert not w.emit(f"{ROOT}/training_data/export_20251205.json")
    assert not w.emit(f"{ROOT}/analytics/stats.json")
    assert not w.emit("/elsewhere/logs/conversations_x.jsonl")
    assert rec.events == [f"{ROOT}/feedback/feedback_2025-12.jsonl"]


def test_scripted_watcher_refuses_to_emit_when_not_running() -> None:
    w = ScriptedWatcher()
    with pytest.raises(RuntimeError, match="not running"):
        w.emit(f"{ROOT}/logs/a.jsonl")
    rec = Recorder()
    w.start(rec.on_event, rec.on_rescan)
    with pytest.raises(RuntimeError, match="already started"):
        w.start(rec.on_event, rec.on_rescan)
    w.stop()
    assert w.stopped
    with pytest.raises(RuntimeError, match="not running"):
        w.emit_rescan("late")
    assert rec.events == [] and rec.rescans == []


# -- pure translation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "data"),
    [
        ("logs/conversations_2025-12-05.jsonl", True),
        ("training_data/train_2025.jsonl", True),
        ("training_data/single.json", True),
        ("feedback/feedback_2025-12.jsonl", True),
        ("training_data/export_20251205.json", False),
        ("training_data/run_1.jsonl", False),
        ("logs/notes.txt", False),
        ("logs/.conversations.jsonl.swp", False),
        ("analytics/stats.json", False),
        ("logs/sub/conversations.jsonl", False),
        ("tool.py", False),
        (".chatos-retrain-probe-ab12cd34/probe", False),
    ],
)
def test_data_files_are_the_ingested_shapes_only(rel: str, data: bool) -> None:
    assert watch.is_data_file(PurePosixPath(rel)) is data
    expected = [("event", f"{ROOT}/{rel}")] if data else []
    assert watch.translate(FileModifiedEvent(f"{ROOT}/{rel}"), ROOT, ROOT) == expected


def test_paths_are_reported_under_the_configured_root_not_the_resolved_one() -> None:
    ev = FileCreatedEvent(f"{REAL}/logs/conversations_1.jsonl")
    assert watch.translate(ev, REAL, ROOT) == [("event", f"{ROOT}/logs/conversations_1.jsonl")]
    # bytes paths (a bytes watch) decode the same way
    ev_b = FileDeletedEvent(f"{REAL}/feedback/f.jsonl".encode())
    assert watch.translate(ev_b, REAL, ROOT) == [("event", f"{ROOT}/feedback/f.jsonl")]


def test_moves_report_each_end_that_is_a_data_file() -> None:
    into = FileMovedEvent(f"{ROOT}/logs/.tmp123", f"{ROOT}/logs/conversations_1.jsonl")
    assert watch.translate(into, ROOT, ROOT) == [("event", f"{ROOT}/logs/conversations_1.jsonl")]
    away = FileMovedEvent(f"{ROOT}/logs/conversations_1.jsonl", f"{ROOT}/logs/conversations_1.jsonl.bak")
    assert watch.translate(away, ROOT, ROOT) == [("event", f"{ROOT}/logs/conversations_1.jsonl")]
    both = FileMovedEvent(f"{ROOT}/feedback/a.jsonl", f"{ROOT}/feedback/b.jsonl")
    assert watch.translate(both, ROOT, ROOT) == [
        ("event", f"{ROOT}/feedback/a.jsonl"),
        ("event", f"{ROOT}/feedback/b.jsonl"),
    ]


def test_reads_and_directory_noise_are_dropped() -> None:
    path = f"{ROOT}/logs/conversations_1.jsonl"
    assert watch.translate(FileOpenedEvent(path), ROOT, ROOT) == []
    assert watch.translate(FileClosedEvent(path), ROOT, ROOT) == []
    assert watch.translate(DirModifiedEvent(f"{ROOT}/logs"), ROOT, ROOT) == []
    assert watch.translate(DirCreatedEvent(f"{ROOT}/logs"), ROOT, ROOT) == []
    assert watch.translate(DirDeletedEvent(f"{ROOT}/analytics"), ROOT, ROOT) == []
    assert watch.translate(FileModifiedEvent("/elsewhere/logs/conversations_1.jsonl"), ROOT, ROOT) == []


def test_data_folder_gone_means_rescan_and_root_gone_is_signalled() -> None:
    assert watch.translate(DirDeletedEvent(f"{ROOT}/logs"), ROOT, ROOT) == [("rescan", "logs/ was deleted or moved")]
    moved = DirMovedEvent(f"{ROOT}/feedback", f"{ROOT}/feedback.old")
    assert watch.translate(moved, ROOT, ROOT) == [("rescan", "feedback/ was deleted or moved")]
    assert watch.translate(DirDeletedEvent(ROOT), ROOT, ROOT) == [("root_gone", "")]
    assert watch.translate(DirDeletedEvent(ROOT + "/"), ROOT, ROOT) == [("root_gone", "")]


def test_lost_events_mean_rescan() -> None:
    """watchdog (>= 7.1.1) turns the kernel's IN_Q_OVERFLOW into EventsLostEvent on the watched folder."""
    from watchdog.events import EventsLostEvent

    assert watch.translate(EventsLostEvent(ROOT, is_directory=True), ROOT, ROOT) == [
        ("rescan", "inotify queue overflowed: events were lost")
    ]


def test_relative() -> None:
    assert watch.relative(ROOT, f"{ROOT}/logs/a.jsonl") == PurePosixPath("logs/a.jsonl")
    assert watch.relative(ROOT, ROOT) is None
    assert watch.relative(ROOT, "/home/u/other/logs/a.jsonl") is None
    assert watch.relative(ROOT, "/home/u/ChatOS-Memory2/logs/a.jsonl") is None


# -- sysctl advice ---------------------------------------------------------------------------------------------


def test_limit_advice_names_the_sysctl_and_the_command() -> None:
    watches = watch.limit_advice(OSError(errno.ENOSPC, "inotify watch limit reached"), current=8192)
    assert watches is not None
    assert watches["sysctl"] == "fs.inotify.max_user_watches"
    assert watches["fix"] == "sysctl -w fs.inotify.max_user_watches=524288"
    instances = watch.limit_advice(OSError(errno.EMFILE, "inotify instance limit reached"), current=128)
    assert instances is not None
    assert instances["sysctl"] == "fs.inotify.max_user_instances"
    assert instances["fix"] == "sysctl -w fs.inotify.max_user_instances=1024"
    # already above the suggestion: double it rather than suggest lowering it
    big = watch.limit_advice(OSError(errno.ENOSPC, "x"), current=1_000_000)
    assert big is not None and big["fix"].endswith("=2000000")
    assert watch.limit_advice(OSError(errno.EACCES, "denied")) is None
