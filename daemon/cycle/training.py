"""Stage: train a candidate on the dataset version: render the job, start the trainer, follow it to its end, then
hand the outcome to the gate. A job re-attached after a restart joins here too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from daemon import disk, log
from daemon.cycle import deciding, gating
from daemon.cycle.context import Cycle, Outcome
from daemon.dataset.builder import read_train_ids
from daemon.settings import Settings
from daemon.state import State, private_dir
from daemon.train import jobspec, lineage, plan, runner, templates

_log = log.get("daemon.cycle")


def champion(state: State) -> tuple[str | None, Path | None, float | None]:
    """The promoted job now serving as champion: (job id, adapter dir, its eval loss), or Nones."""
    job_id = state.service.get().champion_job
    row = state.jobs.get(job_id) if job_id else None
    if not row or not row.result:
        return None, None, None
    res = row.result
    return job_id, Path(res["adapter_dir"]), res.get("eval_loss_after")


NEW_EVAL_MAX = 256  # the newest new examples the learned_new check evaluates on (evaluation costs time too)


def _template(settings: Settings) -> dict[str, Any]:
    """``training.config_template`` (the overrides of the job template), or {}."""
    path = settings.training.config_template
    return (yaml.safe_load(path.read_text()) or {}) if path is not None else {}


def preview(settings: Settings, state: State) -> dict[str, Any] | None:
    """The plan a run on the latest dataset version would get now (nothing written), as ``status`` shows it; None
    when there is no dataset yet or its plan cannot be made (the run itself will say why)."""
    version = state.datasets.latest_version()
    row = state.datasets.get(version, manifest=False) if version is not None else None
    if row is None:
        return None
    try:
        train = read_train_ids(Path(row.path))
        p = _plan(settings, _template(settings), train, lineage.champion(state, settings.dataset), seed=row.version)
    except (OSError, ValueError, yaml.YAMLError, templates.UnknownTemplate):
        return None
    return {**p.summary(), "line": p.line(), "dataset_version": row.version}


def _train_ids(dataset_path: Path, version: int) -> list[tuple[str, int]]:
    """(conversation id, first dataset version) per line of the split's ``train.jsonl``. A dataset built before
    versions recorded it has no ``train_ids.tsv``: its lines count as new (a full retrain), under ids of their own."""
    try:
        return read_train_ids(dataset_path)
    except (OSError, ValueError) as exc:
        _log.warning("training.no_train_ids", dataset_version=version, error=str(exc), effect="full retrain")
        with (dataset_path / "train.jsonl").open("rb") as f:
            return [(f"v{version}#{i}", version) for i, _ in enumerate(f)]


def _plan(settings: Settings, template: dict[str, Any], train: list[tuple[str, int]],
          champ: lineage.ChampionLineage | None, seed: int) -> plan.Plan:
    t, job = settings.training, jobspec.effective(template)
    eff = job["training"]
    knobs = plan.PlanSettings(
        new_epochs=t.new_epochs, replay_ratio=t.replay_ratio, full_epochs=t.full_epochs,
        full_retrain_every=t.full_retrain_every, max_steps=t.max_steps,
        batch=int(eff["per_device_train_batch_size"]) * int(eff["gradient_accumulation_steps"]),
        learning_rate=float(eff["learning_rate"]), warm_lr_scale=t.warm_lr_scale,
    )
    shape = plan.Shape.of({"name": _model_name(t.base_model), "chat_template": templates.get(t.chat_template).name},
                          job["lora"])
    return plan.make(train, champ.champion if champ else None, shape, knobs,
                     rehearsed=champ.rehearsed if champ else None, seed=seed)


def _model_name(base_model: str) -> str:
    """The base model as a job config records it (a local folder absolute)."""
    return str(Path(base_model).expanduser().absolute()) if jobspec.is_local_model(base_model) else base_model


def _write_plan(job_dir: Path, dataset_path: Path, p: plan.Plan) -> tuple[Path, Path | None]:
    """The job's own files: ``plan/train.jsonl`` (the plan's sequence of the split's lines) and ``plan/new.jsonl``
    (the newest new examples, for the learned_new check; None when there are none)."""
    folder = private_dir(private_dir(job_dir) / "plan")
    lines = (dataset_path / "train.jsonl").read_bytes().splitlines(keepends=True)
    train_path, new_path = folder / "train.jsonl", folder / "new.jsonl"
    train_path.write_bytes(b"".join(lines[i] for i in p.sequence))
    if not p.new:
        return train_path, None
    new_path.write_bytes(b"".join(lines[i] for i in sorted(p.new[:NEW_EVAL_MAX])))
    return train_path, new_path


def _job_config(cycle: Cycle, job_id: str, dataset_path: Path, version: int) -> tuple[dict[str, Any], plan.Plan,
                                                                                     list[str]]:
    """The trainer's config for this job, its plan, and the conversations it trains on."""
    t = cycle.settings.training
    champ_id, champ_adapter, _ = champion(cycle.state)
    if champ_adapter is not None and not champ_adapter.is_dir():
        _log.warning("gate.champion_missing", job_id=champ_id, adapter=str(champ_adapter))
        champ_adapter = None
    overrides = _template(cycle.settings)
    train = _train_ids(dataset_path, version)
    champ = lineage.champion(cycle.state, cycle.settings.dataset)
    p = _plan(cycle.settings, overrides, train, champ, seed=version)
    job_dir = cycle.state.dir / "jobs" / job_id
    train_path, new_path = _write_plan(job_dir, dataset_path, p)
    cfg = jobspec.render_job_config(
        overrides, job_id=job_id, job_dir=job_dir, base_model=t.base_model,
        chat_template=t.chat_template, backend=t.backend, train_path=train_path,
        eval_path=dataset_path / "eval.jsonl", max_steps=p.steps, champion_adapter=champ_adapter,
        init_adapter=champ.adapter if p.init == "champion" and champ else None, new_path=new_path,
        learning_rate=p.learning_rate,
    )
    cfg["training"]["num_train_epochs"] = 1  # the plan's file holds the epochs; max_steps covers it exactly
    return cfg, p, sorted({train[i][0] for i in p.sequence})


def run(cycle: Cycle) -> bool:
    """Train on ``cycle.dataset_path``; fills the result (the gate, export and registration follow a success)."""
    settings, state, result = cycle.settings, cycle.state, cycle.result
    t, version, dataset_path = settings.training, result.dataset_version, cycle.dataset_path
    if version is None or dataset_path is None:
        raise RuntimeError("the training stage runs only after a dataset was built")
    job_id = jobspec.new_job_id()
    try:
        cfg, p, trained = _job_config(cycle, job_id, dataset_path, version)
    except templates.UnknownTemplate as exc:
        result.end(Outcome.ERROR, f"training.chat_template: {exc}")
        return False
    summary = result.counts["plan"] = {**p.summary(), "line": p.line()}
    _log.info("training.plan", job_id=job_id, dataset_version=version, line=p.line(), **p.summary())
    short = disk.check(f"training job {job_id}", state.dir / "jobs",
                       disk.training_needs(disk.tree_bytes(dataset_path), jobspec.base_weights(t.base_model)))
    if short is not None:
        _log.warning("training.no_space", job_id=job_id, needed=short.needed, free=short.free)
        result.end(Outcome.NO_SPACE, str(short))
        return False
    cycle.step("training", f"job {job_id} on dataset v{version}: {p.line()}")
    with state.transaction():
        state.service.set_last_run_at(cycle.now().isoformat())
    result.job_id = job_id
    with cycle.timed("train"):
        try:
            job = runner.start_job(state, python=t.python, config=cfg, dataset_version=version,
                                   cycle_id=result.cycle_id, env=t.env, created_at=cycle.now().isoformat(),
                                   plan=summary, trained=trained)
        except OSError as exc:
            result.job_status = "failed"
            result.end(Outcome.TRAIN_FAILED, f"cannot start the trainer {t.python}: {exc.strerror or exc}")
            deciding.set_backoff(settings, state, cycle.now())
            return False

        def on_step(m: dict[str, Any]) -> None:
            loss = m.get("train_loss")
            cycle.report("training", f"job {job_id} step {m.get('step')}/{p.steps}"
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
