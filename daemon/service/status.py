"""What the store and state hold, as ``status`` shows it (live from the service, or read here when none runs)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon import disk
from daemon.cycle import deciding, metrics, training
from daemon.settings import Settings
from daemon.state import JobRow, State
from daemon.train import gate as train_gate
from daemon.train import jobspec, lineage, policy, progress


@dataclass
class StoreStatus:
    store_root: str
    state_dir: str
    files_tracked: int
    conversations: dict[str, int]
    feedback_events: int
    feedback_waiting: int
    new_eligible_since_dataset: int
    latest_dataset: int | None
    last_ingest_at: str | None
    latest_model: str | None = None
    pending_registrations: list[dict[str, Any]] | None = None
    disk: dict[str, int] | None = None  # bytes used by state, datasets, jobs, exports; free on the state's disk
    model: dict[str, Any] | None = None  # the champion: its plan, lineage depth, deleted chats it still holds
    gate: dict[str, Any] | None = None  # the gate's checks on the champion and on the last candidate judged
    job: dict[str, Any] | None = None  # the running job: step N/M, %, tokens/s, ETA (progress.JobProgress)
    waiting: dict[str, Any] | None = None  # the policy now: what training waits for, and when it expects to run

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def store_status(settings: Settings, state: State, now: datetime | None = None) -> StoreStatus:
    now = now or datetime.now(UTC)
    c = state.conversations.counts()
    marks = state.service.get()
    d = settings.dataset
    e = state.examples.eligible_counts(d.modes, d.min_score, d.include_unrated)
    return StoreStatus(
        store_root=str(settings.store.root),
        state_dir=str(state.dir),
        files_tracked=c["files"],
        conversations={
            "total": c["conversations"],
            "eligible": e["eligible"],
            "positive": e["positive"],
            "deleted": c["deleted"],
            "unusable": c["unusable"],
            "rejected_lines": c["rejected_lines"],
        },
        feedback_events=c["feedback_events"],
        feedback_waiting=c["feedback_waiting"],
        new_eligible_since_dataset=e["new_since_dataset"],
        latest_dataset=state.datasets.latest_version(),
        last_ingest_at=marks.last_ingest_at,
        latest_model=f"v{marks.latest_model}" if marks.latest_model else None,
        pending_registrations=[{"version": m.version, "tag": m.tag, "attempts": m.attempts,
                                "next_attempt_at": m.next_attempt_at, "last_error": m.last_error}
                               for m in state.models.all(status="pending")],
        disk=disk_usage(state.dir),
        model=model_status(settings, state),
        gate=gate_status(state),
        job=running_job(state, now),
        waiting=waiting_for(settings, state, now),
    )


def running_job(state: State, now: datetime) -> dict[str, Any] | None:
    """The running job's progress from its metrics file so far (steps of the plan's ``max_steps``), or None."""
    rows = state.jobs.recent(status="running", limit=1)
    if not rows:
        return None
    row = rows[0]
    try:
        lines, _ = jobspec.parse_metrics(Path(row.metrics_path).read_bytes())
    except OSError:
        lines = []
    total = (row.params.get("training") or {}).get("max_steps") or (row.params.get("plan") or {}).get("steps")
    seen = progress.job_progress(lines, total if isinstance(total, int) else None, now)
    return {"job_id": row.job_id, "dataset_version": row.dataset_version,
            **(seen.as_json() if seen else {}), "line": seen.line() if seen else "starting (no step finished yet)"}


def waiting_for(settings: Settings, state: State, now: datetime) -> dict[str, Any]:
    """The training policy evaluated now: the one thing it waits for (its reason), and when it expects to train."""
    decision = policy.decide(deciding.policy_input(settings, state, now), settings.policy, now)
    backoff = deciding.backoff_until(state)
    if decision.train and backoff is not None and backoff > now:
        return {"train": False, "reason": "backing off after a failed job",
                "next": f"at {policy.clock(backoff, now)} (in {policy.span(backoff - now)})"}
    return {"train": decision.train, "reason": decision.reason, "next": policy.expected_next(decision)}


def model_status(settings: Settings, state: State) -> dict[str, Any] | None:
    """The champion (the model new runs build on): how it was trained, and the deleted or un-voted chats it still
    holds (warm starts stop until a full retrain from the base leaves them out)."""
    job_id = state.service.get().champion_job
    rows = lineage.chain(state, job_id) if job_id else []
    if not rows:
        return None
    gone = lineage.forgotten(state, settings.dataset, rows[0].job_id)
    p = rows[0].params.get("plan") or {}
    upcoming = training.preview(settings, state)
    return {
        "champion_job": rows[0].job_id,
        "dataset_version": rows[0].dataset_version,
        "init": p.get("init"),
        "plan": p.get("line") or None,
        "lineage": [r.job_id for r in rows],
        "deleted_in_model": len(gone),
        "next_plan": upcoming.get("line") if upcoming else None,
        "note": (f"{len(gone)} deleted chat(s) still in the current model: the next run retrains from the base "
                 "without them") if gone else None,
    }


def _judged(row: JobRow) -> dict[str, Any]:
    gate = row.gate or {}
    return {"job_id": row.job_id, "status": row.status, "dataset_version": row.dataset_version,
            "checks": gate.get("checks") or [], "failed": gate.get("failed") or [],
            "lines": train_gate.lines(gate)}


def gate_status(state: State) -> dict[str, Any] | None:
    """The gate's checks (name, passed/skipped/pending, numbers) on the champion and on the last candidate it judged
    (when that is not the champion), or None before any judgement."""
    champion_id = state.service.get().champion_job
    champion = state.jobs.get(champion_id) if champion_id else None
    last = next((r for r in state.jobs.recent(limit=20) if r.gate is not None), None)
    if (champion is None or champion.gate is None) and last is None:
        return None
    return {
        "champion": _judged(champion) if champion is not None and champion.gate is not None else None,
        "last_candidate": _judged(last) if last is not None and last.job_id != champion_id else None,
    }


def disk_usage(state_dir: Path) -> dict[str, int]:
    """What retention bounds, measured: the database (with its WAL), datasets, jobs and exports, and free space."""
    return {**metrics.disk_usage(state_dir), "free": disk.free_bytes(state_dir)}
