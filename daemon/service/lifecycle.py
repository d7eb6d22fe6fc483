"""The long-running service: lifecycle, signals, sd_notify, watcher -> debouncer -> pipeline, control socket.

Threads: the main thread runs the lifecycle loop (an interruptible wait on one Event); the watcher's observer thread
only queues paths; APScheduler runs the periodic reconcile and window openings (they only set flags); one worker
runs cycles; the control server answers ``status`` / ``trigger`` / ``reload``. The service never imports torch.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from daemon import cron, log, settings
from daemon.cycle import metrics
from daemon.cycle.pipeline import CycleRequest, CycleResult, Progress, run_cycle
from daemon.cycle.worker import Worker
from daemon.ingest import ingestor, watch
from daemon.ingest.debounce import Debouncer
from daemon.service import control, control_server, status
from daemon.service.sdnotify import Notifier
from daemon.state import State
from daemon.train import policy, runner

_log = log.get("daemon.service.lifecycle")
SOCKET_NAME = "control.sock"


class Service:
    """``Service(config_path).run()`` -> exit code. Construction does no I/O; ``run`` does it all."""

    def __init__(
        self,
        config_path: Path | None,
        *,
        initial: settings.Settings | None = None,
        watcher_factory: Any = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config_path = config_path
        self.settings = initial if initial is not None else settings.load(config_path)[0]
        self._watcher_factory = watcher_factory or watch.make_watcher
        self.notifier = notifier or Notifier.from_env()
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.cancel_event = threading.Event()
        self._resume: list[runner.Job] = []
        self._events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._rescan: str | None = None
        self._hup = False
        self._sigint_count = 0
        self._reload_done = threading.Condition()
        self._reload_gen = 0
        self._reload_result: dict[str, Any] = {}
        self.phase, self.detail = "starting", "loading"
        self.last_result: CycleResult | None = None
        self.started_at = datetime.now(UTC).isoformat()
        self.watcher: watch.Watcher | None = None
        self.worker: Worker | None = None
        self.server: control_server.ControlServer | None = None
        self.scheduler: Any = None
        self._debouncer = Debouncer(self.settings.watch.settle_s, self.settings.watch.max_wait_s)

    # -- signals (handlers only set flags) -------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._hup = True
        else:
            if signum == signal.SIGINT:
                self._sigint_count += 1
                if self._sigint_count >= 2:
                    os.write(2, b"chatos-retrain: second interrupt, exiting now\n")
                    os._exit(130)
            self.stop_event.set()
        self.wake.set()

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # -- status ----------------------------------------------------------------------------------------------

    def _set_phase(self, phase: str, detail: str = "") -> None:
        self.phase, self.detail = phase, detail
        self.notifier.status(self.status_line())

    def status_line(self) -> str:
        detail = self.detail
        if self.phase == "idle" and self.last_result is not None:
            detail = f"last decision: {self.last_result.reason}"
        return f"{self.phase}: {detail or 'working'}"

    def live_status(self) -> dict[str, Any]:
        s = self.settings
        with State(s.state_dir()) as st:
            store = status.store_status(s, st).as_json()
        nxt = policy.next_window_open(s.policy, datetime.now(UTC))
        last = self.last_result.as_json() if self.last_result else None
        return {
            "service": {
                "pid": os.getpid(),
                "started_at": self.started_at,
                "config": str(self.config_path) if self.config_path else None,
                "phase": self.phase,
                "detail": self.detail,
                "status": self.status_line(),
                "watcher": self.watcher.mode if self.watcher else None,
                "busy": bool(self.worker and self.worker.busy),
                "torch_imported": "torch" in sys.modules,
                "next_window": nxt.isoformat() if nxt else None,
                "windows": [w.cron for w in s.policy.windows],
            },
            "last_cycle": last,
            "store": store,
        }

    # -- control ---------------------------------------------------------------------------------------------

    def handle(self, request: dict[str, Any], emit: Any) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            return self.live_status()
        if cmd == "trigger":
            if self.stop_event.is_set() or self.worker is None:
                raise RuntimeError("the service is stopping; trigger refused")
            wait = bool(request.get("wait"))
            on_progress = (lambda phase, detail: emit({"phase": phase, "detail": detail})) if wait else None
            ticket = self.worker.submit(CycleRequest(None, forced=True, origins=["control"]), on_progress)
            if not wait:
                return {"queued": True, "busy": self.worker.busy}
            while not ticket.done.wait(5.0):
                emit({"phase": self.phase, "detail": self.detail, "heartbeat": True})
            if ticket.result is None:
                raise RuntimeError("the service stopped before the cycle ran")
            return ticket.result.as_json()
        if cmd == "reload":
            return self.request_reload(timeout=30.0)
        if cmd == "cancel":
            with State(self.settings.state_dir()) as st:
                running = st.jobs.recent(status="running")
            wanted = request.get("job_id")
            if not running or (wanted and running[0].job_id != wanted):
                raise control.RequestError(f"no running job{' ' + wanted if wanted else ''} to cancel")
            self.cancel_event.set()
            return {"cancelling": running[0].job_id}
        raise control.RequestError(f"unknown command {cmd!r} (status, trigger, reload, cancel)")

    def request_reload(self, timeout: float) -> dict[str, Any]:
        with self._reload_done:
            gen = self._reload_gen
            self._hup = True
            self.wake.set()
            if not self._reload_done.wait_for(lambda: self._reload_gen > gen, timeout):
                raise RuntimeError("reload did not finish in time")
            return dict(self._reload_result)

    # -- reload ----------------------------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        self.notifier.reloading()
        try:
            new, _ = settings.load(self.config_path)
        except settings.ConfigError as exc:
            _log.error("config.reload_rejected", source=exc.source, errors=exc.errors,
                       reason="invalid configuration; keeping the running one")
            result: dict[str, Any] = {"reloaded": False, "errors": exc.errors}
        else:
            old = self.settings
            self.settings = new
            log.configure(new.log.level, new.log.format)
            self._debouncer.settle_s, self._debouncer.max_wait_s = new.watch.settle_s, new.watch.max_wait_s
            self._debouncer.set_ignore([new.state_dir()])
            if (old.store.root, old.watch.polling, old.watch.poll_interval_s) != (
                new.store.root, new.watch.polling, new.watch.poll_interval_s
            ):
                self._start_watcher()
                self._rescan = "store or watch settings changed"
            self._schedule()
            _log.info("config.reloaded", config=str(self.config_path) if self.config_path else None)
            result = {"reloaded": True, "errors": []}
        self.notifier.ready(status=self.status_line())
        with self._reload_done:
            self._reload_result = result
            self._reload_gen += 1
            self._reload_done.notify_all()
        return result

    # -- parts -----------------------------------------------------------------------------------------------

    def _on_path(self, path: str) -> None:
        self._events.put(path)
        self.wake.set()

    def _on_rescan(self, reason: str) -> None:
        self._rescan = reason
        self.wake.set()

    def _start_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        s = self.settings
        self.watcher = self._watcher_factory(
            s.store.root, polling=s.watch.polling, poll_interval_s=s.watch.poll_interval_s,
            selftest_timeout_s=s.watch.selftest_timeout_s, probe_dir=s.state_dir(),
        )
        self.watcher.start(self._on_path, self._on_rescan)

    def _schedule(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        if self.scheduler is None:
            self.scheduler = BackgroundScheduler(timezone=UTC)
            self.scheduler.start()
        self.scheduler.remove_all_jobs()
        s = self.settings
        self.scheduler.add_job(self._on_rescan, "interval", seconds=s.watch.reconcile_interval, args=["reconcile"],
                               id="reconcile", coalesce=True, max_instances=1)
        self.scheduler.add_job(self._pending_due, "interval", seconds=60, id="registry-retry", coalesce=True,
                               max_instances=1)
        for i, w in enumerate(s.policy.windows):
            self.scheduler.add_job(self._window_opened, cron.trigger(w.cron),
                                   id=f"window-{i}", coalesce=True, max_instances=1)

    def _pending_due(self) -> None:
        """A pending Ollama registration whose backoff has passed: run a (no-new-data) cycle, which retries it."""
        now = datetime.now(UTC)
        with State(self.settings.state_dir()) as st:
            due = [m for m in st.models.all(status="pending")
                   if not m.next_attempt_at or datetime.fromisoformat(m.next_attempt_at) <= now]
        if due and self.worker is not None and not self.worker.busy:
            self.worker.submit(CycleRequest(set(), origins=["registry retry"]))

    def _window_opened(self) -> None:
        _log.info("policy.window_opened")
        self._rescan = "training window opened"
        self.wake.set()

    def _run_one(self, request: CycleRequest, progress: Progress) -> CycleResult:
        def both(phase: str, detail: str) -> None:
            self._set_phase(phase, detail)
            progress(phase, detail)

        with State(self.settings.state_dir()) as st:
            while self._resume and not self.stop_event.is_set():
                job = self._resume.pop(0)
                self.cancel_event.clear()
                self.last_result = run_cycle(self.settings, st, CycleRequest(set(), origins=["reattach"]),
                                             stop=self.stop_event, cancel=self.cancel_event, progress=both,
                                             resume_job=job)
            self.cancel_event.clear()
            result = run_cycle(self.settings, st, request, stop=self.stop_event, cancel=self.cancel_event,
                               progress=both)
        self.last_result = result
        self._set_phase("idle")
        return result

    def _startup_scan(self) -> None:
        """Full ingest before READY=1, extending systemd's start timeout while it runs."""
        self._set_phase("scanning", "start-up scan of the store")
        done = threading.Event()
        errors: list[BaseException] = []

        def scan() -> None:
            try:
                with State(self.settings.state_dir()) as st:
                    rep = ingestor.ingest(self.settings, st)
                _log.info("service.startup_scan", **rep.as_dict())
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
            finally:
                done.set()

        threading.Thread(target=scan, name="startup-scan", daemon=True).start()
        while not done.wait(5.0):
            self.notifier.extend_timeout(30_000_000)
            if self.stop_event.is_set():
                return
        if errors:
            raise errors[0]

    # -- main ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        s = self.settings
        _log.info("service.starting", pid=os.getpid(), config=str(self.config_path) if self.config_path else None,
                  store=str(s.store.root), state=str(s.state_dir()))
        with State(s.state_dir()) as st:  # create/migrate before anything else reads it
            self._resume, lost = runner.reattach(st)
            metrics.publish(s, st)  # metrics.textfile from the start (a failure is one warning line)
        if lost:
            _log.warning("service.jobs_interrupted", jobs=lost)
        self._debouncer.set_ignore([s.state_dir()])
        self._start_watcher()  # armed first: a write during the start-up scan still becomes an event
        self._startup_scan()
        self._schedule()
        self.worker = worker = Worker(self._run_one)
        sock = s.runtime_dir() / SOCKET_NAME
        try:
            self.server = control_server.ControlServer(sock, self.handle)
            self.server.start()
        except control.ControlError as exc:
            _log.error("control.unavailable", socket=str(sock), reason=str(exc))
            self.server = None
        self.worker.submit(CycleRequest(set(), origins=["startup"]))
        self._set_phase("idle", "ready")
        self.notifier.ready(status=self.status_line())
        _log.info("service.ready", watcher=self.watcher.mode if self.watcher else None, socket=str(sock))
        try:
            self._loop(worker)
        finally:
            self._shutdown()
        return 0

    def _loop(self, worker: Worker) -> None:
        interval = self.notifier.watchdog_interval()
        next_ping = time.monotonic()
        while not self.stop_event.is_set():
            now = time.monotonic()
            while True:
                try:
                    self._debouncer.observe(self._events.get_nowait(), now)
                except queue.Empty:
                    break
            if self._hup:
                self._hup = False
                self.reload()
            if self._rescan is not None:
                reason, self._rescan = self._rescan, None
                _log.info("service.rescan", reason=reason)
                worker.submit(CycleRequest(None, origins=[reason]))
            batch = self._debouncer.due(now)
            if batch:
                _log.info("watch.batch", files=len(batch))
                worker.submit(CycleRequest(set(batch), origins=["watch"]))
            if interval and now >= next_ping:
                if self.worker is not None and self.worker.alive:  # healthy: the loop runs and the worker lives
                    self.notifier.watchdog()
                next_ping = now + interval
            waits = [1.0]
            deadline = self._debouncer.next_deadline()
            if deadline is not None:
                waits.append(max(0.0, deadline - now))
            if interval:
                waits.append(max(0.0, next_ping - now))
            self.wake.wait(min(waits))
            self.wake.clear()

    def _shutdown(self) -> None:
        timeout = self.settings.service.stop_timeout_s
        self.stop_event.set()
        self.phase, self.detail = "stopping", "finishing the current step"
        self.notifier.stopping(status=self.status_line())
        _log.info("service.stopping", timeout_s=timeout)
        if self.server is not None:
            self.server.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=False)
        if self.worker is not None and not self.worker.close(timeout):
            _log.warning("service.stop_timeout", timeout_s=timeout, reason="a step did not finish; exiting anyway")
        _log.info("service.stopped")
