"""Notifications: a finished cycle's promotion, rejection, failed job or failed registration, and a registration
waiting for Ollama too long, sent to the configured notifiers (``notify:``: a webhook, a desktop notification, a
command hook).

The cycle only enqueues (:func:`cycle_ended`, which never raises): one background thread delivers, from a bounded
queue (full: the event is dropped with a warning line), so a slow or failing notifier never blocks or fails a cycle.
Each delivery is one line, ``notify.sent`` or ``notify.failed`` (with the notifier and the reason). At exit
(service stop, the end of a CLI ``trigger``) pending deliveries get :data:`STOP_GRACE_S` seconds, then are dropped
with one ``notify.dropped`` warning.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from daemon import log
from daemon.notify import events as ev
from daemon.notify.events import Event
from daemon.notify.local import Command, Desktop
from daemon.notify.webhook import NotifyError, Webhook
from daemon.settings import Settings
from daemon.state import State

_log = log.get("daemon.notify")

QUEUE_SIZE = 100
STOP_GRACE_S = 5.0
REPORTED_FILE = "notify-reported.json"  # in the state dir: the versions whose wait for Ollama was reported


class Notifier(Protocol):
    name: str

    def send(self, event: Event, stop: threading.Event) -> str: ...


def build(settings: Settings) -> list[Notifier]:
    """The configured notifiers, webhook first."""
    n = settings.notify
    out: list[Notifier] = []
    if n.webhook.url:
        out.append(Webhook(n.webhook.url, secret=n.webhook.secret.get_secret_value() if n.webhook.secret else None,
                           secret_file=n.webhook.secret_file, timeout_s=n.webhook.timeout_s,
                           retries=n.webhook.retries, backoff_s=n.webhook.backoff_s))
    if n.desktop.enabled:
        out.append(Desktop())
    if n.command.argv:
        out.append(Command(n.command.argv, n.command.timeout_s))
    return out


def deliver(notifier: Notifier, event: Event, stop: threading.Event) -> dict[str, Any]:
    """One delivery and its one line; never raises (a notifier's bug is a failed delivery too)."""
    try:
        detail = notifier.send(event, stop)
    except NotifyError as exc:
        reason = str(exc)
    except Exception as exc:  # a failing notifier never fails anything else
        reason = ev.one_line(f"{type(exc).__name__}: {exc}")
    else:
        _log.info("notify.sent", notifier=notifier.name, notify_event=event.event, model_tag=event.model_tag,
                  job_id=event.job_id, detail=detail)
        return {"notifier": notifier.name, "ok": True, "detail": detail}
    _log.warning("notify.failed", notifier=notifier.name, notify_event=event.event, model_tag=event.model_tag,
                 job_id=event.job_id, reason=reason)
    return {"notifier": notifier.name, "ok": False, "detail": reason}


class Dispatcher:
    """One daemon thread delivering (notifier, event) pairs from a bounded queue, in order."""

    def __init__(self, maxsize: int = QUEUE_SIZE) -> None:
        self._queue: queue.Queue[tuple[Notifier, Event]] = queue.Queue(maxsize)
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
        self._thread.start()

    def submit(self, notifiers: Sequence[Notifier], events: Sequence[Event]) -> None:
        """Enqueue without waiting; a full queue drops the pair with one warning line."""
        for event in events:
            for notifier in notifiers:
                try:
                    self._queue.put_nowait((notifier, event))
                except queue.Full:
                    _log.warning("notify.dropped", notifier=notifier.name, notify_event=event.event,
                                 reason=f"{QUEUE_SIZE} deliveries already waiting")

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                notifier, event = self._queue.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                deliver(notifier, event, self.stop)
            finally:
                self._queue.task_done()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def close(self, grace_s: float = STOP_GRACE_S) -> None:
        """Wait up to ``grace_s`` for pending deliveries, then stop (retry waits end) and drop the rest. Once."""
        if self.stop.is_set():
            return
        end = time.monotonic() + grace_s
        while self.pending() and time.monotonic() < end:
            time.sleep(0.05)
        left = self.pending()
        self.stop.set()
        self._thread.join(timeout=2.0)
        if left:
            _log.warning("notify.dropped", deliveries=left, reason=f"service stopping; {grace_s:g}s grace over")


_lock = threading.Lock()
_dispatcher: Dispatcher | None = None


def dispatcher() -> Dispatcher:
    """The process's dispatcher, started on first use (and closed with a grace at exit)."""
    global _dispatcher
    with _lock:
        if _dispatcher is None or _dispatcher.stop.is_set():
            _dispatcher = Dispatcher()
            atexit.register(_dispatcher.close)
        return _dispatcher


def close(grace_s: float = STOP_GRACE_S) -> None:
    """Flush (up to ``grace_s``) and stop the process's dispatcher, if one runs."""
    global _dispatcher
    with _lock:
        d, _dispatcher = _dispatcher, None
    if d is not None:
        atexit.unregister(d.close)
        d.close(grace_s)


def _read_reported(path: Path) -> set[int]:
    try:
        data = json.loads(path.read_text())
        return {int(v) for v in data.get("ollama_waiting", [])}
    except (OSError, ValueError, TypeError, AttributeError):
        return set()


def _write_reported(path: Path, versions: set[int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"ollama_waiting": sorted(versions)}))
    os.replace(tmp, path)


def waiting_events(settings: Settings, state: State, *, now: datetime, cycle_id: str | None) -> list[Event]:
    """``ollama_waiting`` events not sent yet; the versions reported are remembered in the state dir."""
    rows = [*state.models.all(status="pending"), *state.models.all(status="exported")]
    pending = [ev.Pending(m.version, m.tag, m.job_id, m.created_at, m.last_error) for m in rows]
    path = state.dir / REPORTED_FILE
    before = _read_reported(path)
    events, after = ev.ollama_waiting(pending, before, now=now, hours=settings.notify.ollama_wait_hours,
                                      cycle_id=cycle_id)
    if after != before:
        _write_reported(path, after)
    return events


def cycle_ended(settings: Settings, state: State, result: Mapping[str, Any], now: datetime | None = None) -> None:
    """Enqueue what a finished cycle (its summary, ``CycleResult.as_json()``) has to tell; never raises, never waits
    for a delivery."""
    try:
        notifiers = build(settings)
        if not notifiers:
            return
        at = now or datetime.now(UTC)
        wanted = set(settings.notify.events)
        found = ev.from_result(result, at)
        if ev.OLLAMA_WAITING in wanted:
            found += waiting_events(settings, state, now=at, cycle_id=result.get("cycle_id"))
        found = [e for e in found if e.event in wanted]
        if found:
            dispatcher().submit(notifiers, found)
    except Exception as exc:  # a notification never fails a cycle
        _log.warning("notify.failed", notifier="all", reason=ev.one_line(f"{type(exc).__name__}: {exc}"))


def send_test(settings: Settings) -> list[dict[str, Any]]:
    """``notify test``: a test event to every configured notifier, here and now; each one's result."""
    event = ev.test_event(datetime.now(UTC))
    stop = threading.Event()
    return [deliver(n, event, stop) for n in build(settings)]


__all__ = ["Dispatcher", "Event", "Notifier", "NotifyError", "build", "close", "cycle_ended", "deliver",
           "dispatcher", "send_test", "waiting_events"]
