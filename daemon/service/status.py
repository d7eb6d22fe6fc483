"""What the store and state hold, as ``status`` shows it (live from the service, or read here when none runs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import disk
from daemon.cycle import metrics, training
from daemon.settings import Settings
from daemon.state import JobRow, State
from daemon.train import gate as train_gate
from daemon.train import lineage


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

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def store_status(settings: Settings, state: State) -> StoreStatus:
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
    )


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
