"""Typed rows of the state database: plain values the repositories return and take. JSON columns arrive decoded
(``params``, ``result``, ``gate``, ``eval``, ``summary``, ``manifest``); ``as_dict`` gives the row as the JSON
object the CLI and the API print (column names as keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far one store file has been read, and what it looked like then (see ``ingest.tail``)."""

    path: str
    kind: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    offset: int
    lines: int
    head_len: int
    head_hash: str
    tail_len: int
    tail_hash: str


@dataclass(frozen=True, slots=True)
class Eligible:
    """A conversation that passes the dataset filter, with its effective score and where its record lies."""

    cid: str
    messages: str
    mode: str
    model: str | None
    score: int
    rated: bool
    src_path: str
    src_offset: int
    src_len: int


@dataclass(frozen=True, slots=True)
class DatasetRow:
    """One built dataset version (its files under ``path``)."""

    version: int
    created_at: str
    path: str
    fingerprint: str
    content_hash: str
    train_count: int
    eval_count: int
    manifest: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CycleRow:
    """One service cycle and its canonical summary (the cycle's result as logged)."""

    cycle_id: str
    started_at: str
    outcome: str
    reason: str
    summary: dict[str, Any]
    trained: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRow:
    """One training job: where its files are, the process running it, and what it reported. Fields in column
    order (``as_dict`` prints them so)."""

    job_id: str
    cycle_id: str | None = None
    dataset_version: int
    status: str
    pid: int | None = None
    pid_start: int | None = None
    job_dir: str
    config_path: str
    log_path: str
    metrics_path: str
    result_path: str
    params: dict[str, Any]
    latest_metrics: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    exit_code: int | None = None
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    gate: dict[str, Any] | None = None  # the gate's numbers (``checks``...), once judged

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRow:
    """One exported model version (a GGUF) and its registration with Ollama. Fields in column order."""

    version: int
    job_id: str
    dataset_version: int
    manifest_hash: str | None = None
    gguf_path: str
    gguf_sha256: str
    gguf_size: int
    architecture: str | None = None
    chat_template: str
    eval: dict[str, Any] | None = None
    status: str
    tag: str
    ollama_digest: str | None = None
    attempts: int = 0
    next_attempt_at: str | None = None
    last_error: str | None = None
    created_at: str
    registered_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class LatestMove:
    """``latest`` moved to ``version`` at ``at`` from ``previous`` (None: none): ``registered`` or ``rollback``."""

    at: str
    version: int
    previous: int | None
    how: str


@dataclass(frozen=True, slots=True)
class ServiceRow:
    """The service's own progress: the champion job and the dataset it trained on, the training backoff, the model
    version ``latest`` points at (and the one before), and when ingest and training last ran."""

    champion_job: str | None = None
    last_trained_dataset: int | None = None
    last_run_at: str | None = None
    last_ingest_at: str | None = None
    train_failures: int = 0
    train_backoff_until: str | None = None
    latest_model: int | None = None
    previous_latest_model: int | None = None


@dataclass(frozen=True, slots=True)
class PendingExport:
    """A promoted job whose export has not settled yet (a crash or a stop interrupted it): the gate numbers it was
    promoted with and, once spawned, the export child that may outlive a killed service."""

    job_id: str
    gate: dict[str, Any]
    pid: int | None = None
    pid_start: int | None = None
