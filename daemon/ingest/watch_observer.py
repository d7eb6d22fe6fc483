"""The watchdog watcher behind the seam: an observer (inotify, or polling) on the store root, supervised by one
thread that re-arms it, and the pure translation of watchdog's events into what the service is told.

inotify limits (``ENOSPC``/``EMFILE``) give one warning naming the sysctl to raise, then polling. A missing store
root is not an error: the watcher logs one warning, checks every ``poll_interval_s`` (an interruptible wait) and
starts watching, with a rescan, once the root appears. The same happens when the root is deleted while watched.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon import log
from daemon.ingest.watch_seam import OnEvent, OnRescan, Watcher, is_data_file, is_data_folder, relative

_log = log.get("daemon.ingest.watch")

ObserverFactory = Callable[[], BaseObserver]

HEALTH_INTERVAL_S = 5.0  # how often the supervisor checks that the observer threads are alive
JOIN_TIMEOUT_S = 5.0
# The only event types we ask for: no open/close/attrib, so our own reads of the store never wake us.
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
    EventsLostEvent,  # the kernel's IN_Q_OVERFLOW (watchdog >= 7.1.1), sent once the recursive watches are rebuilt
]
_LIMITS = {
    errno.ENOSPC: ("fs.inotify.max_user_watches", 524288),
    errno.EMFILE: ("fs.inotify.max_user_instances", 1024),
}


def limit_advice(exc: OSError, current: int | None = None) -> dict[str, Any] | None:
    """The sysctl to raise for an inotify limit error, as log fields; None when ``exc`` is not a limit error."""
    if exc.errno not in _LIMITS:
        return None
    name, suggested = _LIMITS[exc.errno]
    value = max(suggested, current * 2) if current else suggested
    return {
        "sysctl": name,
        "current": current,
        "fix": f"sysctl -w {name}={value}",
        "persist": f"echo {name}={value} > /etc/sysctl.d/90-chatos-retrain.conf",
    }


def _read_sysctl(name: str) -> int | None:
    try:
        return int(Path("/proc/sys", *name.split(".")).read_text().strip())
    except (OSError, ValueError):
        return None


def warn_limit(exc: OSError) -> bool:
    """Log the one warning for an inotify limit error. False when ``exc`` is some other error."""
    if exc.errno not in _LIMITS:
        return False
    name = _LIMITS[exc.errno][0]
    advice = limit_advice(exc, _read_sysctl(name))
    _log.warning(
        "watch.inotify_limit",
        error=exc.strerror or str(exc),
        fallback="polling",
        message=f"inotify limit reached; raise {name} to use inotify, polling meanwhile",
        **(advice or {}),
    )
    return True


# -- the watchdog implementation -----------------------------------------------------------------------------


Action = tuple[str, str]  # ("event", absolute path) | ("rescan", reason) | ("root_gone", "")


def translate(event: FileSystemEvent, watched: str, root: str) -> list[Action]:
    """What one watchdog event means for the service. Pure.

    ``watched`` is the directory the observer watches (the resolved root), ``root`` the store root as configured;
    reported paths are under ``root``. File events on data files become ``event`` (a move reports both ends that
    are data files: a rename away is a deletion); a data folder deleted or moved away becomes ``rescan`` (its files
    get no events of their own), and so does a lost-events report (the kernel's inotify queue overflowed, so any
    change may have gone unseen); the watched root deleted becomes ``root_gone``. Everything else is dropped.
    """
    if isinstance(event, EventsLostEvent):
        return [("rescan", "inotify queue overflowed: events were lost")]
    src = os.fsdecode(event.src_path)
    dest = os.fsdecode(event.dest_path) if event.dest_path else ""
    if event.is_directory:
        if isinstance(event, DirDeletedEvent) and os.path.normpath(src) == os.path.normpath(watched):
            return [("root_gone", "")]
        if isinstance(event, (DirDeletedEvent, DirMovedEvent)):
            rel = relative(watched, src)
            if rel is not None and is_data_folder(rel):
                return [("rescan", f"{rel}/ was deleted or moved")]
        return []
    if not isinstance(event, (FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent)):
        return []
    out: list[Action] = []
    for p in (src, dest):
        rel = relative(watched, p) if p else None
        if rel is not None and is_data_file(rel):
            out.append(("event", os.path.join(root, *rel.parts)))
    return out


class _Dispatch(FileSystemEventHandler):
    """Executes :func:`translate` for each watchdog event; runs in the observer thread."""

    def __init__(self, watcher: WatchdogWatcher, watched: str) -> None:
        self._w = watcher
        self._watched = watched

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            for action, arg in translate(event, self._watched, self._w.root):
                if action == "event":
                    self._w._event(arg)
                elif action == "rescan":
                    self._w._rescan(arg)
                else:
                    self._w._wake.set()  # root gone: the supervisor tears down and waits for it to come back
        except Exception:
            # An exception here would kill the observer thread (the supervisor would restart it); keep it alive.
            _log.exception("watch.callback_failed", event_type=event.event_type)


class _WatchdogLogBridge(logging.Handler):
    """watchdog reports a queue overflow or an unreadable directory only as a log warning; each one means
    events may have been lost, so it becomes a rescan."""

    def __init__(self, watcher: WatchdogWatcher) -> None:
        super().__init__(level=logging.WARNING)
        self._w = watcher

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed third-party log call must not break the logging chain
            message = str(record.msg)
        self._w._rescan(f"watchdog: {message}")


class WatchdogWatcher(Watcher):
    """watchdog observer on the store root (recursive), supervised by one thread that (re)arms it.

    Build it with :func:`make_watcher`, which picks the mode.
    """

    def __init__(
        self,
        root: Path,
        *,
        mode: str,
        reason: str,
        poll_interval_s: float,
        observer_factory: ObserverFactory | None = None,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ) -> None:
        if mode not in ("inotify", "polling"):
            raise ValueError(f"unknown watch mode {mode!r}")
        self.root = str(root)
        self.mode = mode
        self.reason = reason
        self.poll_interval_s = poll_interval_s
        self.health_interval_s = health_interval_s
        self._inotify_factory = observer_factory or inotify_observer
        self._on_event: OnEvent | None = None
        self._on_rescan: OnRescan | None = None
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self._bridge = _WatchdogLogBridge(self)
        self._missing_reported = False

    # callbacks, guarded so a failing service callback never kills a watcher thread
    def _event(self, path: str) -> None:
        if self._on_event is not None and not self._stopping:
            self._on_event(path)

    def _rescan(self, reason: str) -> None:
        if self._on_rescan is None or self._stopping:
            return
        _log.info("watch.rescan", reason=reason)
        try:
            self._on_rescan(reason)
        except Exception:
            _log.exception("watch.callback_failed", callback="on_rescan")

    def _new_observer(self) -> BaseObserver:
        if self.mode == "polling":
            return PollingObserver(timeout=self.poll_interval_s)
        return self._inotify_factory()

    def _arm(self) -> BaseObserver | None:
        """Start an observer on the root in the current mode; inotify limits switch to polling (one warning).
        None when the root is missing or unreadable (the supervisor retries)."""
        for _ in range(2):
            watched = os.path.realpath(self.root)  # a symlinked root: watch its target (IN_DONT_FOLLOW)
            observer: BaseObserver | None = None
            try:
                observer = self._new_observer()
                observer.schedule(_Dispatch(self, watched), watched, recursive=True, event_filter=EVENT_FILTER)
                observer.start()
                return observer
            except OSError as exc:
                if observer is not None:
                    shutdown(observer)
                if self.mode == "inotify" and warn_limit(exc):
                    self.mode, self.reason = "polling", f"inotify limit: {exc.strerror or exc}"
                    continue
                if not os.path.isdir(self.root):
                    return None
                _log.warning("watch.start_failed", mode=self.mode, root=self.root, error=str(exc))
                return None
        return None  # pragma: no cover - the second pass is polling, which has no limit errors

    def start(self, on_event: OnEvent, on_rescan: OnRescan) -> None:
        """Start watching (synchronously when the root exists, so a scan right after misses nothing)."""
        if self._thread is not None:
            raise RuntimeError("watcher already started")
        self._on_event, self._on_rescan = on_event, on_rescan
        logging.getLogger("watchdog.observers").addHandler(self._bridge)
        self._observer = self._arm() if os.path.isdir(self.root) else None
        _log.info("watch.started", mode=self.mode, reason=self.reason, root=self.root, armed=self._observer is not None)
        if not os.path.isdir(self.root):
            self._report_missing()
        self._thread = threading.Thread(target=self._supervise, name="chatos-retrain-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the observer and the supervisor; no callback runs after this returns."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)
        logging.getLogger("watchdog.observers").removeHandler(self._bridge)
        _log.info("watch.stopped", mode=self.mode)

    def _problem(self, observer: BaseObserver) -> str | None:
        if not os.path.isdir(self.root):
            return "store root deleted or moved"
        if not observer.is_alive() or any(not e.is_alive() for e in observer.emitters):
            return "watch observer stopped unexpectedly; restarted"
        return None

    def _supervise(self) -> None:
        """Keep an observer running while the root exists; interruptible waits only.

        After any gap in watching (root missing, observer died) the service gets one rescan once watching resumes;
        a deleted root also gets one at once, so the service notices the files are gone.
        """
        pending = "store root appeared" if self._missing_reported else ""
        try:
            while not self._stopping:
                if self._observer is None:
                    if not os.path.isdir(self.root):
                        self._report_missing()
                        pending = "store root appeared"
                        self._wait(self.poll_interval_s)
                        continue
                    self._observer = self._arm()
                    if self._observer is None:
                        self._wait(self.poll_interval_s)
                        continue
                    _log.info("watch.rearmed", mode=self.mode, root=self.root)
                    self._missing_reported = False
                    self._rescan(pending or "watcher restarted")
                    pending = ""
                    continue
                self._wait(self.health_interval_s)
                if self._stopping:
                    break
                problem = self._problem(self._observer)
                if problem is not None:
                    shutdown(self._observer)
                    self._observer = None
                    _log.warning("watch.interrupted", reason=problem, root=self.root)
                    if os.path.isdir(self.root):
                        pending = problem
                    else:
                        self._rescan(problem)
                        pending = "store root appeared"
        finally:
            if self._observer is not None:
                shutdown(self._observer)
                self._observer = None

    def _report_missing(self) -> None:
        if not self._missing_reported:
            self._missing_reported = True
            _log.warning(
                "watch.root_missing",
                root=self.root,
                retry_s=self.poll_interval_s,
                message="store root does not exist; watching for it to appear",
            )

    def _wait(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()


def inotify_observer() -> BaseObserver:
    from watchdog.observers.inotify import InotifyObserver

    return InotifyObserver()


def shutdown(observer: BaseObserver) -> None:
    """Stop an observer (started or not) and wait a bounded time for its threads."""
    try:
        observer.stop()
    except Exception:  # stopping a half-started observer must not mask why it failed
        _log.debug("watch.observer_stop_failed", exc_info=True)
    if observer.is_alive():
        observer.join(JOIN_TIMEOUT_S)
