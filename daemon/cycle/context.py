"""What a cycle carries from stage to stage: the request, the result being filled, and the cycle's context.

Pure values plus one small helper class; the stages (one module each) take a :class:`Cycle` and nothing else.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from daemon.settings import Settings
from daemon.state import State

Progress = Callable[[str, str], None]  # (phase, detail)


class Outcome(StrEnum):
    """How a cycle ended. A StrEnum: it is stored, logged and sent as its value."""

    SKIPPED = "skipped"  # the policy said wait
    DATASET = "dataset"  # a dataset was built; nothing trained (yet)
    NOT_CONFIGURED = "not_configured"  # a dataset is ready but training is not configured
    NO_DATA = "no_data"  # nothing eligible to build a dataset from
    TRAIN_FAILED = "train_failed"  # the trainer failed, timed out or could not start
    CANCELLED = "cancelled"  # an operator cancelled the job
    PROMOTED = "promoted"  # the gate promoted the candidate (export disabled, or not reached)
    REJECTED = "rejected"  # the gate kept the champion
    EXPORT_FAILED = "export_failed"  # promoted, but merge + convert failed
    REGISTERED = "registered"  # promoted, exported and registered as latest
    PENDING_REGISTRATION = "pending_registration"  # exported; Ollama down or failing, retried with backoff
    REGISTER_FAILED = "register_failed"  # exported; Ollama refused it for good
    NO_SPACE = "no_space"  # not enough free disk for the job or the export: refused before it started
    ABORTED = "aborted"  # the service stopped between two stages
    ERROR = "error"  # a bug or an environment failure (reported, the service stays up)

    @property
    def failed(self) -> bool:
        """Outcomes that need an operator: ``demo --once`` exits 1 on them (``trigger`` exits 1 on ``error``)."""
        return self in (Outcome.ERROR, Outcome.TRAIN_FAILED, Outcome.EXPORT_FAILED, Outcome.NO_SPACE)


@dataclass
class CycleRequest:
    """What to do: ``paths`` None = full scan; ``forced`` = an operator trigger (thresholds ignored)."""

    paths: set[str] | None = None
    forced: bool = False
    origins: list[str] = field(default_factory=list)

    def merge(self, other: CycleRequest) -> None:
        if self.paths is None or other.paths is None:
            self.paths = None
        else:
            self.paths |= other.paths
        self.forced = self.forced or other.forced
        self.origins.extend(other.origins)


@dataclass
class CycleResult:
    cycle_id: str
    outcome: Outcome
    decision: bool
    reason: str
    forced: bool = False
    dataset_version: int | None = None
    dataset_created: bool = False
    job_id: str | None = None
    job_status: str | None = None
    model_tag: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    error: str | None = None

    def end(self, outcome: Outcome, reason: str) -> None:
        self.outcome, self.reason = outcome, reason

    def as_json(self) -> dict[str, Any]:
        return {
            "cycle_id": self.cycle_id,
            "outcome": str(self.outcome),
            "decision": "train" if self.decision else "wait",
            "reason": self.reason,
            "forced": self.forced,
            "dataset_version": self.dataset_version,
            "dataset_created": self.dataset_created,
            "job_id": self.job_id,
            "job_status": self.job_status,
            "model_tag": self.model_tag,
            "counts": self.counts,
            "timings": self.timings,
            "started_at": self.started_at,
            "error": self.error,
        }


class Aborted(Exception):
    """The service is stopping: the cycle ends between stages."""


def _no_progress(phase: str, detail: str) -> None:
    """The progress callback of a cycle nobody listens to."""


def new_cycle_id() -> str:
    return f"c-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Cycle:
    """One cycle's context: what every stage reads (settings, state, the request, the clock, the stop and cancel
    events) and the one thing it writes (``result``)."""

    settings: Settings
    state: State
    request: CycleRequest
    result: CycleResult
    stop: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    report: Progress = _no_progress
    now: Callable[[], datetime] = _utcnow
    dataset_path: Path | None = None  # the dataset version to train on, once the build stage made it

    def step(self, phase: str, detail: str = "") -> None:
        """Enter a phase: reported to listeners (``STATUS=``, a waiting ``trigger``), or :class:`Aborted` when the
        service is stopping."""
        if self.stop.is_set():
            raise Aborted(f"stopped before {phase}")
        self.report(phase, detail)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Record the block's wall time in ``result.timings[name]`` (also when it raises)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.result.timings[name] = round(time.perf_counter() - t0, 4)
