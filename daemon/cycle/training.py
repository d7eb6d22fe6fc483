"""Stage: train a candidate on the dataset version: render the job, start the trainer, follow it to its end, then
hand the outcome to the gate. A job re-attached after a restart joins here too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from daemon import disk, log
from daemon.cycle import deciding, gating
from daemon.cycle.context import Cycle, Outcome
from daemon.state import State
from daemon.train import jobspec, runner, templates

_log = log.get("daemon.cycle")


def champion(state: State) -> tuple[str | None, Path | None, float | None]:
    """The promoted job now serving as champion: (job id, adapter dir, its eval loss), or Nones."""
    job_id = state.service.get().champion_job
    row = state.jobs.get(job_id) if job_id else None
    if not row or not row.result:
        return None, None, None
    res = row.result
    return job_id, Path(res["adapter_dir"]), res.get("eval_loss_after")


def _job_config(cycle: Cycle, job_id: str, dataset_path: Path) -> dict[str, Any]:
    """The trainer's config for this job (the champion adapter included when it is still on disk)."""
    t = cycle.settings.training
    champ_id, champ_adapter, _ = champion(cycle.state)
    if champ_adapter is not None and not champ_adapter.is_dir():
        _log.warning("gate.champion_missing", job_id=champ_id, adapter=str(champ_adapter))
        champ_adapter = None
    overrides: dict[str, Any] = {}
    if t.config_template is not None:
        overrides = yaml.safe_load(t.config_template.read_text()) or {}
    return jobspec.render_job_config(
        overrides, job_id=job_id, job_dir=cycle.state.dir / "jobs" / job_id, base_model=t.base_model,
        chat_template=t.chat_template, backend=t.backend, train_path=dataset_path / "train.jsonl",
        eval_path=dataset_path / "eval.jsonl", max_steps=t.max_steps, champion_adapter=champ_adapter,
    )


def run(cycle: Cycle) -> bool:
    """Train on ``cycle.dataset_path``; fills the result (the gate, export and registration follow a success)."""
    settings, state, result = cycle.settings, cycle.state, cycle.result
    t, version, dataset_path = settings.training, result.dataset_version, cycle.dataset_path
    if version is None or dataset_path is None:
        raise RuntimeError("the training stage runs only after a dataset was built")
    job_id = jobspec.new_job_id()
    try:
        cfg = _job_config(cycle, job_id, dataset_path)
    except templates.UnknownTemplate as exc:
        result.end(Outcome.ERROR, f"training.chat_template: {exc}")
        return False
    short = disk.check(f"training job {job_id}", state.dir / "jobs",
                       disk.training_needs(disk.tree_bytes(dataset_path), jobspec.base_weights(t.base_model)))
    if short is not None:
        _log.warning("training.no_space", job_id=job_id, needed=short.needed, free=short.free)
        result.end(Outcome.NO_SPACE, str(short))
        return False
    cycle.step("training", f"job {job_id} on dataset v{version}")
    with state.transaction():
        state.service.set_last_run_at(cycle.now().isoformat())
    result.job_id = job_id
    with cycle.timed("train"):
        try:
            job = runner.start_job(state, python=t.python, config=cfg, dataset_version=version,
                                   cycle_id=result.cycle_id, env=t.env, created_at=cycle.now().isoformat())
        except OSError as exc:
            result.job_status = "failed"
            result.end(Outcome.TRAIN_FAILED, f"cannot start the trainer {t.python}: {exc.strerror or exc}")
            deciding.set_backoff(settings, state, cycle.now())
            return False

        def on_step(m: dict[str, Any]) -> None:
            loss = m.get("train_loss")
            cycle.report("training", f"job {job_id} step {m.get('step')}/{t.max_steps}"
                         + (f" loss {loss:.4f}" if isinstance(loss, int | float) else ""))

        outcome = runner.supervise(state, job, timeout_s=t.timeout, cancel=cycle.cancel, stop=cycle.stop,
                                   on_progress=on_step)
    gating.conclude(cycle, outcome)
    return True


def reattached(cycle: Cycle, job: runner.Job) -> None:
    """Follow a job that a previous service started (found alive after a restart) to its end, then the gate."""
    result = cycle.result
    cycle.step("training", f"re-attached job {job.id}")
    result.decision, result.reason = True, f"re-attached job {job.id} after a restart"
    result.dataset_version = job.row.get("dataset_version")
    outcome = runner.supervise(cycle.state, job, timeout_s=cycle.settings.training.timeout, cancel=cycle.cancel,
                               stop=cycle.stop)
    gating.conclude(cycle, outcome)
