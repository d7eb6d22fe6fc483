"""The one seam between the service and file-system notification: :class:`Watcher`, a scripted double for tests,
and the pure path filter both it and the watchdog watcher (``ingest.watch_observer``) apply.

Events are hints, never the truth: the service also scans at start-up and on a reconcile interval.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from daemon import log
from daemon.ingest.records import classify

_log = log.get("daemon.ingest.watch")

OnEvent = Callable[[str], None]
OnRescan = Callable[[str], None]


# -- pure helpers --------------------------------------------------------------------------------------------


def relative(watched: str, path: str) -> PurePosixPath | None:
    """``path`` relative to the watched directory, or None when it lies outside it (or is it)."""
    rel = os.path.relpath(path, watched)
    if rel == "." or rel == ".." or rel.startswith("../"):
        return None
    return PurePosixPath(rel)


def is_data_file(rel: PurePosixPath) -> bool:
    """Whether a store-relative path is a file we ingest (logs, training data, feedback)."""
    return classify(rel) is not None


def is_data_folder(rel: PurePosixPath) -> bool:
    """Whether a store-relative path is one of the folders that hold data files (``logs`` ...)."""
    return len(rel.parts) == 1 and (classify(rel / "x.jsonl") is not None)


# -- the seam ------------------------------------------------------------------------------------------------


class Watcher(abc.ABC):
    """The one seam between the service and file-system notification.

    ``on_event(path)``: a data file under the store root may have changed (absolute path under the root as given).
    ``on_rescan(reason)``: events may have been missed; scan everything. Both are called from watcher threads,
    must be thread-safe and return quickly (hand the work to the service's queue).
    """

    mode: str  # "inotify" | "polling" (ScriptedWatcher: whatever the test says)
    reason: str  # why this mode, for status and logs

    @abc.abstractmethod
    def start(self, on_event: OnEvent, on_rescan: OnRescan) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


class ScriptedWatcher(Watcher):
    """A test double for the seam (like watchfiles' MockRustNotify): the test calls :meth:`emit` and
    :meth:`emit_rescan`, which run the callbacks synchronously in the caller's thread.

    With ``root`` given, :meth:`emit` applies the same data-file filter as the real watcher.
    """

    def __init__(self, mode: str = "inotify", *, root: Path | None = None, reason: str = "scripted") -> None:
        self.mode = mode
        self.reason = reason
        self.root = root
        self.started = False
        self.stopped = False
        self._on_event: OnEvent | None = None
        self._on_rescan: OnRescan | None = None

    def start(self, on_event: OnEvent, on_rescan: OnRescan) -> None:
        if self.started:
            raise RuntimeError("ScriptedWatcher already started")
        self._on_event, self._on_rescan = on_event, on_rescan
        self.started = True
        _log.info("watch.started", mode=self.mode, reason=self.reason, root=str(self.root) if self.root else None)

    def stop(self) -> None:
        self.stopped = True

    def _running(self) -> tuple[OnEvent, OnRescan]:
        if not self.started or self.stopped or self._on_event is None or self._on_rescan is None:
            raise RuntimeError("ScriptedWatcher is not running (start() it first, and not after stop())")
        return self._on_event, self._on_rescan

    def emit(self, path: str | Path) -> bool:
        """Deliver one changed path; returns False when the ``root`` filter drops it."""
        on_event, _ = self._running()
        if self.root is not None:
            rel = relative(str(self.root), str(path))
            if rel is None or not is_data_file(rel):
                return False
        on_event(str(path))
        return True

    def emit_rescan(self, reason: str) -> None:
        _, on_rescan = self._running()
        on_rescan(reason)
