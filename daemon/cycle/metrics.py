"""Metrics for existing monitoring: a Prometheus textfile (node_exporter's textfile collector) written after every
cycle and at service start, and printed by ``chatos-retrain metrics``.

Three parts, each on its own: :func:`gather` reads a :class:`Snapshot` from state (the repositories' queries, the
same ones ``status`` uses; no SQL here), :func:`render` turns a snapshot into the text exposition format (pure), and
:func:`write_textfile` replaces the file atomically (a hidden temporary file in the same folder, fsync, rename, mode
0644 so node_exporter can read it). :func:`publish` ties them together for the service: a failure is one warning
line and never fails the cycle. Counters come from state, so they survive restarts; they drop only when state does.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon import __version__, disk, log
from daemon.cycle.context import Outcome
from daemon.settings import Settings
from daemon.state import DB_NAME, State

_log = log.get("daemon.cycle.metrics")

PREFIX = "chatos_retrain"
# Cycles after which the candidate is the champion and on its way to (or in) Ollama.
PROMOTED = (Outcome.PROMOTED, Outcome.REGISTERED, Outcome.PENDING_REGISTRATION)
DISK_PARTS = ("datasets", "jobs", "exports")


@dataclass(frozen=True)
class Snapshot:
    """What the metrics say, read at one moment. Times are Unix seconds; None: not known (yet), left out."""

    generated_at: float
    version: str = __version__
    cycles: dict[str, int] = field(default_factory=dict)  # outcome -> cycles so far
    last_cycle_at: float | None = None  # when the last cycle ended
    last_promotion_at: float | None = None  # when the last cycle that promoted a candidate ended
    model_version: int | None = None  # the version <model_name>:latest points at
    dataset_version: int | None = None  # the latest dataset version
    jobs: dict[str, int] = field(default_factory=dict)  # status -> jobs in it now
    job_seconds_sum: float = 0.0  # every job that ran and ended: wall time, summed
    job_seconds_count: int = 0
    last_job_seconds: float | None = None
    last_job_tokens_per_second: float | None = None
    examples: dict[str, int] = field(default_factory=dict)  # eligible, positive, new (since the latest dataset)
    conversations: int = 0
    feedback_events: int = 0
    pending_registrations: int = 0
    train_failures: int = 0  # consecutive training failures (the backoff's count)
    disk_used: dict[str, int] = field(default_factory=dict)  # state, datasets, jobs, exports -> bytes
    disk_free: int | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


# -- gather: state -> snapshot -----------------------------------------------------------------------------------


def epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


def _ended_at(started_at: str, summary: Mapping[str, Any]) -> float | None:
    """When a recorded cycle ended: its start plus its total time."""
    start = epoch(started_at)
    total = (summary.get("timings") or {}).get("total")
    return None if start is None else start + (float(total) if isinstance(total, int | float) else 0.0)


def tokens_per_second(result: Mapping[str, Any] | None, latest: Mapping[str, Any] | None) -> float | None:
    """The trainer's figure for the whole run (``result.json``), else its last metrics line's."""
    for source in (result, latest):
        value = (source or {}).get("tokens_per_s")
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def disk_usage(state_dir: Path) -> dict[str, int]:
    """Bytes used by the state database (with its WAL) and by what retention bounds (as ``status`` shows them)."""
    db = sum(disk.tree_bytes(p) for p in state_dir.glob(f"{DB_NAME}*"))
    return {"state": db, **{name: disk.tree_bytes(state_dir / name) for name in DISK_PARTS}}


def gather(settings: Settings, state: State, *, now: float | None = None) -> Snapshot:
    """Read the snapshot from state (read-only)."""
    d = settings.dataset
    counts = state.conversations.counts()
    eligible = state.examples.eligible_counts(d.modes, d.min_score, d.include_unrated)
    marks = state.service.get()
    last = state.cycles.last()
    promoted = state.cycles.last_with([str(o) for o in PROMOTED])
    durations: list[float] = []
    for _, started, finished in state.jobs.spans():
        a, b = epoch(started), epoch(finished)
        if a is not None and b is not None and b >= a:
            durations.append(b - a)
    ended = [j for j in state.jobs.recent(limit=20) if j.finished_at]
    last_job = ended[0] if ended else None
    last_span = (epoch(last_job.started_at), epoch(last_job.finished_at)) if last_job else (None, None)
    return Snapshot(
        generated_at=time.time() if now is None else now,
        cycles={str(o): 0 for o in Outcome} | state.cycles.outcome_counts(),
        last_cycle_at=_ended_at(last.started_at, last.summary) if last else None,
        last_promotion_at=_ended_at(promoted.started_at, promoted.summary) if promoted else None,
        model_version=marks.latest_model,
        dataset_version=state.datasets.latest_version(),
        jobs=state.jobs.status_counts(),
        job_seconds_sum=sum(durations),
        job_seconds_count=len(durations),
        last_job_seconds=(last_span[1] - last_span[0]
                          if last_span[0] is not None and last_span[1] is not None else None),
        last_job_tokens_per_second=(tokens_per_second(last_job.result, last_job.latest_metrics)
                                    if last_job else None),
        examples={"eligible": eligible["eligible"], "positive": eligible["positive"],
                  "new": eligible["new_since_dataset"]},
        conversations=counts["conversations"],
        feedback_events=counts["feedback_events"],
        pending_registrations=len(state.models.all(status="pending")),
        train_failures=marks.train_failures,
        disk_used=disk_usage(state.dir),
        disk_free=disk.free_bytes(state.dir),
    )


# -- render: snapshot -> text exposition format (pure) -----------------------------------------------------------


def escape_label(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and line feed escaped (quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def number(value: float) -> str:
    """A sample value: integers without a decimal point, floats in full precision, NaN and +Inf/-Inf spelled as the
    format spells them."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


Sample = tuple[str, Mapping[str, str], float]  # (suffix, labels, value)


@dataclass(frozen=True)
class Family:
    """One metric: its name (without the prefix), type, help and samples."""

    name: str
    type: str  # counter, gauge, summary
    help: str
    samples: Sequence[Sample]


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in sorted(labels.items())) + "}"


def exposition(families: Iterable[Family]) -> str:
    """The text exposition format (version 0.0.4) of ``families``: HELP and TYPE lines, then the samples; a family
    without samples is left out. Ends with a line feed."""
    lines: list[str] = []
    for f in families:
        if not f.samples:
            continue
        name = f"{PREFIX}_{f.name}"
        lines.append(f"# HELP {name} {escape_help(f.help)}")
        lines.append(f"# TYPE {name} {f.type}")
        lines.extend(f"{name}{suffix}{_labels(labels)} {number(value)}" for suffix, labels, value in f.samples)
    return "\n".join(lines) + "\n"


def _one(value: float | None) -> list[Sample]:
    return [] if value is None else [("", {}, value)]


def _by(label: str, values: Mapping[str, float]) -> list[Sample]:
    return [("", {label: k}, v) for k, v in sorted(values.items())]


def families(s: Snapshot) -> list[Family]:
    """The snapshot as metric families (names follow Prometheus conventions: ``_total`` counters, base units)."""
    return [
        Family("build_info", "gauge", "The running chatos-retrain version (always 1).",
               [("", {"version": s.version}, 1)]),
        Family("metrics_timestamp_seconds", "gauge", "When these metrics were gathered (Unix time).",
               _one(s.generated_at)),
        Family("cycles_total", "counter", "Cycles run, by how they ended.", _by("outcome", s.cycles)),
        Family("last_cycle_timestamp_seconds", "gauge", "When the last cycle ended (Unix time).",
               _one(s.last_cycle_at)),
        Family("last_promotion_timestamp_seconds", "gauge",
               "When the last cycle that promoted a candidate (promoted, registered or pending registration) ended "
               "(Unix time).", _one(s.last_promotion_at)),
        Family("model_version", "gauge", "The model version <model_name>:latest points at (0: none yet).",
               _one(s.model_version or 0)),
        Family("dataset_version", "gauge", "The latest dataset version (0: none yet).", _one(s.dataset_version or 0)),
        Family("jobs", "gauge", "Training jobs held in state, by status (a job moves from running to its outcome).",
               _by("status", s.jobs)),
        Family("job_duration_seconds", "summary", "Wall time of the training jobs that ran and ended (to the second).",
               [("_sum", {}, s.job_seconds_sum), ("_count", {}, s.job_seconds_count)]),
        Family("last_job_duration_seconds", "gauge", "Wall time of the last training job that ended.",
               _one(s.last_job_seconds)),
        Family("tokens_per_second", "gauge", "Training throughput of the last job that ended (tokens per second).",
               _one(s.last_job_tokens_per_second)),
        Family("examples", "gauge",
               "Conversations that pass the dataset filter (eligible), the positive ones among them, and those "
               "not in the latest dataset version (new).", _by("kind", s.examples)),
        Family("conversations", "gauge", "Conversations held in state.", _one(s.conversations)),
        Family("feedback_events_total", "counter", "Feedback events ingested.", _one(s.feedback_events)),
        Family("pending_registrations", "gauge", "Exported model versions waiting for Ollama (retried with backoff).",
               _one(s.pending_registrations)),
        Family("training_failures", "gauge", "Consecutive training failures (0 after a success).",
               _one(s.train_failures)),
        Family("disk_used_bytes", "gauge", "Bytes used under the state directory, by part.", _by("what", s.disk_used)),
        Family("disk_free_bytes", "gauge", "Free bytes on the state directory's file system.", _one(s.disk_free)),
    ]


def render(snapshot: Snapshot) -> str:
    """The snapshot in the Prometheus text exposition format."""
    return exposition(families(snapshot))


# -- write: atomically, readable by node_exporter ------------------------------------------------------------------


def temp_name(path: Path) -> Path:
    """The temporary file beside ``path``: hidden and not ending in ``.prom``, so the collector never reads it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a reader sees the old file or the new one, never a part. Mode 0644
    whatever the umask (node_exporter runs as another user). Raises OSError."""
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.fchmod(fd, 0o644)
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish(settings: Settings, state: State) -> bool:
    """Write ``metrics.textfile`` when configured. Never raises: a failure (folder missing, permission, disk full, a
    state that cannot be read) is one warning line. True when the file was written."""
    path = settings.metrics.textfile
    if path is None:
        return False
    try:
        write_textfile(path, render(gather(settings, state)))
    except Exception as exc:
        reason = (f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.strerror
                  else f"{type(exc).__name__}: {exc}")
        _log.warning("metrics.not_written", path=str(path), reason=reason)
        return False
    return True


__all__ = ["Family", "Snapshot", "disk_usage", "escape_help", "escape_label", "exposition", "families", "gather",
           "publish", "render", "temp_name", "write_textfile"]
