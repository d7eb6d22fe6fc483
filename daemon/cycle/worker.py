"""The single-flight cycle worker: one cycle at a time; requests that arrive during a run fold into exactly one
follow-up cycle."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon import log
from daemon.cycle.context import CycleRequest, CycleResult, Outcome, Progress, new_cycle_id
from daemon.state import StateError

_log = log.get("daemon.cycle")


@dataclass
class Ticket:
    """A handle on the cycle that will serve a request (the current one's follow-up when one is running)."""

    done: threading.Event = field(default_factory=threading.Event)
    result: CycleResult | None = None
    progress: list[Callable[[str, str], None]] = field(default_factory=list)


class Worker:
    """Single flight: one cycle at a time; requests during a run are merged into exactly one follow-up."""

    def __init__(self, run: Callable[[CycleRequest, Progress], CycleResult]) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: CycleRequest | None = None
        self._pending_tickets: list[Ticket] = []
        self._running = False
        self._closed = False
        self.cycles_run = 0
        self._thread = threading.Thread(target=self._loop, name="pipeline-worker", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running or self._pending is not None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: CycleRequest, on_progress: Callable[[str, str], None] | None = None) -> Ticket:
        ticket = Ticket()
        if on_progress:
            ticket.progress.append(on_progress)
        with self._lock:
            if self._closed:
                ticket.result = None
                ticket.done.set()
                return ticket
            if self._pending is None:
                self._pending = request
            else:
                self._pending.merge(request)
            self._pending_tickets.append(ticket)
            self._wake.notify()
        return ticket

    def close(self, timeout: float) -> bool:
        """Take no more requests, drop the queued follow-up, wait up to ``timeout`` for the running cycle."""
        with self._lock:
            self._closed = True
            dropped = self._pending_tickets
            self._pending, self._pending_tickets = None, []
            self._wake.notify()
        for t in dropped:
            t.done.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                if self._closed and self._pending is None:
                    return
                request, tickets = self._pending, self._pending_tickets
                self._pending, self._pending_tickets = None, []
                self._running = True
            if request is None:  # unreachable: the loop above waits until a request is pending
                continue

            def fan_out(phase: str, detail: str, tickets: list[Ticket] = tickets) -> None:
                for t in tickets:
                    for cb in t.progress:
                        try:
                            cb(phase, detail)
                        except Exception:  # a listener that went away must not break the cycle
                            _log.debug("progress.listener_failed")

            try:
                result = self._run(request, fan_out)
            except Exception as exc:  # run() already catches; this is the last line of defence
                if isinstance(exc, StateError):  # the state could not even be opened (disk full ...): one line
                    _log.error("worker.cycle_failed", reason=str(exc))
                else:
                    _log.exception("worker.cycle_crashed")
                result = CycleResult(new_cycle_id(), Outcome.ERROR, False, f"cycle crashed: {exc}", error=str(exc))
            with self._lock:
                self._running = False
                self.cycles_run += 1
            for t in tickets:
                t.result = result
                t.done.set()
