"""What the report shows, read from state (read-only) and from each recent job's ``metrics.jsonl``: plain values,
no plotting (matplotlib is :mod:`daemon.report.page`'s alone)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon.cycle import metrics
from daemon.settings import Settings
from daemon.state import LatestMove, State
from daemon.train import gate, jobspec

RECENT_JOBS = 8  # loss curves and gate checks of the newest jobs


@dataclass(frozen=True)
class Check:
    """One gate check on a job: its name, how it ended and its numbers (candidate vs champion, when it has them)."""

    name: str
    state: str  # passed, FAILED, skipped, pending
    required: bool
    detail: str
    candidate: float | None = None
    champion: float | None = None


@dataclass(frozen=True)
class JobView:
    job_id: str
    status: str
    dataset_version: int
    model_version: int | None  # the model version exported from it, if any
    created_at: str
    wall_s: float | None  # started -> finished
    tokens_per_s: float | None
    error: str | None
    champion: str | None  # what the gate compared it with
    checks: list[Check] = field(default_factory=list)
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    eval_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss): base at 0, final at the end
    metrics_note: str | None = None  # why there is no curve (pruned, unreadable)

    @property
    def label(self) -> str:
        return f"v{self.model_version}" if self.model_version is not None else self.job_id.removeprefix("j-")[:13]


@dataclass(frozen=True)
class Day:
    day: str
    eligible: int = 0
    thumbs_up: int = 0
    thumbs_down: int = 0
    feedback_events: int = 0


@dataclass(frozen=True)
class ModelView:
    version: int
    tag: str
    job_id: str
    dataset_version: int
    status: str
    created_at: str
    gguf_size: int


@dataclass(frozen=True)
class DatasetView:
    version: int
    created_at: str
    train: int
    eval: int


@dataclass(frozen=True)
class Report:
    generated_at: str
    state_dir: str
    store_root: str
    latest: int | None
    previous: int | None
    jobs: list[JobView]  # oldest first
    models: list[ModelView]
    datasets: list[DatasetView]
    days: list[Day]
    moves: list[LatestMove]
    cycles: dict[str, int]
    eligible: int
    feedback_events: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _check(c: dict[str, Any]) -> Check:
    """A gate check; the canary's comparable numbers are its perplexities."""
    cand, champ = (c.get("candidate_ppl"), c.get("champion_ppl")) if c.get("name") == "canary" else (
        c.get("candidate"), c.get("champion"))
    return Check(name=str(c.get("name", "?")), state=gate.check_state(c), required=bool(c.get("required", True)),
                 detail=str(c.get("detail", "")), candidate=_number(cand), champion=_number(champ))


def curves(lines: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Train and eval loss over steps from a job's metrics lines: step lines, and the trainer's ``evaluated``
    events of the base (step 0) and of the candidate (the last step)."""
    train: list[tuple[int, float]] = []
    evals: list[tuple[int, float]] = []
    last_step = 0
    for m in lines:
        step = m.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            last_step = max(last_step, step)
            if (loss := _number(m.get("train_loss"))) is not None:
                train.append((step, loss))
            if (ev := _number(m.get("eval_loss"))) is not None:
                evals.append((step, ev))
    for m in lines:
        if m.get("event") == "evaluated" and (ev := _number(m.get("eval_loss"))) is not None:
            if m.get("phase") == "base":
                evals.insert(0, (0, ev))
            elif m.get("phase") == "candidate":
                evals.append((last_step, ev))
    return train, evals


def _job(row: Any, versions: dict[str, int]) -> JobView:
    note = None
    try:
        lines, _ = jobspec.parse_metrics(Path(row.metrics_path).read_bytes())
    except OSError as exc:
        lines, note = [], f"no metrics ({exc.strerror or exc}; retention may have pruned the job)"
    train, evals = curves(lines)
    start, end = metrics.epoch(row.started_at), metrics.epoch(row.finished_at)
    numbers = row.gate or {}
    return JobView(
        job_id=row.job_id, status=row.status, dataset_version=row.dataset_version,
        model_version=versions.get(row.job_id), created_at=row.created_at,
        wall_s=end - start if start is not None and end is not None and end >= start else None,
        tokens_per_s=metrics.tokens_per_second(row.result, row.latest_metrics), error=row.error,
        champion=str(numbers["champion"]) if numbers.get("champion") else None,
        checks=[_check(c) for c in numbers.get("checks") or []], train_loss=train, eval_loss=evals,
        metrics_note=note if note else None if lines else "no metrics lines yet",
    )


def _days(state: State, settings: Settings) -> list[Day]:
    d = settings.dataset
    days: dict[str, dict[str, int]] = {}
    for day, count in state.examples.eligible_per_day(d.modes, d.min_score, d.include_unrated):
        days.setdefault(day, {})["eligible"] = count
    for day, up, down, events in state.feedback.per_day():
        days.setdefault(day, {}).update(thumbs_up=up, thumbs_down=down, feedback_events=events)
    return [Day(day, **counts) for day, counts in sorted(days.items()) if day]


def gather(settings: Settings, state: State, *, jobs: int = RECENT_JOBS, now: datetime | None = None) -> Report:
    """The report's values (read-only)."""
    models = state.models.all()
    versions = {m.job_id: m.version for m in models}
    marks = state.service.get()
    days = _days(state, settings)
    return Report(
        generated_at=(now or datetime.now(UTC)).isoformat(timespec="seconds"),
        state_dir=str(state.dir), store_root=str(settings.store.root),
        latest=marks.latest_model or None, previous=marks.previous_latest_model or None,
        jobs=[_job(r, versions) for r in reversed(state.jobs.recent(limit=jobs))],
        models=[ModelView(m.version, m.tag, m.job_id, m.dataset_version, m.status, m.created_at, m.gguf_size)
                for m in models],
        datasets=[DatasetView(r.version, r.created_at, r.train_count, r.eval_count)
                  for r in state.datasets.all(manifest=False)],
        days=days, moves=state.service.latest_moves(), cycles=state.cycles.outcome_counts(),
        eligible=sum(d.eligible for d in days), feedback_events=sum(d.feedback_events for d in days),
    )
