"""The absolute-path training runner (its processes start through ``daemon.proc``, the only module that spawns).

:mod:`daemon.train.jobspec` builds the values (the job config with every path absolute, the argv, the meaning of an
exit code); this shell creates ``jobs/<job_id>/``, spawns the trainer in its own session with output to
``job.log``, tails ``metrics.jsonl`` into progress, enforces the timeout and cancellation (SIGTERM to the group,
grace, SIGKILL, each logged) and records the job in state. A job found ``running`` after a restart is re-attached
when its pid is alive with the same start time, else marked ``interrupted``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon import faults, log
from daemon.proc import Popen, alive, process_start_time, spawn_in_session, stop_group
from daemon.state import JobRow, State, private_dir, utcnow
from daemon.train.jobspec import interpret_exit, parse_metrics, trainer_argv

_log = log.get("daemon.train.runner")

TRAINER_SCRIPT = Path(__file__).resolve().parent.parent / "trainer" / "train_qlora.py"
GRACE_S = 10.0


def run_supervised(
    argv: Sequence[str],
    *,
    cwd: Path,
    log_path: Path,
    timeout_s: float,
    stop: threading.Event,
    env: Mapping[str, str] | None = None,
    grace_s: float = GRACE_S,
    on_start: Callable[[int, int | None], None] | None = None,
) -> tuple[int | None, str]:
    """A long child that is not a training job (merge + convert): own session, output to ``log_path``, bounded by
    ``timeout_s`` and the service's stop event (SIGTERM to the group, grace, SIGKILL). Returns (exit code, why).
    ``on_start(pid, start time)`` lets the caller record the child, which outlives a SIGKILLed service."""
    _log.info("command.run", argv=[str(a) for a in argv], cwd=str(cwd))
    proc = spawn_in_session(argv, cwd=cwd, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
                            log_path=log_path)
    job = Job({"job_id": f"pid-{proc.pid}", "job_dir": str(cwd), "pid": proc.pid, "metrics_path": os.devnull,
               "result_path": os.devnull}, proc)
    if on_start is not None:
        on_start(proc.pid, process_start_time(proc.pid))
    started, wake = time.monotonic(), threading.Event()
    while proc.poll() is None:
        if stop.is_set() or time.monotonic() - started > timeout_s:
            why = "the service is stopping" if stop.is_set() else f"timed out after {timeout_s:g}s"
            stop_group(job.pid, job.running, job.id, why, grace_s, wake)
            return proc.poll(), why
        wake.wait(0.2)
    return proc.returncode, "finished"


@dataclass
class JobOutcome:
    job_id: str
    status: str  # succeeded | failed | timeout | cancelled | interrupted
    reason: str
    exit_code: int | None = None
    result: dict[str, Any] | None = None
    latest: dict[str, Any] = field(default_factory=dict)


class Job:
    """One spawned (or re-attached) trainer and its files."""

    def __init__(self, row: dict[str, Any], proc: Popen[bytes] | None = None) -> None:
        self.row = row
        self.id: str = row["job_id"]
        self.dir = Path(row["job_dir"])
        self.proc = proc
        self.pid: int = row["pid"]
        self.pid_start: int | None = row.get("pid_start")
        self._metrics_pos = 0
        self._metrics_rest = b""
        self.latest: dict[str, Any] = {}
        self.finished_event: dict[str, Any] | None = None
        self._saved = 0.0

    def poll_metrics(self) -> list[dict[str, Any]]:
        """New complete lines of metrics.jsonl since the last call."""
        path = Path(self.row["metrics_path"])
        try:
            with path.open("rb") as f:
                f.seek(self._metrics_pos)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._metrics_pos += len(chunk)
        lines, self._metrics_rest = parse_metrics(self._metrics_rest + chunk)
        for obj in lines:
            if obj.get("event") == "job_finished":
                self.finished_event = obj
            elif "step" in obj:
                self.latest = obj
        return lines

    def follow(self, state: State, on_progress: Callable[[dict[str, Any]], None] | None) -> None:
        """New step lines to ``on_progress``; the latest one saved in state at most every 2 s."""
        for obj in self.poll_metrics():
            if on_progress and "step" in obj:
                on_progress(obj)
        if time.monotonic() - self._saved > 2.0 and self.latest:
            with state.transaction():
                state.jobs.progress(self.id, self.latest)
            self._saved = time.monotonic()

    def exit_code(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        return None if alive(self.pid, self.pid_start) else -1

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return alive(self.pid, self.pid_start)


def record_job(
    state: State,
    *,
    config: dict[str, Any],
    dataset_version: int,
    cycle_id: str | None,
    created_at: str | None = None,
    plan: dict[str, Any] | None = None,
    trained: Iterable[str | tuple[str, int]] = (),
    executor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create the job folder and its ``config.yaml`` and record the job as ``starting``; returns its row.
    ``executor``: where it runs when not here (``{"executor": "ray", ...}``), kept in the row's params."""
    job_id = config["job_id"]
    job_dir = private_dir(Path(config["training"]["output_dir"]).parent)
    cfg_path = job_dir / "config.yaml"
    fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    new = JobRow(
        job_id=job_id, cycle_id=cycle_id, dataset_version=dataset_version, status="starting",
        job_dir=str(job_dir), config_path=str(cfg_path), log_path=str(job_dir / "job.log"),
        metrics_path=config["metrics"]["output_path"], result_path=config["result"]["output_path"],
        params={"backend": config["backend"], "model": config["model"], "training": config["training"],
                "lora": config["lora"], **({"plan": plan} if plan is not None else {}), **(executor or {})},
        created_at=created_at or utcnow(),
    )
    with state.transaction():
        state.jobs.add(new)
        state.jobs.add_trained(job_id, trained)
    return new.as_dict()


def start_job(
    state: State,
    *,
    python: Path,
    config: dict[str, Any],
    dataset_version: int,
    cycle_id: str | None,
    env: Mapping[str, str] | None = None,
    script: Path = TRAINER_SCRIPT,
    created_at: str | None = None,
    plan: dict[str, Any] | None = None,
    trained: Iterable[str | tuple[str, int]] = (),
) -> Job:
    """Create the job folder and config, spawn the trainer, record the job as running. ``created_at`` (ISO 8601,
    the cycle's clock; now by default) dates the run for the policy's daily limit; ``plan`` (its summary) and
    ``trained`` (the conversations it trains on) are recorded with the job, for its lineage."""
    job_id = config["job_id"]
    row = record_job(state, config=config, dataset_version=dataset_version, cycle_id=cycle_id,
                     created_at=created_at, plan=plan, trained=trained)
    job_dir, log_path = Path(row["job_dir"]), Path(row["log_path"])
    argv = trainer_argv(python, script, Path(row["config_path"]))
    child_env = {**os.environ, **(env or {}), "CHATOS_JOB_ID": job_id, "PYTHONUNBUFFERED": "1"}
    _log.info("job.spawn", job_id=job_id, argv=argv, cwd=str(job_dir))
    try:
        proc = spawn_in_session(argv, cwd=job_dir, env=child_env, log_path=log_path)
    except OSError as exc:
        with state.transaction():
            state.jobs.stopped(job_id, status="failed", error=f"cannot start the trainer: {exc.strerror or exc}",
                               finished_at=utcnow())
        raise
    faults.point("job.spawned")  # the trainer runs, its row still says starting
    row.update(pid=proc.pid, pid_start=process_start_time(proc.pid), status="running", started_at=utcnow())
    with state.transaction():
        state.jobs.running(job_id, pid=row["pid"], pid_start=row["pid_start"], started_at=row["started_at"])
    return Job(row, proc)


def supervise(
    state: State,
    job: Job,
    *,
    timeout_s: float,
    cancel: threading.Event,
    stop: threading.Event,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    grace_s: float = GRACE_S,
    tick_s: float = 0.25,
) -> JobOutcome:
    """Follow a job to its end; returns the outcome after recording it in state."""
    started = time.monotonic()
    wake = threading.Event()
    forced: tuple[str, str] | None = None
    while True:
        job.follow(state, on_progress)
        if not job.running():
            break
        if forced is None:
            if cancel.is_set():
                forced = ("cancelled", "cancelled by an operator")
            elif stop.is_set():
                forced = ("interrupted", "the service is stopping")
            elif time.monotonic() - started > timeout_s:
                forced = ("timeout", f"no result after training.timeout ({timeout_s:g}s)")
            if forced is not None:
                stop_group(job.pid, job.running, job.id, forced[1], grace_s, wake)
                continue
        wake.wait(tick_s)
    job.poll_metrics()
    code = job.exit_code()
    outcome = _outcome(job, code, forced)
    with state.transaction():
        state.jobs.finished(job.id, status=outcome.status, exit_code=code, error=None if outcome.status == "succeeded"
                            else outcome.reason, result=outcome.result, latest_metrics=job.latest or None,
                            finished_at=utcnow())
    res = outcome.result or {}
    _log.info("job.finished", job_id=job.id, status=outcome.status, reason=outcome.reason, exit_code=code,
              final_loss=res.get("final_train_loss"), steps=res.get("steps"), tokens_per_s=res.get("tokens_per_s"),
              timings=res.get("timings"))  # where the time went: imports, model load, tokenize, first step, ...
    return outcome


def _outcome(job: Job, code: int | None, forced: tuple[str, str] | None) -> JobOutcome:
    result: dict[str, Any] | None = None
    try:
        loaded = json.loads(Path(job.row["result_path"]).read_text())
        result = loaded if isinstance(loaded, dict) else None
    except (OSError, ValueError):
        result = None
    if forced is not None:
        return JobOutcome(job.id, forced[0], forced[1], code, None, job.latest)
    reattached = job.proc is None
    status, reason = interpret_exit(0 if reattached and result is not None else code)
    error = (job.finished_event or {}).get("error")
    if status == "succeeded" and result is None:
        status, reason = "failed", "the trainer exited 0 but wrote no result.json"
    elif reattached and result is None:
        status, reason = "failed", "the re-attached trainer ended without a result.json"
    if status != "succeeded" and error:
        reason = f"{reason}: {str(error).splitlines()[0][:300]}"
    return JobOutcome(job.id, status, reason, code, result if status == "succeeded" else None, job.latest)


def find_trainer(job_id: str) -> int | None:
    """The process group leader of a trainer spawned for ``job_id`` whose pid never reached state (the service died
    between the spawn and recording it), found by the ``CHATOS_JOB_ID`` its environment carries."""
    needle = f"CHATOS_JOB_ID={job_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            leader = os.getpgid(pid) == pid
        except OSError:  # gone, or not ours
            continue
        if leader and needle in env:
            return pid
    return None


def reattach(state: State) -> tuple[list[Job], list[str]]:
    """Jobs left ``running``/``starting`` by a previous service: the live ones to re-attach (and the ones that ended
    with a ``result.json`` while no service watched: their work is kept), the rest interrupted."""
    live: list[Job] = []
    lost: list[str] = []
    for job_row in state.jobs.recent(status="running") + state.jobs.recent(status="starting"):
        row = job_row.as_dict()
        if is_remote(row):  # its process is on a cluster: the executor asks the cluster (ray_jobs.supervise)
            _log.info("job.reattached", job_id=row["job_id"], executor=row["params"].get("executor"))
            live.append(Job({**row, "pid": 0}))
            continue
        pid, start = row.get("pid"), row.get("pid_start")
        if not pid and (found := find_trainer(row["job_id"])) is not None:
            pid, start = found, process_start_time(found)
            row = {**row, "pid": pid, "pid_start": start, "status": "running"}
            with state.transaction():
                state.jobs.running(row["job_id"], pid=pid, pid_start=start)
        if (pid and alive(pid, start)) or Path(row["result_path"]).is_file():
            _log.info("job.reattached", job_id=row["job_id"], pid=pid, running=bool(pid and alive(pid, start)))
            live.append(Job({**row, "pid": pid or 0}))
        else:
            with state.transaction():
                state.jobs.stopped(row["job_id"], status="interrupted", finished_at=utcnow(),
                                   error="the service stopped while it ran and the process is gone")
            _log.warning("job.interrupted", job_id=row["job_id"], pid=pid)
            lost.append(row["job_id"])
    return live, lost


def is_remote(row: Mapping[str, Any]) -> bool:
    """The job runs on a cluster (``training.executor: ray``), not as a process here."""
    return bool((row.get("params") or {}).get("executor", "local") != "local")


def stop_stray(pid: int, start: int | None, why: str, grace_s: float = GRACE_S) -> bool:
    """Stop a child that a previous service left running (a SIGKILL does not reach children in their own session):
    SIGTERM to its group, grace, SIGKILL. False when that process (same pid and start time) is gone already."""
    if not alive(pid, start):
        return False
    stray = Job({"job_id": f"pid-{pid}", "job_dir": "/", "pid": pid, "pid_start": start, "metrics_path": os.devnull,
                 "result_path": os.devnull})
    stop_group(stray.pid, stray.running, stray.id, why, grace_s, threading.Event())
    return True


def cancel_detached(state: State, job_id: str, grace_s: float = GRACE_S) -> bool:
    """Cancel a running job when no service supervises it (the CLI's ``cancel`` without a service)."""
    row = state.jobs.get(job_id)
    if row is None or row.status not in ("running", "starting") or is_remote(row.as_dict()):
        return False
    job = Job(row.as_dict())
    if job.running():
        stop_group(job.pid, job.running, job.id, "cancelled by an operator", grace_s, threading.Event())
    with state.transaction():
        state.jobs.stopped(job_id, status="cancelled", error="cancelled by an operator", finished_at=utcnow())
    return True


def log_tail(path: Path, lines: int = 40) -> list[str]:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return data.decode("utf-8", "replace").splitlines()[-lines:]
