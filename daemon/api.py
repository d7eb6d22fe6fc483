"""The Python API the CLI (and the service) call: one function per operator action, values in, values out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon import dataset
from daemon.settings import Settings
from daemon.state import State, utcnow
from daemon.store import feedback
from daemon.store.ingest import Ingestor, IngestReport


def open_state(settings: Settings) -> State:
    return State(settings.state_dir())


def ingest(settings: Settings, state: State, paths: Iterable[str] | None = None) -> IngestReport:
    """Read what is new in the store (all of it, or just ``paths``) into state."""
    ing = Ingestor(state, settings.store.root, max_line_bytes=settings.store.max_line_bytes,
                   examples=dataset.example_spec(settings.dataset))
    report = ing.scan(paths)
    with state.transaction():
        state.set_kv("last_ingest_at", utcnow())
    return report


def build_dataset(settings: Settings, state: State, *, ingest_first: bool = True) -> dataset.BuildResult:
    if ingest_first:
        ingest(settings, state)
    return dataset.build(state, settings.dataset, str(settings.store.root))


def give_feedback(
    settings: Settings, cid: str, *, thumbs_up: bool | None, quality: str | None, note: str | None,
    now: datetime | None = None,
) -> Path:
    event = feedback.make_event(cid, thumbs_up=thumbs_up, quality=quality, note=note, now=now)
    return feedback.append_event(settings.store.root, event, now=now)


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

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def store_status(settings: Settings, state: State) -> StoreStatus:
    c = state.counts()
    d = settings.dataset
    e = state.eligible_counts(d.modes, d.min_score, d.include_unrated)
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
        latest_dataset=state.latest_dataset_version(),
        last_ingest_at=state.get_kv("last_ingest_at"),
        latest_model=f"v{state.get_kv('latest_model')}" if state.get_kv("latest_model") else None,
        pending_registrations=[{"version": m["version"], "tag": m["tag"], "attempts": m["attempts"],
                                "next_attempt_at": m["next_attempt_at"], "last_error": m["last_error"]}
                               for m in state.models(status="pending")],
    )


def forget(settings: Settings, state: State, cid: str) -> dict[str, Any]:
    """Mark a conversation deleted for good, rebuild the dataset without it, and say which jobs and model versions
    were trained on a dataset that contained it (they are not retrained or removed automatically)."""
    known = state.conversation(cid) is not None
    with state.transaction():
        newly = state.mark_deleted(cid) if known else False
    versions = state.datasets_containing(cid)
    jobs = [j for j in state.jobs(limit=100000) if j["dataset_version"] in versions]
    job_ids = {j["job_id"] for j in jobs}
    models = [m for m in state.models() if m["job_id"] in job_ids]
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
        "models_trained_on_it": [{"version": m["version"], "tag": m["tag"], "status": m["status"]} for m in models],
        "rebuilt": rebuilt,
    }
