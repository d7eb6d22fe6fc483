"""The Ray executor (``training.executor: ray``): the local runner's contract (:mod:`daemon.train.runner`: a job row,
progress from ``metrics.jsonl``, a :class:`~daemon.train.runner.JobOutcome`) over Ray Jobs.

A job's config, data, adapters and the trainer's scripts are copied to ``<ray.storage>/<job_id>/`` (a directory both
sides see), the trainer runs there as a Ray job whose submission id is our job id (a re-submit after a crash finds it
instead of starting a second), its ``metrics.jsonl`` is mirrored into the local job folder as it grows, and on
success the adapter and ``result.json`` come back into ``jobs/<job_id>/`` with the cluster's paths mapped back to
ours, so the gate runs as for a local job. The pure parts (:func:`stage_plan`, :func:`map_back`,
:func:`entrypoint`, :func:`outcome_of`) build values; :mod:`daemon.train.ray_client` is the only module that speaks
to Ray.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import log
from daemon.settings import RaySettings, TrainingSettings
from daemon.state import State, utcnow
from daemon.train import runner
from daemon.train.jobspec import interpret_exit, trainer_argv
from daemon.train.ray_client import TERMINAL, RayClient, RayError

_log = log.get("daemon.train.ray")

DATA_KEYS = ("train_path", "eval_path", "new_path", "canary_path", "pref_train_path", "pref_eval_path")
ADAPTER_KEYS = (("init", "adapter", "adapters/init"), ("gate", "champion_adapter", "adapters/champion"))
LOG_LINES = 3  # the last log lines a FAILED job's reason carries


# -- pure: what goes where ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Staging:
    config: dict[str, Any]  # the job config as the cluster reads it
    copies: list[tuple[str, str]]  # (local file or folder, its name under the job's storage folder)
    back: dict[str, str] = field(default_factory=dict)  # a cluster path -> the local path it stands for


def stage_plan(cfg: Mapping[str, Any], *, cluster_dir: str, base_model: str = "") -> Staging:
    """The job config with every path moved under ``cluster_dir`` (the job's storage folder as the cluster sees it):
    the data files and adapters it reads (copied there), the output, metrics and result it writes; ``base_model``:
    the base model's path on the cluster (empty: the config's own)."""
    out: dict[str, Any] = copy.deepcopy(dict(cfg))
    local_dir = str(Path(cfg["training"]["output_dir"]).parent)
    copies: list[tuple[str, str]] = []
    back = {cluster_dir: local_dir}
    for key in DATA_KEYS:
        src = (cfg.get("dataset") or {}).get(key)
        if src:
            name = f"data/{key.removesuffix('_path')}.jsonl"
            copies.append((src, name))
            out["dataset"][key] = back_key = f"{cluster_dir}/{name}"
            back[back_key] = src
    placed: dict[str, str] = {}
    for section, key, name in ADAPTER_KEYS:
        src = (cfg.get(section) or {}).get(key)
        if not src:
            continue
        if src not in placed:
            copies.append((src, name))
            placed[src] = f"{cluster_dir}/{name}"
            back[placed[src]] = src
        out[section][key] = placed[src]
    out["training"]["output_dir"] = f"{cluster_dir}/output"
    out["metrics"]["output_path"] = f"{cluster_dir}/metrics.jsonl"
    out["result"]["output_path"] = f"{cluster_dir}/result.json"
    if base_model and base_model != cfg["model"]["name"]:
        out["model"]["name"] = base_model
        back[base_model] = cfg["model"]["name"]
    return Staging(out, copies, back)


def map_back(value: Any, back: Mapping[str, str]) -> Any:
    """``value`` (a result, recursively) with each cluster path replaced by the local one it stands for (the longest
    matching prefix wins: an adapter copied under the job folder maps to the adapter it was copied from)."""
    if isinstance(value, dict):
        return {k: map_back(v, back) for k, v in value.items()}
    if isinstance(value, list):
        return [map_back(v, back) for v in value]
    if isinstance(value, str):
        for prefix in sorted(back, key=len, reverse=True):
            if value == prefix or value.startswith(prefix + "/"):
                return back[prefix] + value[len(prefix):]
    return value


def entrypoint(python: str, cluster_dir: str) -> str:
    """The job's entrypoint for Ray's shell: in the job's folder (the trainer's cwd, as for a local job), ``exec``
    the trainer's argv (absolute paths, :func:`trainer_argv`), so Ray's SIGTERM reaches the trainer itself."""
    argv = trainer_argv(Path(python), Path(cluster_dir, "trainer", "train_qlora.py"), Path(cluster_dir, "config.yaml"))
    return f"cd {shlex.quote(cluster_dir)} && exec {shlex.join(argv)}"


def runtime_env(ray: RaySettings, env: Mapping[str, str], job_id: str) -> dict[str, Any]:
    """``ray.runtime_env`` with ``training.env``, the job id and Ray's stop wait added to its env_vars."""
    out = copy.deepcopy(dict(ray.runtime_env))
    out["env_vars"] = {**{str(k): str(v) for k, v in (out.get("env_vars") or {}).items()}, **env,
                       "CHATOS_JOB_ID": job_id, "PYTHONUNBUFFERED": "1",
                       "RAY_JOB_STOP_WAIT_TIME_S": f"{ray.stop_wait_s:g}"}
    return out


def exit_code_of(message: str) -> int | None:
    """The entrypoint's exit status from a FAILED job's message (Ray: "... failed with exit code 3 ...")."""
    m = re.search(r"exit code (-?\d+)", message)
    return int(m.group(1)) if m else None


def outcome_of(job_id: str, status: str, message: str, *, result: dict[str, Any] | None,
               finished_event: Mapping[str, Any] | None, log_tail: Iterable[str],
               forced: tuple[str, str] | None) -> tuple[str, str, int | None]:
    """A terminal Ray status (SUCCEEDED, FAILED, STOPPED) -> (job status, one-line reason, exit code)."""
    code = exit_code_of(message) if status == "FAILED" else (0 if status == "SUCCEEDED" else None)
    if forced is not None:
        return forced[0], forced[1], code
    if status == "SUCCEEDED":
        if result is None:
            return "failed", "the Ray job SUCCEEDED but left no result.json in ray.storage", code
        return "succeeded", "ok", code
    if status == "STOPPED":
        return "cancelled", "stopped on the Ray cluster", code
    meaning = interpret_exit(code)[1] if code is not None else "failed"
    error = (finished_event or {}).get("error")
    tail = [ln.strip() for ln in log_tail if ln.strip()][-LOG_LINES:]
    detail = str(error).splitlines()[0][:300] if error else " | ".join(tail)[:600] or message.splitlines()[0][:300]
    return "failed", f"Ray job FAILED ({meaning}): {detail}", code


# -- I/O: storage ------------------------------------------------------------------------------------------------


def storage_dirs(ray: RaySettings, job_id: str) -> tuple[Path, str]:
    """(the job's storage folder here, the same folder as the cluster sees it); a one-line :class:`RayError` when
    ``ray.storage`` is unset or a URI."""
    if not ray.storage:
        raise RayError("training.executor is ray but ray.storage is empty (a directory both sides see)")
    if "://" in ray.storage:
        raise RayError(f"ray.storage {ray.storage}: URIs are not read directly; mount the bucket (s3fs, gcsfuse) "
                       "or the NFS export on both sides and give its path")
    here = Path(ray.storage).expanduser() / job_id
    return here, str(Path(ray.cluster_storage or ray.storage).expanduser() / job_id)


def _stage(here: Path, staging: Staging) -> None:
    """Write the job's folder in storage: config, data, adapters, the trainer's scripts."""
    import yaml

    try:
        (here / "data").mkdir(parents=True, exist_ok=True)
        for src, name in staging.copies:
            dst = here / name
            if Path(src).is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
        shutil.copytree(runner.TRAINER_SCRIPT.parent, here / "trainer", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        (here / "config.yaml").write_text(yaml.safe_dump(staging.config, sort_keys=False))
    except OSError as exc:
        raise RayError(f"ray.storage {here.parent} is not writable: {exc.strerror or exc}") from None


class _Mirror:
    """Copies what the trainer appended to ``metrics.jsonl`` in storage to the local job folder."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.dst = src, dst
        try:
            self.pos = dst.stat().st_size  # re-attached: what the previous service mirrored
        except OSError:
            self.pos = 0

    def pull(self) -> None:
        try:
            with self.src.open("rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # whole lines only: a reader never sees half a line
        if end:
            with self.dst.open("ab") as out:
                out.write(chunk[:end])
            self.pos += end


def _fetch_back(here: Path, job: runner.Job, back: Mapping[str, str]) -> dict[str, Any] | None:
    """The result from storage, its paths mapped to ours, and the output folder (the adapter) copied home."""
    try:
        loaded = json.loads((here / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(loaded, dict):
        return None
    if (here / "output").is_dir():
        shutil.copytree(here / "output", job.dir / "output", dirs_exist_ok=True)
    result: dict[str, Any] = map_back(loaded, back)
    tmp = Path(job.row["result_path"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, job.row["result_path"])
    return result


# -- the runner contract -----------------------------------------------------------------------------------------


def cluster_python(t: TrainingSettings, ray: RaySettings) -> str:
    return ray.python or str(t.python)


def start_job(state: State, t: TrainingSettings, ray: RaySettings, *, config: dict[str, Any], dataset_version: int,
              cycle_id: str | None, created_at: str | None = None, plan: dict[str, Any] | None = None,
              trained: Iterable[str | tuple[str, int]] = ()) -> runner.Job:
    """Record the job, stage it in ``ray.storage`` and submit it; a :class:`RayError` (one line) when the head is
    unreachable, the versions differ or the storage is not writable (the job is then recorded as failed)."""
    job_id = config["job_id"]
    row = runner.record_job(state, config=config, dataset_version=dataset_version, cycle_id=cycle_id,
                            created_at=created_at, plan=plan, trained=trained,
                            executor={"executor": "ray", "ray_address": ray.address})
    try:
        here, there = storage_dirs(ray, job_id)
        staging = stage_plan(config, cluster_dir=there, base_model=ray.base_model)
        with RayClient(ray.address, timeout_s=ray.request_timeout_s) as client:
            _stage(here, staging)
            (here / "back.json").write_text(json.dumps(staging.back))
            client.submit(job_id, entrypoint=entrypoint(cluster_python(t, ray), there),
                          runtime_env=runtime_env(ray, t.env, job_id), num_gpus=ray.entrypoint_num_gpus,
                          num_cpus=ray.entrypoint_num_cpus)
    except (RayError, ValueError) as exc:
        with state.transaction():
            state.jobs.stopped(job_id, status="failed", error=str(exc), finished_at=utcnow())
        raise RayError(str(exc)) from None
    row.update(pid=0, status="running", started_at=utcnow())
    with state.transaction():
        state.jobs.running(job_id, pid=0, pid_start=None, started_at=row["started_at"])
    _log.info("ray.job_submitted", job_id=job_id, address=ray.address, storage=str(here))
    return runner.Job(row)


def supervise(state: State, job: runner.Job, ray: RaySettings, *, timeout_s: float, cancel: threading.Event,
              stop: threading.Event, on_progress: Callable[[dict[str, Any]], None] | None = None) -> runner.JobOutcome:
    """Follow a Ray job to its end (also one re-attached after a restart); returns the outcome after recording it.
    The service stopping leaves the job running on the cluster (the next start re-attaches to it)."""
    here, _ = storage_dirs(ray, job.id)
    mirror = _Mirror(here / "metrics.jsonl", Path(job.row["metrics_path"]))
    started = last_ok = time.monotonic()
    client: RayClient | None = None
    info = None
    forced: tuple[str, str] | None = None
    stop_sent = 0.0
    try:
        while True:
            mirror.pull()
            job.follow(state, on_progress)
            if stop.is_set():
                _log.info("ray.job_left_running", job_id=job.id, reason="the service is stopping")
                return runner.JobOutcome(job.id, "interrupted", "the service is stopping (the Ray job runs on; the "
                                         "next start re-attaches to it)", None, None, job.latest)
            try:
                client = client or RayClient(ray.address, timeout_s=ray.request_timeout_s)
                info = client.info(job.id)
                last_ok = time.monotonic()
            except RayError as exc:
                if not exc.unreachable:
                    forced = ("failed", str(exc))
                    break
                if time.monotonic() - last_ok > ray.unreachable_timeout:
                    forced = ("failed", f"{exc} (for {ray.unreachable_timeout:g}s, ray.unreachable_timeout)")
                    break
                if client is not None:
                    client.close()
                client = None
                stop.wait(ray.poll_interval_s)  # not cancel: a cancel set while the head is away must not spin
                continue
            if info is None:
                forced = forced or ("interrupted", f"the Ray cluster at {ray.address} does not know job {job.id} "
                                                   "(its head restarted, or the job was never submitted)")
                break
            if info.status in TERMINAL:
                break
            if forced is None:
                waited = time.monotonic() - started
                if cancel.is_set():
                    forced = ("cancelled", "cancelled by an operator")
                elif waited > timeout_s:
                    forced = ("timeout", f"no result after training.timeout ({timeout_s:g}s)")
                elif info.status == "PENDING" and waited > ray.pending_timeout:
                    forced = ("failed", f"still PENDING after ray.pending_timeout ({ray.pending_timeout:g}s): no "
                              f"node has entrypoint_num_gpus={ray.entrypoint_num_gpus:g} free")
            if forced is not None and not stop_sent:
                try:
                    client.stop(job.id, forced[1])
                except RayError as exc:
                    _log.warning("ray.stop_failed", job_id=job.id, error=str(exc))
                stop_sent = time.monotonic()
            elif stop_sent and (info.status == "PENDING" or time.monotonic() - stop_sent > ray.stop_wait_s + 60):
                _log.warning("ray.stop_unconfirmed", job_id=job.id, status=info.status)
                break
            cancel.wait(ray.poll_interval_s) if forced is None else stop.wait(0.5)
        mirror.pull()
        job.poll_metrics()
        tail = _save_logs(client, job)
        result = _fetch_back(here, job, _back(here)) if info is not None and info.status == "SUCCEEDED" else None
        status, reason, code = outcome_of(job.id, info.status if info else "FAILED", info.message if info else "",
                                          result=result, finished_event=job.finished_event, log_tail=tail,
                                          forced=forced)
    finally:
        if client is not None:
            client.close()
    outcome = runner.JobOutcome(job.id, status, reason, code, result if status == "succeeded" else None, job.latest)
    with state.transaction():
        state.jobs.finished(job.id, status=status, exit_code=code, error=None if status == "succeeded" else reason,
                            result=outcome.result, latest_metrics=job.latest or None, finished_at=utcnow())
    _log.info("job.finished", job_id=job.id, executor="ray", status=status, reason=reason, exit_code=code,
              final_loss=(outcome.result or {}).get("final_train_loss"))
    return outcome


def _back(here: Path) -> dict[str, str]:
    try:
        loaded = json.loads((here / "back.json").read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


def _save_logs(client: RayClient | None, job: runner.Job) -> list[str]:
    """The job's Ray log into the local ``job.log`` (for ``logs``); returns its last lines ([] when unreachable)."""
    if client is None:
        return []
    try:
        text = client.logs(job.id)
    except RayError as exc:
        _log.warning("ray.logs_unavailable", job_id=job.id, error=str(exc))
        return []
    Path(job.row["log_path"]).write_text(text)
    return text.splitlines()[-40:]


def cancel_detached(ray: RaySettings, state: State, job_id: str) -> bool:
    """Cancel a Ray job when no service supervises it (the CLI's ``cancel`` without a service): ``stop_job``, and
    the row says cancelled. False for a job that is not a running Ray job."""
    row = state.jobs.get(job_id)
    if row is None or row.status not in ("running", "starting") or not runner.is_remote(row.as_dict()):
        return False
    with RayClient(ray.address, timeout_s=ray.request_timeout_s) as client:
        client.stop(job_id, "cancelled by an operator")
    with state.transaction():
        state.jobs.stopped(job_id, status="cancelled", error="cancelled by an operator", finished_at=utcnow())
    return True


# -- a job that is not training (merge + convert) ---------------------------------------------------------------


def run_job(ray: RaySettings, job_id: str, *, entrypoint: str, env: Mapping[str, str], timeout_s: float,
            stop: threading.Event) -> tuple[int | None, str, str]:
    """:func:`daemon.train.runner.run_supervised` on Ray: submit ``entrypoint`` as job ``job_id`` (or find it, after
    a restart) and wait for its end: (exit status, why, Ray's log). ``why`` is "finished" when it ended by itself;
    a timeout or a PENDING past ``ray.pending_timeout`` stops it; the service stopping leaves it running (the next
    try finds it). Raises :class:`RayError` when the head cannot be reached at the start or for
    ``ray.unreachable_timeout``."""
    with RayClient(ray.address, timeout_s=ray.request_timeout_s) as client:
        client.submit(job_id, entrypoint=entrypoint, runtime_env=runtime_env(ray, env, job_id),
                      num_gpus=ray.entrypoint_num_gpus, num_cpus=ray.entrypoint_num_cpus)
        started = last_ok = time.monotonic()
        while True:
            try:
                info = client.info(job_id)
                last_ok = time.monotonic()
            except RayError as exc:
                if not exc.unreachable or time.monotonic() - last_ok > ray.unreachable_timeout:
                    raise
                info = None
            waited = time.monotonic() - started
            if info is not None and info.status in TERMINAL:
                break
            if stop.is_set():
                return None, "the service is stopping (the Ray job runs on)", ""
            why = (f"timed out after {timeout_s:g}s" if waited > timeout_s else
                   f"still PENDING after ray.pending_timeout ({ray.pending_timeout:g}s): no node has "
                   f"entrypoint_num_gpus={ray.entrypoint_num_gpus:g} free"
                   if info is not None and info.status == "PENDING" and waited > ray.pending_timeout else None)
            if why is not None:
                client.stop(job_id, why)
                return None, why, ""
            stop.wait(ray.poll_interval_s)
        code = {"SUCCEEDED": 0, "STOPPED": 143}.get(info.status, exit_code_of(info.message) or 1)
        try:
            text = client.logs(job_id)
        except RayError:
            text = info.message
    return code, "finished", text


# -- doctor: a tiny job that proves the cluster side -------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    status: str  # the probe job's last Ray status (PENDING: never scheduled within the bound)
    round_trip: bool  # the cluster read our file in storage and wrote one we read back
    log: str  # the job's output (its last line: what ``source`` printed)


def probe(ray: RaySettings, python: str, source: str, *, num_gpus: float, pending_s: float,
          timeout_s: float) -> Probe:
    """Run ``source`` as a Ray job in ``python`` on the cluster (``num_gpus`` reserved; stopped when still PENDING
    after ``pending_s``, or not done after ``timeout_s``), after it copied a token from a file we wrote in
    ``ray.storage`` to one we read back. Raises :class:`RayError` (one line) when the head is
    unreachable or the storage not writable here."""
    import secrets

    job_id = f"chatos-doctor-{secrets.token_hex(6)}"
    here, there = storage_dirs(ray, job_id)
    token = secrets.token_hex(16)
    try:
        here.mkdir(parents=True)
        (here / "ping").write_text(token)
        (here / "probe.py").write_text(f"import pathlib\nd = pathlib.Path({there!r})\n"
                                       "(d / 'pong').write_text((d / 'ping').read_text())\n" + source)
    except OSError as exc:
        raise RayError(f"ray.storage {here.parent} is not writable: {exc.strerror or exc}") from None
    try:
        with RayClient(ray.address, timeout_s=ray.request_timeout_s) as client:
            client.submit(job_id, entrypoint=shlex.join([python, f"{there}/probe.py"]),
                          runtime_env=runtime_env(ray, {}, job_id), num_gpus=num_gpus, num_cpus=None)
            start, wait, info = time.monotonic(), threading.Event(), None
            while True:
                info = client.info(job_id)
                waited = time.monotonic() - start
                if info is not None and info.status in TERMINAL:
                    break
                if waited > timeout_s or (info is not None and info.status == "PENDING" and waited > pending_s):
                    client.stop(job_id, f"doctor: {info.status if info else 'unknown'} after {waited:.0f}s")
                    break
                wait.wait(0.5)
            text = client.logs(job_id) if info is not None and info.status in TERMINAL else ""
        try:
            back = (here / "pong").read_text() == token
        except OSError:
            back = False
        return Probe(info.status if info else "UNKNOWN", back, text)
    finally:
        shutil.rmtree(here, ignore_errors=True)
