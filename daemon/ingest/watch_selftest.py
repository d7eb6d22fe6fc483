"""The inotify self-test: whether inotify reports a probe created next to the store within a bound (NFS, FUSE and
some container volumes deliver none). :func:`daemon.ingest.watch.make_watcher` keeps inotify only if it passes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler

from daemon.ingest.watch_observer import EVENT_FILTER, ObserverFactory, inotify_observer, shutdown, warn_limit

PROBE_PREFIX = ".chatos-retrain-probe-"


class _ProbeHandler(FileSystemEventHandler):
    def __init__(self) -> None:
        self.target = ""
        self.seen = threading.Event()

    def dispatch(self, event: FileSystemEvent) -> None:
        if not self.target:
            return
        prefix = self.target + os.sep
        for p in (event.src_path, event.dest_path):
            if p and os.fsdecode(p).startswith(prefix):
                self.seen.set()


def _make_probe(parent: str, handler: _ProbeHandler) -> str:
    path = os.path.join(parent, PROBE_PREFIX + secrets.token_hex(4))
    handler.target = path  # set before mkdir: the creation may be reported at once
    os.mkdir(path, 0o700)
    return path


def selftest(
    root: Path, *, probe_dir: Path, timeout_s: float, observer_factory: ObserverFactory | None = None
) -> tuple[bool, str]:
    """Whether inotify reports a probe file created and removed next to the store, within ``timeout_s``.

    The probe lives in a private temp dir inside the store root, or in ``probe_dir`` when the store cannot be
    written (read-only mount, other owner) or does not exist yet. Returns (ok, reason); limit errors are logged.
    """
    handler = _ProbeHandler()
    probe: str | None = None
    where = "store"
    try:
        observer = (observer_factory or inotify_observer)()
    except OSError as exc:
        if warn_limit(exc):
            return False, f"inotify limit: {exc.strerror or exc}"
        return False, f"inotify unavailable: {exc}"
    try:
        watched = os.path.realpath(root)
        root_exists = os.path.isdir(watched)
        if root_exists:
            observer.schedule(handler, watched, recursive=True, event_filter=EVENT_FILTER)
        observer.start()
        if root_exists:
            try:
                probe = _make_probe(watched, handler)
            except OSError:
                probe = None
        if probe is None:
            where = "state dir"
            probe_dir.mkdir(parents=True, exist_ok=True)
            probe = _make_probe(str(probe_dir), handler)
            observer.schedule(handler, probe, recursive=False, event_filter=EVENT_FILTER)
        # Kept until seen (or timed out): a file created and removed before watchdog adds the new dir's watch
        # would leave no trace, while one that still exists is reported by watchdog's catch-up walk.
        with open(os.path.join(probe, "probe"), "wb"):
            pass
        if handler.seen.wait(timeout_s):
            return True, f"inotify self-test passed (probe in the {where})"
        return False, (
            f"inotify self-test saw no event within {timeout_s:g}s (probe in the {where}; network or FUSE "
            "filesystem, container volume, or fs.inotify.max_user_watches reached)"
        )
    except OSError as exc:
        if warn_limit(exc):
            return False, f"inotify limit: {exc.strerror or exc}"
        return False, f"inotify self-test failed: {exc}"
    finally:
        shutdown(observer)
        if probe is not None:
            shutil.rmtree(probe, ignore_errors=True)
