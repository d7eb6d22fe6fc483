"""One cycle: ingest -> decide -> dataset -> (train -> gate -> export -> register), and the single-flight worker.

A cycle is a plain function of (settings, state, request); the :class:`Worker` runs at most one at a time and
folds every request that arrives during a run into exactly one follow-up cycle.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
import yaml

from daemon import faults, log
from daemon.dataset import builder as dataset
from daemon.ingest import ingestor
from daemon.publish import converter, export, registry
from daemon.settings import Settings
from daemon.state import State, StateError, private_dir, storage_problem
from daemon.train import gate, jobspec, policy, runner, templates
from daemon.train.backoff import retry_delay

_log = log.get("daemon.cycle.pipeline")
# kv key: the promoted job whose export has not finished yet ({"job_id", "gate", "pid", "pid_start"}). Set with the
# promotion, cleared with the model version (or when the export failed on its own), so an export that a crash or a
# stop interrupted is resumed by the next cycle instead of leaving the champion without a model.
EXPORT_PENDING = "export_pending"

Progress = Callable[[str, str], None]  # (phase, detail)


@dataclass
class CycleRequest:
    """What to do: ``paths`` None = full scan; ``forced`` = an operator trigger (thresholds ignored)."""

    paths: set[str] | None = None
    forced: bool = False
    origins: list[str] = field(default_factory=list)

    def merge(self, other: CycleRequest) -> None:
        if self.paths is None or other.paths is None:
            self.paths = None
        else:
            self.paths |= other.paths
        self.forced = self.forced or other.forced
        self.origins.extend(other.origins)


@dataclass
class CycleResult:
    cycle_id: str
    outcome: str  # skipped | dataset | not_configured | no_data | error | aborted
    decision: bool
    reason: str
    forced: bool = False
    dataset_version: int | None = None
    dataset_created: bool = False
    job_id: str | None = None
    job_status: str | None = None
    model_tag: str | None = None
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    numbers: dict[str, Any] = field(default_factory=dict)
    started_at: str = ""
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "cycle_id": self.cycle_id,
            "outcome": self.outcome,
            "decision": "train" if self.decision else "wait",
            "reason": self.reason,
            "forced": self.forced,
            "dataset_version": self.dataset_version,
            "dataset_created": self.dataset_created,
            "job_id": self.job_id,
            "job_status": self.job_status,
            "model_tag": self.model_tag,
            "counts": self.counts,
            "timings": self.timings,
            "started_at": self.started_at,
            "error": self.error,
        }


class Aborted(Exception):
    """The service is stopping: the cycle ends between steps."""


@contextmanager
def _cycle_lock(state: State) -> Iterator[None]:
    """Single flight across processes too: a CLI ``trigger`` without a service waits for a running cycle."""
    fd = os.open(state.dir / "cycle.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def new_cycle_id() -> str:
    return f"c-{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def policy_input(settings: Settings, state: State, now: datetime) -> policy.PolicyInput:
    """Count what the policy needs from state."""
    d = settings.dataset
    trained = state.get_kv("last_trained_dataset")
    trained_v = int(trained) if trained else None
    counts = state.eligible_counts(d.modes, d.min_score, d.include_unrated, since_version=trained_v or 0)
    last_run = state.get_kv("last_run_at")
    runs = state.runs_since(policy.day_start(now).isoformat())
    return policy.PolicyInput(
        new_examples=counts["new_since_dataset"],
        total_examples=counts["eligible"],
        positive_examples=counts["positive"],
        last_trained_version=trained_v,
        last_run_at=datetime.fromisoformat(last_run) if last_run else None,
        runs_today=runs,
        job_running=False,
    )


def champion(state: State) -> tuple[str | None, Path | None, float | None]:
    """The promoted job now serving as champion: (job id, adapter dir, its eval loss), or Nones."""
    job_id = state.get_kv("champion_job")
    row = state.job(job_id) if job_id else None
    if not row or not row.get("result"):
        return None, None, None
    res = row["result"]
    return job_id, Path(res["adapter_dir"]), res.get("eval_loss_after")


def backoff_until(state: State) -> datetime | None:
    raw = state.get_kv("train_backoff_until")
    return datetime.fromisoformat(raw) if raw else None


def _train_and_gate(
    settings: Settings,
    state: State,
    result: CycleResult,
    version: int,
    ds_path: Path,
    stop: threading.Event,
    cancel: threading.Event,
    step: Callable[[str, str], None],
    report: Progress,
    now: Callable[[], datetime],
) -> None:
    """train -> gate for one dataset version; fills ``result``. Export comes after a promotion."""
    t = settings.training
    champ_id, champ_adapter, _ = champion(state)
    if champ_adapter is not None and not champ_adapter.is_dir():
        _log.warning("gate.champion_missing", job_id=champ_id, adapter=str(champ_adapter))
        champ_id, champ_adapter = None, None
    job_id = jobspec.new_job_id()
    overrides: dict[str, Any] = {}
    if t.config_template is not None:
        overrides = yaml.safe_load(t.config_template.read_text()) or {}
    try:
        cfg = jobspec.render_job_config(
            overrides, job_id=job_id, job_dir=state.dir / "jobs" / job_id, base_model=t.base_model,
            chat_template=t.chat_template, backend=t.backend, train_path=ds_path / "train.jsonl",
            eval_path=ds_path / "eval.jsonl", max_steps=t.max_steps, champion_adapter=champ_adapter,
        )
    except templates.UnknownTemplate as exc:
        result.outcome, result.reason = "error", f"training.chat_template: {exc}"
        return
    step("training", f"job {job_id} on dataset v{version}")
    t0 = time.perf_counter()
    with state.transaction():
        state.set_kv("last_run_at", now().isoformat())
    result.job_id = job_id
    try:
        job = runner.start_job(state, python=t.python, config=cfg, dataset_version=version,
                               cycle_id=result.cycle_id, env=t.env)
    except OSError as exc:
        result.outcome, result.job_status = "train_failed", "failed"
        result.reason = f"cannot start the trainer {t.python}: {exc.strerror or exc}"
        _set_backoff(settings, state, now())
        return

    def on_step(m: dict[str, Any]) -> None:
        loss = m.get("train_loss")
        report("training", f"job {job_id} step {m.get('step')}/{t.max_steps}"
               + (f" loss {loss:.4f}" if isinstance(loss, int | float) else ""))

    outcome = runner.supervise(state, job, timeout_s=t.timeout, cancel=cancel, stop=stop, on_progress=on_step)
    result.timings["train"] = round(time.perf_counter() - t0, 4)
    conclude_job(settings, state, result, outcome, step, now, stop)


def conclude_job(
    settings: Settings,
    state: State,
    result: CycleResult,
    outcome: runner.JobOutcome,
    step: Callable[[str, str], None],
    now: Callable[[], datetime],
    stop: threading.Event | None = None,
) -> None:
    """After a job ended (supervised now, or re-attached after a restart): backoff on failure, else the gate."""
    job_id = outcome.job_id
    result.job_id = job_id
    result.job_status = outcome.status
    if outcome.status != "succeeded" or outcome.result is None:
        result.outcome = "train_failed" if outcome.status != "cancelled" else "cancelled"
        result.reason = f"job {job_id} {outcome.status}: {outcome.reason}"
        if outcome.status != "cancelled":
            _set_backoff(settings, state, now())
        return
    with state.transaction():
        state.set_kv("train_failures", "0")
        state.set_kv("train_backoff_until", "")
    step("gating", f"job {job_id}")
    row = state.job(job_id) or {}
    try:
        used = (yaml.safe_load(Path(row["config_path"]).read_text()) or {}).get("gate", {}).get("champion_adapter")
    except (OSError, KeyError, yaml.YAMLError):
        used = None
    res = outcome.result
    champ_id = state.get_kv("champion_job") if used else None
    champ_loss = res.get("champion_eval_loss") if used else res.get("eval_loss_before")
    name = f"champion {champ_id}" if used else "the base model"
    if used and not isinstance(champ_loss, int | float):
        # the champion adapter could not be evaluated: compare with the base model rather than promote blindly
        _log.warning("gate.champion_unavailable", job_id=job_id, reason=res.get("champion_error"))
        champ_loss, name = res.get("eval_loss_before"), "the base model (champion could not be evaluated)"
    g = gate.decide(res.get("eval_loss_after"), champ_loss, settings.gate.tolerance, champion_name=name)
    result.counts["gate"] = g.numbers
    with state.transaction():
        state.update_job(job_id, status="promoted" if g.promote else "rejected", error=None if g.promote else g.reason)
        if g.promote:
            state.set_kv("champion_job", job_id)
            state.set_kv("last_trained_dataset", str(row.get("dataset_version", "")))
            if settings.export.enabled:
                state.set_kv(EXPORT_PENDING, json.dumps({"job_id": job_id, "gate": g.numbers}))
    _log.info("gate.decided", job_id=job_id, promote=g.promote, reason=g.reason, **g.numbers)
    result.job_status = "promoted" if g.promote else "rejected"
    result.outcome = "promoted" if g.promote else "rejected"
    result.dataset_version = result.dataset_version or row.get("dataset_version")
    result.reason = f"job {job_id} {g.reason}"
    faults.point("gate.decided")  # promoted in state, not exported yet
    if g.promote:
        export_and_register(settings, state, result, row, res, g.numbers, stop or threading.Event(), step, now)


def export_and_register(
    settings: Settings,
    state: State,
    result: CycleResult,
    job: dict[str, Any],
    res: dict[str, Any],
    gate_numbers: dict[str, Any],
    stop: threading.Event,
    step: Callable[[str, str], None],
    now: Callable[[], datetime] | None = None,
) -> None:
    """Promoted adapter -> merged GGUF (a child in the trainer's interpreter) -> model version -> Ollama."""
    if not settings.export.enabled:
        result.reason += "; export disabled (export.enabled: false)"
        return
    job_id, q = job["job_id"], settings.export.quantization
    t0 = time.perf_counter()
    try:
        # fetched once (sha256-pinned), ~1 ms when already there; a checkout in export.llama_cpp_dir wins
        conv = converter.setup_converter(converter.default_cache_dir(), llama_cpp_dir=settings.export.llama_cpp_dir)
        template = templates.get(res.get("chat_template") or settings.training.chat_template)
        out_dir = private_dir(state.dir / "exports" / job_id)
        version = state.next_model_version()
        cfg = export.merge_config(
            job_id=job_id, backend=res.get("backend") or "transformers",
            base_model=res.get("base_model") or settings.training.base_model, adapter_dir=Path(res["adapter_dir"]),
            out_dir=out_dir, template=template, converter=conv, python=settings.training.python,
            quantization=q, quantize_bin=settings.export.quantize_bin,
            gguf_name=export.gguf_filename(settings.ollama.model_name, version, q),
            model_name=settings.ollama.model_name,
        )
    except (export.ExportError, ValueError, KeyError, OSError) as exc:
        result.outcome, result.reason = "export_failed", f"{result.reason}; export not possible: {exc}"
        _export_settled(state)
        return
    step("exporting", f"job {job_id}: merge + convert to GGUF ({q})")
    cfg_path = export.write_config(out_dir / "export.yaml", cfg)

    def spawned(pid: int, start: int | None) -> None:  # the child outlives a SIGKILLed service: remember it
        with state.transaction():
            state.set_kv(EXPORT_PENDING, json.dumps({"job_id": job_id, "gate": gate_numbers, "pid": pid,
                                                     "pid_start": start}))

    code, why = runner.run_supervised(export.merge_export_argv(settings.training.python, cfg_path), cwd=out_dir,
                                      log_path=out_dir / "export.log", timeout_s=settings.export.timeout,
                                      stop=stop, env=settings.training.env, on_start=spawned)
    out = export.outcome(code, export.read_result(Path(cfg["result_path"])), template)
    result.timings["export"] = round(time.perf_counter() - t0, 4)
    if not out.ok or out.gguf_path is None or out.sha256 is None:
        result.outcome = "export_failed"
        result.reason = f"{result.reason}; export failed: {out.reason if why == 'finished' else why}"
        _log.error("export.failed", job_id=job_id, reason=out.reason, exit_code=code)
        if not stop.is_set():  # failed on its own: not retried; stopped by us: resumed by the next cycle
            _export_settled(state)
        return
    faults.point("export.before_record")  # a verified GGUF on disk, no model version yet
    ds = state.dataset(job["dataset_version"])
    with state.transaction():  # the model version and the end of the pending export, together
        version = registry.add_version(
            state, job_id=job_id, dataset_version=job["dataset_version"],
            manifest_hash=ds.content_hash if ds else None, gguf_path=str(out.gguf_path),
            gguf_sha256=out.sha256 if out.sha256.startswith("sha256:") else f"sha256:{out.sha256}",
            gguf_size=out.size or out.gguf_path.stat().st_size, architecture=out.architecture,
            chat_template=template.name, eval_numbers=gate_numbers, settings=settings,
        )
        _export_settled(state)
    _log.info("export.done", job_id=job_id, model_version=version, gguf=str(out.gguf_path), size=out.size)
    step("registering", f"v{version} with Ollama at {settings.ollama.host}")
    t1 = time.perf_counter()
    row = registry.register(settings, state, version, now=now() if now else None)
    result.timings["register"] = round(time.perf_counter() - t1, 4)
    result.model_tag = row.get("tag")
    if row.get("status") == "registered":
        result.outcome = "registered"
        result.reason = f"{result.reason}; registered {row['tag']} (latest)"
    elif row.get("status") == "pending":
        result.outcome = "pending_registration"
        err = str(row.get("last_error") or "")
        why = err if err.startswith("Ollama not reachable") else f"Ollama at {settings.ollama.host} failed: {err}"
        result.reason = f"{result.reason}; {why}; artifact kept, will retry"
    else:
        result.outcome = "register_failed"
        result.reason = f"{result.reason}; registration failed: {row.get('last_error')}"


def _export_settled(state: State) -> None:
    with state.transaction():
        state.set_kv(EXPORT_PENDING, "")


def resume_export(settings: Settings, state: State, cycle_id: str, stop: threading.Event,
                  step: Callable[[str, str], None], now: Callable[[], datetime] | None = None) -> CycleResult | None:
    """Finish the export of the champion when a crash or a stop interrupted it (see :data:`EXPORT_PENDING`).

    A child the dead service left running is stopped first (two writers must not share the export folder). Returns
    the export's own result, or None when nothing was pending (a stale marker is dropped).
    """
    raw = state.get_kv(EXPORT_PENDING)
    if not raw:
        return None
    try:
        pending = json.loads(raw)
    except ValueError:
        pending = None
    job = state.job(str(pending.get("job_id"))) if isinstance(pending, dict) else None
    if (job is None or job["status"] != "promoted" or not job.get("result") or not settings.export.enabled
            or state.get_kv("champion_job") != job["job_id"]
            or any(m["job_id"] == job["job_id"] for m in state.models())):
        _export_settled(state)
        return None
    assert isinstance(pending, dict)
    if pending.get("pid"):
        runner.stop_stray(int(pending["pid"]), pending.get("pid_start"), "left running by a service that stopped")
    _log.info("export.resumed", job_id=job["job_id"], reason="the service stopped before the export finished")
    sub = CycleResult(cycle_id, "promoted", True, f"job {job['job_id']} promoted earlier",
                      dataset_version=job.get("dataset_version"), job_id=job["job_id"], job_status="promoted")
    export_and_register(settings, state, sub, job, job["result"], pending.get("gate") or {}, stop, step, now)
    return sub


def _set_backoff(settings: Settings, state: State, now: datetime) -> None:
    failures = int(state.get_kv("train_failures", "0") or 0) + 1
    delay = retry_delay(settings.training.retry_backoff, failures, 86400.0)
    until = now + timedelta(seconds=delay)
    with state.transaction():
        state.set_kv("train_failures", str(failures))
        state.set_kv("train_backoff_until", until.isoformat())
    _log.warning("training.backoff", failures=failures, retry_at=until.isoformat())


def training_configured(settings: Settings) -> str | None:
    """Why training cannot run with this config, or None when it can."""
    if not settings.training.base_model:
        return "training not configured: set training.base_model (a local model folder) to train"
    return None


def run_cycle(
    settings: Settings,
    state: State,
    request: CycleRequest,
    *,
    stop: threading.Event | None = None,
    cancel: threading.Event | None = None,
    progress: Progress | None = None,
    cycle_id: str | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    resume_job: runner.Job | None = None,
) -> CycleResult:
    """Run one cycle and log one ``cycle.summary`` line. Never raises for expected failures."""
    cid = cycle_id or new_cycle_id()
    stop = stop or threading.Event()
    cancel = cancel or threading.Event()
    report: Callable[[str, str], None] = progress or (lambda phase, detail: None)
    result = CycleResult(cid, "skipped", False, "", forced=request.forced, started_at=now().isoformat())
    t_cycle = time.perf_counter()

    def step(phase: str, detail: str = "") -> None:
        if stop.is_set():
            raise Aborted(f"stopped before {phase}")
        report(phase, detail)

    def timed(name: str, t0: float) -> None:
        result.timings[name] = round(time.perf_counter() - t0, 4)

    with structlog.contextvars.bound_contextvars(cycle_id=cid), _cycle_lock(state):
        _log.info("cycle.started", forced=request.forced, origins=request.origins[:10],
                  paths=None if request.paths is None else len(request.paths))
        try:
            if resume_job is not None:
                step("training", f"re-attached job {resume_job.id}")
                result.decision, result.reason = True, f"re-attached job {resume_job.id} after a restart"
                result.dataset_version = resume_job.row.get("dataset_version")
                outcome = runner.supervise(state, resume_job, timeout_s=settings.training.timeout, cancel=cancel,
                                           stop=stop)
                conclude_job(settings, state, result, outcome, step, now, stop)
                return result
            if state.models(status="pending") or state.models(status="exported"):
                step("registering", "retrying pending registrations")
                for m in registry.retry_pending(settings, state, force=request.forced, now=now()):
                    result.counts.setdefault("registrations_retried", []).append(f"v{m['version']}:{m['status']}")
                    if m["status"] == "registered":
                        result.model_tag = m["tag"]
            resumed = resume_export(settings, state, cid, stop, step, now)
            if resumed is not None:
                result.counts["export_resumed"] = {"job_id": resumed.job_id, "outcome": resumed.outcome,
                                                   "model_tag": resumed.model_tag}
                if resumed.outcome == "registered":
                    result.model_tag = resumed.model_tag
            step("ingesting", "full scan" if request.paths is None else f"{len(request.paths)} changed file(s)")
            t0 = time.perf_counter()
            rep = ingestor.ingest(settings, state, None if request.paths is None else sorted(request.paths))
            timed("ingest", t0)
            result.counts["ingest"] = {k: v for k, v in rep.as_dict().items() if k != "seconds"}

            step("deciding", "applying the training policy")
            t0 = time.perf_counter()
            pin = policy_input(settings, state, now())
            decision = policy.decide(pin, settings.policy, now())
            timed("decide", t0)
            result.numbers = decision.numbers
            result.counts["eligible"] = pin.total_examples
            result.counts["new"] = pin.new_examples
            backoff = backoff_until(state)
            if not request.forced and decision.train and backoff is not None and backoff > now():
                decision = policy.Decision(False, f"backing off after a failed job; next try after "
                                           f"{backoff:%H:%M} UTC", decision.numbers, ["backoff"], decision.next_window)
            if request.forced:
                result.decision = True
                result.reason = "triggered by an operator (thresholds ignored)" + (
                    "" if decision.train else f"; policy alone would wait: {decision.reason}")
            else:
                result.decision, result.reason = decision.train, decision.reason
            _log.info("cycle.decided", train=result.decision, reason=result.reason,
                      new_examples=pin.new_examples, total_examples=pin.total_examples)
            if not result.decision:
                return result

            step("building dataset", "from the eligible conversations")
            t0 = time.perf_counter()
            try:
                built = dataset.build(state, settings.dataset, str(settings.store.root))
            except dataset.DatasetError as exc:
                result.outcome, result.reason = "no_data", str(exc)
                return result
            finally:
                timed("dataset", t0)
            result.dataset_version, result.dataset_created = built.version, built.created
            result.outcome = "dataset"

            why_not = training_configured(settings)
            if why_not:
                result.outcome, result.reason = "not_configured", f"dataset v{built.version} ready; {why_not}"
                return result
            assert built.version is not None and built.path is not None
            _train_and_gate(settings, state, result, built.version, built.path, stop, cancel, step, report, now)
            return result
        except Aborted as exc:
            result.outcome, result.reason = "aborted", str(exc)
            return result
        except Exception as exc:  # a bug or an environment failure: report it, keep the service alive
            storage = storage_problem(exc, state.dir)
            result.outcome, result.error = "error", storage or f"{type(exc).__name__}: {exc}"
            result.reason = f"cycle failed: {result.error}"
            if storage:  # disk full or read-only: expected, one line; the transaction rolled back, state is intact
                _log.error("cycle.failed", reason=storage)
            else:
                _log.exception("cycle.failed")
            return result
        finally:
            result.timings["total"] = round(time.perf_counter() - t_cycle, 4)
            try:
                with state.transaction():
                    state.record_cycle(result.cycle_id, result.started_at, result.outcome, result.reason,
                                       result.as_json(), trained=result.job_id is not None)
            except Exception as exc:  # the summary line below still tells what happened
                _log.error("cycle.not_recorded", reason=storage_problem(exc, state.dir) or str(exc))
            _log.info(
                "cycle.summary", outcome=result.outcome, decision="train" if result.decision else "wait",
                reason=result.reason, forced=result.forced, dataset_version=result.dataset_version,
                dataset_created=result.dataset_created, job_id=result.job_id, model_tag=result.model_tag,
                counts=result.counts, timings=result.timings,
            )


@dataclass
class Ticket:
    """A handle on the cycle that will serve a request (the current one's follow-up when one is running)."""

    done: threading.Event = field(default_factory=threading.Event)
    result: CycleResult | None = None
    progress: list[Callable[[str, str], None]] = field(default_factory=list)


class Worker:
    """Single flight: one cycle at a time; requests during a run are merged into exactly one follow-up."""

    def __init__(self, run: Callable[[CycleRequest, Progress], CycleResult]) -> None:
        self._run = run
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: CycleRequest | None = None
        self._pending_tickets: list[Ticket] = []
        self._running = False
        self._closed = False
        self.cycles_run = 0
        self._thread = threading.Thread(target=self._loop, name="pipeline-worker", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._running or self._pending is not None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: CycleRequest, on_progress: Callable[[str, str], None] | None = None) -> Ticket:
        ticket = Ticket()
        if on_progress:
            ticket.progress.append(on_progress)
        with self._lock:
            if self._closed:
                ticket.result = None
                ticket.done.set()
                return ticket
            if self._pending is None:
                self._pending = request
            else:
                self._pending.merge(request)
            self._pending_tickets.append(ticket)
            self._wake.notify()
        return ticket

    def close(self, timeout: float) -> bool:
        """Take no more requests, drop the queued follow-up, wait up to ``timeout`` for the running cycle."""
        with self._lock:
            self._closed = True
            dropped = self._pending_tickets
            self._pending, self._pending_tickets = None, []
            self._wake.notify()
        for t in dropped:
            t.done.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                if self._closed and self._pending is None:
                    return
                request, tickets = self._pending, self._pending_tickets
                self._pending, self._pending_tickets = None, []
                self._running = True
            assert request is not None

            def fan_out(phase: str, detail: str, tickets: list[Ticket] = tickets) -> None:
                for t in tickets:
                    for cb in t.progress:
                        try:
                            cb(phase, detail)
                        except Exception:  # a listener that went away must not break the cycle
                            _log.debug("progress.listener_failed")

            try:
                result = self._run(request, fan_out)
            except Exception as exc:  # run() already catches; this is the last line of defence
                if isinstance(exc, StateError):  # the state could not even be opened (disk full ...): one line
                    _log.error("worker.cycle_failed", reason=str(exc))
                else:
                    _log.exception("worker.cycle_crashed")
                result = CycleResult(new_cycle_id(), "error", False, f"cycle crashed: {exc}", error=str(exc))
            with self._lock:
                self._running = False
                self.cycles_run += 1
            for t in tickets:
                t.result = result
                t.done.set()
