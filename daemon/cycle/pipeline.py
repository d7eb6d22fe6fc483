"""One cycle: the stages in order, under the cycle lock, with one ``cycle.summary`` line at the end.

``run_cycle`` reads as the list of stages it runs; each stage is a short function in its own module that takes the
cycle's context (:class:`~daemon.cycle.context.Cycle`) and says whether the cycle goes on:

    registering.retry_pending -> exporting.resume -> pruning -> ingesting -> deciding -> building -> training
    (training -> gating -> exporting -> registering, when the candidate is promoted)

The :class:`~daemon.cycle.worker.Worker` runs at most one cycle at a time.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import structlog

from daemon import log, notify
from daemon.cycle import building, deciding, exporting, ingesting, metrics, pruning, registering, training
from daemon.cycle.context import Aborted, Cycle, CycleRequest, CycleResult, Outcome, Progress, new_cycle_id
from daemon.settings import Settings
from daemon.state import CycleRow, State, storage_problem
from daemon.train import runner

_log = log.get("daemon.cycle")

Stage = Callable[[Cycle], bool]
STAGES: tuple[Stage, ...] = (
    registering.retry_pending,
    exporting.resume,
    pruning.run,
    ingesting.run,
    deciding.run,
    building.run,
    training.run,
)


@contextmanager
def _cycle_lock(state: State) -> Iterator[None]:
    """Single flight across processes too: a CLI ``trigger`` without a service waits for a running cycle."""
    fd = os.open(state.dir / "cycle.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _run_stages(cycle: Cycle, resume_job: runner.Job | None) -> None:
    """The stages in order, until one says the cycle ends; failures become the result, never an exception."""
    result = cycle.result
    try:
        if resume_job is not None:
            training.reattached(cycle, resume_job)
            return
        for stage in STAGES:
            if not stage(cycle):
                return
    except Aborted as exc:
        result.end(Outcome.ABORTED, str(exc))
    except Exception as exc:  # a bug or an environment failure: report it, keep the service alive
        storage = storage_problem(exc, cycle.state.dir)
        result.error = storage or f"{type(exc).__name__}: {exc}"
        result.end(Outcome.ERROR, f"cycle failed: {result.error}")
        if storage:  # disk full or read-only: expected, one line; the transaction rolled back, state is intact
            _log.error("cycle.failed", reason=storage)
        else:
            _log.exception("cycle.failed")


def _record(cycle: Cycle) -> None:
    """The cycle's row in state and its one summary line (the line even when state cannot be written)."""
    result, state = cycle.result, cycle.state
    try:
        with state.transaction():
            state.cycles.record(CycleRow(result.cycle_id, result.started_at, result.outcome, result.reason,
                                         result.as_json(), trained=result.job_id is not None))
    except Exception as exc:  # the summary line below still tells what happened
        _log.error("cycle.not_recorded", reason=storage_problem(exc, state.dir) or str(exc))
    _log.info(
        "cycle.summary", outcome=str(result.outcome), decision="train" if result.decision else "wait",
        reason=result.reason, forced=result.forced, dataset_version=result.dataset_version,
        dataset_created=result.dataset_created, job_id=result.job_id, model_tag=result.model_tag,
        counts=result.counts, timings=result.timings,
        **{k: v for k, v in (("plan", (result.counts.get("plan") or {}).get("line")),
                             ("learned", result.counts.get("learned"))) if v},
    )


def run_cycle(
    settings: Settings,
    state: State,
    request: CycleRequest,
    *,
    stop: threading.Event | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    cycle_id: str | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    resume_job: runner.Job | None = None,
) -> CycleResult:
    """Run one cycle and log one ``cycle.summary`` line. Never raises for expected failures."""
    result = CycleResult(cycle_id or new_cycle_id(), Outcome.SKIPPED, False, "", forced=request.forced,
                         started_at=now().isoformat())
    cycle = Cycle(settings, state, request, result, stop=stop or threading.Event(),
                  cancel=cancel or threading.Event(), now=now)
    if progress is not None:
        cycle.report = progress
    t_cycle = time.perf_counter()
    with structlog.contextvars.bound_contextvars(cycle_id=result.cycle_id), _cycle_lock(state):
        _log.info("cycle.started", forced=request.forced, origins=request.origins[:10],
                  paths=None if request.paths is None else len(request.paths))
        try:
            _run_stages(cycle, resume_job)
        finally:
            result.timings["total"] = round(time.perf_counter() - t_cycle, 4)
            _record(cycle)
            metrics.publish(settings, state)  # metrics.textfile, when set; a failure is one warning line
            notify.cycle_ended(settings, state, result.as_json(), now())  # enqueues only: never blocks, never raises
    return result


__all__ = ["STAGES", "CycleRequest", "CycleResult", "Outcome", "Progress", "run_cycle"]
