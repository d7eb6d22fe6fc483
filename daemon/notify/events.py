"""What is worth telling an operator, decided from a finished cycle: pure functions, no I/O.

A cycle's outcome becomes at most one event (:func:`from_result`), plus one ``registration_failed`` per pending
registration the cycle's retry gave up on; a registration pending for longer than ``notify.ollama_wait_hours``
becomes one ``ollama_waiting`` event, once per model version (:func:`ollama_waiting`: the caller keeps the set of
versions already reported).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

PROMOTED, REJECTED, JOB_FAILED, REGISTRATION_FAILED, OLLAMA_WAITING = (
    "promoted", "rejected", "job_failed", "registration_failed", "ollama_waiting")
TEST = "test"  # `chatos-retrain notify test`: sent whatever notify.events says

# A cycle's outcome (``daemon.cycle.context.Outcome``'s values) -> its event; the others give none.
_BY_OUTCOME: dict[str, str] = {
    "promoted": PROMOTED,
    "registered": PROMOTED,
    "pending_registration": PROMOTED,  # promoted and exported; the registration waits for Ollama
    "rejected": REJECTED,
    "train_failed": JOB_FAILED,
    "export_failed": JOB_FAILED,
    "no_space": JOB_FAILED,
    "register_failed": REGISTRATION_FAILED,
}

_TITLES = {
    PROMOTED: "promoted", REJECTED: "rejected", JOB_FAILED: "job failed",
    REGISTRATION_FAILED: "registration failed", OLLAMA_WAITING: "waiting for Ollama", TEST: "test",
}


@dataclass(frozen=True, slots=True)
class Event:
    """One notification, sent as this JSON object (:meth:`as_json`)."""

    event: str
    summary: str  # one line
    model_tag: str | None
    job_id: str | None
    cycle_id: str | None
    reason: str
    at: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def title(self) -> str:
        return f"chatos-retrain: {_TITLES.get(self.event, self.event)}"


def one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def from_result(result: Mapping[str, Any], at: datetime) -> list[Event]:
    """The events of a finished cycle (its summary, ``CycleResult.as_json()``): its outcome's (none for a skip, a
    dataset build, a cancel, an abort; an ``error`` only when a job was involved), and each retried registration
    that failed for good."""
    cycle_id, job_id, tag = result.get("cycle_id"), result.get("job_id"), result.get("model_tag")
    out: list[Event] = []
    for item in (result.get("counts") or {}).get("registrations_retried") or []:
        version, _, status = str(item).partition(":")
        if status == "failed":
            out.append(Event(REGISTRATION_FAILED, f"registration failed: {version} refused by Ollama for good", None,
                             None, cycle_id, f"Ollama refused {version}", at.isoformat()))
    outcome = str(result.get("outcome"))
    kind = _BY_OUTCOME.get(outcome)
    if kind is None and outcome == "error" and job_id is not None:
        kind = JOB_FAILED
    if kind is not None:
        reason = one_line(str(result.get("reason") or ""))
        what = tag or job_id or cycle_id
        out.append(Event(kind, one_line(f"{_TITLES[kind]}: {what}: {reason}"), tag, job_id, cycle_id, reason,
                         at.isoformat()))
    return out


@dataclass(frozen=True, slots=True)
class Pending:
    """A model version waiting for Ollama (a ``models`` row with status ``pending`` or ``exported``)."""

    version: int
    tag: str
    job_id: str
    created_at: str
    last_error: str | None


def ollama_waiting(pending: Sequence[Pending], reported: Iterable[int], *, now: datetime, hours: float,
                   cycle_id: str | None) -> tuple[list[Event], set[int]]:
    """``ollama_waiting`` events for the versions pending longer than ``hours`` and not reported yet, and the
    versions to remember as reported (those still pending: a registered or deleted version is forgotten)."""
    still = {p.version for p in pending}
    done = set(reported) & still
    events: list[Event] = []
    for p in pending:
        try:
            since = datetime.fromisoformat(p.created_at)
        except ValueError:
            continue
        if p.version in done or now - since < timedelta(hours=hours):
            continue
        waited = (now - since).total_seconds() / 3600
        reason = one_line(p.last_error or "Ollama not reachable")
        events.append(Event(OLLAMA_WAITING, one_line(f"{p.tag} waiting for Ollama for {waited:.1f} h: {reason}"),
                            p.tag, p.job_id, cycle_id, reason, now.isoformat()))
        done.add(p.version)
    return events, done


def test_event(at: datetime) -> Event:
    return Event(TEST, "test notification from chatos-retrain", None, None, None, "chatos-retrain notify test",
                 at.isoformat())
