"""What the disk may let go of (pure): GGUFs of model versions Ollama no longer keeps, the bulky artifacts of old
jobs that no kept model needs, and dataset versions nothing kept refers to.

Kept on disk, always: the GGUF of every version ``ollama.keep_versions`` keeps registered, of the current and the
previous ``latest``, and of every version not registered yet (pending or exported: the registration is retried
from it); the artifacts of the champion job, of every kept version's job and of every job still running; the
dataset versions those jobs trained on, the newest ``retention.keep_datasets`` versions and the newest of all.
A job's ``metrics.jsonl``, ``result.json``, ``job.log`` and ``config.yaml`` are kept whatever happens to the rest
of its folder: what it did stays readable (``job show``, the report).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

# What a pruned job keeps: the record of what it did.
JOB_RECORD_FILES = frozenset({"metrics.jsonl", "result.json", "job.log", "config.yaml"})
LIVE_JOB = frozenset({"starting", "running"})
UNREGISTERED = frozenset({"pending", "exported"})


@dataclass(frozen=True)
class ModelFacts:
    version: int
    job_id: str
    dataset_version: int | None
    status: str  # pending | exported | registered | deleted | failed
    gguf_path: str | None


@dataclass(frozen=True)
class JobFacts:
    job_id: str
    status: str
    dataset_version: int | None
    job_dir: str
    finished_at: datetime | None
    pruned: bool = False


@dataclass(frozen=True)
class DatasetFacts:
    version: int
    path: str
    pruned: bool = False


@dataclass(frozen=True)
class Rules:
    keep_versions: int  # ollama.keep_versions
    job_artifacts_age: timedelta  # retention.job_artifacts_age
    keep_datasets: int  # retention.keep_datasets


@dataclass
class Plan:
    """What to delete, each with the version or job it belongs to."""

    ggufs: list[tuple[int, str]] = field(default_factory=list)
    job_artifacts: list[tuple[str, str]] = field(default_factory=list)
    datasets: list[tuple[int, str]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.ggufs or self.job_artifacts or self.datasets)


def kept_versions(models: Sequence[ModelFacts], keep: int, latest: int | None, previous: int | None) -> set[int]:
    registered = sorted(m.version for m in models if m.status == "registered")
    kept = set(registered[-keep:]) if keep > 0 else set()
    kept |= {v for v in (latest, previous) if v is not None}
    kept |= {m.version for m in models if m.status in UNREGISTERED}
    return kept


def plan(models: Sequence[ModelFacts], jobs: Sequence[JobFacts], datasets: Sequence[DatasetFacts], *,
         latest: int | None, previous: int | None, champion_job: str | None, rules: Rules, now: datetime) -> Plan:
    """Everything the rules above let go of, now."""
    out = Plan()
    versions = kept_versions(models, rules.keep_versions, latest, previous)
    for m in models:
        if m.version not in versions and m.gguf_path:
            out.ggufs.append((m.version, m.gguf_path))
    kept_jobs = {m.job_id for m in models if m.version in versions} | ({champion_job} if champion_job else set())
    kept_jobs |= {j.job_id for j in jobs if j.status in LIVE_JOB}
    for j in jobs:
        old = j.finished_at is not None and now - j.finished_at >= rules.job_artifacts_age
        if j.job_id not in kept_jobs and old and not j.pruned:
            out.job_artifacts.append((j.job_id, j.job_dir))
    needed = {j.dataset_version for j in jobs if j.job_id in kept_jobs and j.dataset_version is not None}
    needed |= {m.dataset_version for m in models if m.version in versions and m.dataset_version is not None}
    newest = sorted(d.version for d in datasets)
    needed |= set(newest[-max(1, rules.keep_datasets):])
    for d in datasets:
        if d.version not in needed and not d.pruned:
            out.datasets.append((d.version, d.path))
    return out
