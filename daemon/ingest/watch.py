"""Watch the ChatOS store for changed data files: watchdog (inotify, or polling) behind one narrow seam.

Events are hints, never the truth: the service also scans at start-up and on a reconcile interval. This module
only says "this data file may have changed" (``on_event``) or "you may have missed something, rescan"
(``on_rescan``): after an inotify queue overflow (watchdog's ``EventsLostEvent``, sent once its watches are rebuilt),
after an observer warning (an unreadable directory), when a data folder
disappears, when the store root is deleted, or when the observer dies and is restarted.

Mode selection (:func:`make_watcher`): polling when configured; otherwise inotify, kept only if a start-up self-test
sees an event for a probe file within a bound (NFS, FUSE and some container volumes deliver none). inotify limits
(``ENOSPC``/``EMFILE``) give one warning naming the sysctl to raise, then polling.

A missing store root is not an error: the watcher logs one warning, checks every ``poll_interval_s`` (an
interruptible wait) and starts watching, with a rescan, once the root appears. The same happens when the root is
deleted while watched. Symlinked data folders *inside* the store are not followed by the observer; the reconcile
scan covers them.

This module picks the mode and names the watch's public parts: the seam (``ingest.watch_seam``), the watchdog
watcher (``ingest.watch_observer``) and the inotify self-test (``ingest.watch_selftest``).
"""

from __future__ import annotations

from pathlib import Path

from daemon import log
from daemon.ingest.watch_observer import ObserverFactory, WatchdogWatcher, limit_advice, translate
from daemon.ingest.watch_seam import OnEvent, OnRescan, ScriptedWatcher, Watcher, is_data_file, is_data_folder, relative
from daemon.ingest.watch_selftest import PROBE_PREFIX, selftest

# The watch's public names, wherever they live (the seam, the watchdog watcher, the self-test), for the service
# and the tests.
__all__ = [
    "PROBE_PREFIX",
    "ObserverFactory",
    "OnEvent",
    "OnRescan",
    "ScriptedWatcher",
    "WatchdogWatcher",
    "Watcher",
    "is_data_file",
    "is_data_folder",
    "limit_advice",
    "make_watcher",
    "relative",
    "selftest",
    "translate",
]

_log = log.get("daemon.ingest.watch")


def make_watcher(
    root: Path,
    *,
    polling: bool,
    poll_interval_s: float,
    selftest_timeout_s: float,
    probe_dir: Path,
    observer_factory: ObserverFactory | None = None,
) -> Watcher:
    """The watcher for this store: polling when asked, else inotify if its self-test passes, else polling.

    ``observer_factory`` builds the inotify-mode observer (tests inject a silent or failing one).
    """
    if polling:
        return WatchdogWatcher(root, mode="polling", reason="watch.polling is set", poll_interval_s=poll_interval_s)
    ok, reason = selftest(root, probe_dir=probe_dir, timeout_s=selftest_timeout_s, observer_factory=observer_factory)
    if not ok:
        if not reason.startswith("inotify limit"):
            _log.warning("watch.selftest_failed", reason=reason, fallback="polling")
        return WatchdogWatcher(root, mode="polling", reason=reason, poll_interval_s=poll_interval_s)
    return WatchdogWatcher(
        root, mode="inotify", reason=reason, poll_interval_s=poll_interval_s, observer_factory=observer_factory
    )
