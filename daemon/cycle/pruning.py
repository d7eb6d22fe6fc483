"""Stage: keep the disk bounded. Every cycle, before it ingests, remove what the retention plan lets go of
(:mod:`daemon.cycle.retention_plan`): GGUFs of versions Ollama no longer keeps (with the Modelfile beside each), old
jobs' bulky artifacts (their record files stay), dataset versions nothing kept refers to. What went is recorded in
``state.pruned``; a failure to remove one thing is one warning and never stops the cycle."""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path

from daemon import disk, log
from daemon.cycle.context import Cycle
from daemon.cycle.retention_plan import JOB_RECORD_FILES, DatasetFacts, JobFacts, ModelFacts, Plan, Rules, plan
from daemon.publish import modelfile
from daemon.settings import Settings
from daemon.state import State
from daemon.state.pruned import PrunedKind

_log = log.get("daemon.cycle")


def rules(settings: Settings) -> Rules:
    r = settings.retention
    return Rules(keep_versions=settings.ollama.keep_versions,
                 job_artifacts_age=timedelta(seconds=r.job_artifacts_age), keep_datasets=r.keep_datasets)


def _when(iso: str | None) -> datetime | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso)
    except ValueError:
        return None


def current_plan(settings: Settings, state: State, now: datetime) -> Plan:
    """The retention plan for what state holds now."""
    pruned_jobs, pruned_datasets = state.pruned.keys("job"), state.pruned.keys("dataset")
    pruned_ggufs = state.pruned.keys("gguf")
    models = [ModelFacts(m.version, m.job_id, m.dataset_version, m.status,
                         None if str(m.version) in pruned_ggufs else m.gguf_path) for m in state.models.all()]
    jobs = [JobFacts(j.job_id, j.status, j.dataset_version, j.job_dir, _when(j.finished_at),
                     j.job_id in pruned_jobs) for j in state.jobs.recent(limit=1_000_000)]
    datasets = [DatasetFacts(d.version, d.path, str(d.version) in pruned_datasets)
                for d in state.datasets.all(manifest=False)]
    marks = state.service.get()
    return plan(models, jobs, datasets, latest=marks.latest_model, previous=marks.previous_latest_model,
                champion_job=marks.champion_job, rules=rules(settings), now=now)


def _remove(path: Path) -> int:
    """Remove a file or a folder; the bytes it held."""
    size = disk.tree_bytes(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    return size


def _inside(path: Path, root: Path) -> bool:
    """Only what lies under the state folder is ever removed (a row pointing elsewhere is left alone)."""
    try:
        return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)
    except OSError:
        return False


def _job_artifacts(job_dir: Path) -> int:
    """Everything in a job's folder but its record (metrics, result, log, config)."""
    freed = 0
    if job_dir.is_dir():
        for entry in job_dir.iterdir():
            if entry.name not in JOB_RECORD_FILES:
                freed += _discard(entry)
    return freed


TRASH = ".pruning-"


def _discard(path: Path) -> int:
    """Remove a folder or file so that, at every instant, it is either whole or gone: renamed into a trash name
    first (atomic), then deleted. A crash in between leaves only trash, which :func:`sweep` removes."""
    if not (path.exists() or path.is_symlink()):
        return 0
    trash = path.with_name(f"{TRASH}{path.name}")
    os.rename(path, trash)
    return _remove(trash)


def sweep(state_dir: Path) -> None:
    """Finish what a crash interrupted: trash left by :func:`_discard`."""
    for trash in [*state_dir.glob(f"datasets/{TRASH}*"), *state_dir.glob(f"exports/*/{TRASH}*"),
                  *state_dir.glob(f"jobs/*/{TRASH}*")]:
        try:
            _remove(trash)
        except OSError as exc:
            _log.warning("retention.failed", path=str(trash), reason=exc.strerror or str(exc))


def execute(state: State, todo: Plan, at: str) -> dict[str, int]:
    """Remove what ``todo`` names and record it; returns counts and the bytes freed. A GGUF or dataset is recorded
    as pruned first (committed), then discarded whole (:func:`_discard`), so state never names a half-removed
    folder as complete; a job's artifacts are recorded once gone (a crash midway leaves the job to prune again)."""
    done = {"ggufs": 0, "jobs": 0, "datasets": 0, "freed": 0}
    steps: list[tuple[PrunedKind, str, Path, str]] = (
        [("gguf", str(v), Path(p), "ggufs") for v, p in todo.ggufs]
        + [("job", j, Path(d), "jobs") for j, d in todo.job_artifacts]
        + [("dataset", str(v), Path(p), "datasets") for v, p in todo.datasets]
    )
    for kind, key, path, counter in steps:
        if not _inside(path, state.dir):
            _log.warning("retention.outside_state", kind=kind, key=key, path=str(path))
            continue
        try:
            if kind == "job":
                freed = _job_artifacts(path)
                with state.transaction():
                    state.pruned.mark(kind, key, at=at, freed=freed)
            else:
                beside = modelfile.describes(path) if kind == "gguf" else None  # the GGUF's Modelfile goes too
                freed = disk.tree_bytes(path) + (disk.tree_bytes(beside) if beside else 0)  # measured once
                with state.transaction():
                    state.pruned.mark(kind, key, at=at, freed=freed)
                if beside:
                    _discard(beside)
                _discard(path)
        except OSError as exc:
            _log.warning("retention.failed", kind=kind, key=key, path=str(path), reason=exc.strerror or str(exc))
            continue
        done[counter] += 1
        done["freed"] += freed
    return done


def run(cycle: Cycle) -> bool:
    sweep(cycle.state.dir)
    todo = current_plan(cycle.settings, cycle.state, cycle.now())
    if todo.empty():
        return True
    done = execute(cycle.state, todo, cycle.now().isoformat())
    cycle.result.counts["pruned"] = done
    _log.info("retention.pruned", **done)
    return True
