"""The Python API the CLI calls: one function per operator action, values in, values out.

``ingest``, ``StoreStatus`` and ``store_status`` live with their stages (the service and the cycle call them
there) and are re-exported here for the CLI."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.dataset import builder as dataset
from daemon.ingest import feedback
from daemon.ingest.ingestor import ingest
from daemon.service.status import StoreStatus, store_status
from daemon.settings import Settings
from daemon.state import State

__all__ = ["StoreStatus", "build_dataset", "forget", "give_feedback", "ingest", "open_state", "store_status"]


def open_state(settings: Settings) -> State:
    return State(settings.state_dir())


def build_dataset(settings: Settings, state: State, *, ingest_first: bool = True) -> dataset.BuildResult:
    if ingest_first:
        ingest(settings, state)
    return dataset.build(state, settings.dataset, str(settings.store.root))


def give_feedback(
    settings: Settings, cid: str, *, thumbs_up: bool | None, quality: str | None, note: str | None,
    better: str | None = None, now: datetime | None = None,
) -> Path:
    """Append one feedback event; ``better``: a corrected answer, with a thumbs-down only (ValueError otherwise,
    and for an event line over store.max_line_bytes)."""
    event = feedback.make_event(cid, thumbs_up=thumbs_up, quality=quality, note=note, better=better, now=now,
                                max_line_bytes=settings.store.max_line_bytes)
    return feedback.append_event(settings.store.root, event, now=now)


def forget(settings: Settings, state: State, cid: str) -> dict[str, Any]:
    """Mark a conversation deleted for good, rebuild the dataset without it, and say which jobs and model versions
    trained on it: exactly, from the jobs' plans, or (jobs from before plans were recorded) those trained on a
    dataset that held it. The current model stops being built on (the next run is a full retrain without it)."""
    known = state.conversations.get(cid) is not None
    with state.transaction():
        newly = state.conversations.mark_deleted(cid) if known else False
    versions = state.datasets.containing(cid)
    exact = set(state.jobs.trained_on(cid))
    jobs = [j for j in state.jobs.recent(limit=100000)
            if j.job_id in exact or ("plan" not in j.params and j.dataset_version in versions)]
    job_ids = {j.job_id for j in jobs}
    models = [m for m in state.models.all() if m.job_id in job_ids]
    try:
        rebuilt: dict[str, Any] = build_dataset(settings, state).as_json()
    except dataset.DatasetError as exc:
        rebuilt = {"created": False, "message": str(exc)}
    return {
        "conversation_id": cid,
        "known": known,
        "newly_deleted": newly,
        "datasets_with_it": versions,
        "jobs_trained_on_it": sorted(job_ids),
        "models_trained_on_it": [{"version": m.version, "tag": m.tag, "status": m.status} for m in models],
        "rebuilt": rebuilt,
    }
