"""Stage: train a candidate on the dataset version: render the job, start the trainer, follow it to its end, then
hand the outcome to the gate. A job re-attached after a restart joins here too."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from daemon import disk, log
from daemon.cycle import deciding, gating
from daemon.cycle.context import Cycle, Outcome
from daemon.dataset.builder import TRAIN_IDS, read_train_ids
from daemon.publish import gpu_share
from daemon.settings import Settings
from daemon.state import State, private_dir
from daemon.train import gate, jobspec, lineage, objective, plan, progress, ray_jobs, runner, templates
from daemon.train.ray_client import RayError

STEPS_KEPT = 200  # the step lines the progress line's pace is measured over (the newest)
_log = log.get("daemon.cycle")


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
        choice = _choice(settings, state, row.version)
        kind = PREF_KIND.get(choice.objective)
        train = read_train_ids(Path(row.path), f"{kind}_train_ids.tsv" if kind else TRAIN_IDS)
        p = _plan(settings, _template(settings), train, lineage.champion(state, settings.dataset), seed=row.version)
    except (OSError, ValueError, yaml.YAMLError, templates.UnknownTemplate):
        return None
    return {**p.summary(), "objective": choice.objective, "objective_why": choice.why,
            "line": f"{choice.objective} ({choice.why}); {p.line()}", "dataset_version": row.version}


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


PREF_KIND = {"kto": "prefs", "dpo": "pairs"}  # objective -> the dataset's preference files (prefs_*, pairs_*)


def _choice(settings: Settings, state: State, version: int) -> objective.Choice:
    """The objective this run trains, from ``training.objective`` and the dataset's preference counts."""
    t = settings.training
    row = state.datasets.get(version) if t.objective != "sft" else None  # sft needs no counts: skip the manifest
    counts = ((row.manifest if row else {}).get("counts") or {}).get("preference") or {}
    return objective.choose(t.objective, counts,
                            objective.Minimums(t.kto_min_desirable, t.kto_min_undesirable, t.dpo_min_pairs))


def _copy_lines(src: Path, dst: Path, indices: Sequence[int]) -> list[bytes]:
    """Write ``src``'s lines ``indices`` (in that order, repeats included) to ``dst``; returns the lines written."""
    lines = src.read_bytes().splitlines(keepends=True)
    picked = [lines[i] for i in indices]
    dst.write_bytes(b"".join(picked))
    return picked


def _trained(choice: str, ids: list[tuple[str, int]], p: plan.Plan, lines: list[bytes]) -> list[tuple[str, int]]:
    """(conversation id, the sign of the vote the job learns) for each conversation of the plan: a good answer for
    SFT, a thumbs-down for a DPO pair, the example's label for KTO."""
    out: dict[str, int] = {}
    for i, line in zip(p.sequence, lines, strict=True):
        if choice == "kto":
            try:
                score = 1 if json.loads(line).get("label") else -1
            except (ValueError, AttributeError):
                score = -1
        else:
            score = -1 if choice == "dpo" else 1
        out[ids[i][0]] = score
    return sorted(out.items())


def _job_config(cycle: Cycle, job_id: str, dataset_path: Path, version: int
                ) -> tuple[dict[str, Any], plan.Plan, objective.Choice, list[tuple[str, int]]]:
    """The trainer's config for this job, its plan and objective, and the conversations it trains on."""
    t = cycle.settings.training
    champ = lineage.champion(cycle.state, cycle.settings.dataset)
    champ_adapter = champ.adapter if champ is not None and champ.champion.adapter_present else None
    if champ is not None and champ_adapter is None:
        _log.warning("gate.champion_missing", job_id=champ.champion.job_id, adapter=str(champ.adapter))
    overrides = _template(cycle.settings)
    choice = _choice(cycle.settings, cycle.state, version)
    sft_ids = _train_ids(dataset_path, version)
    kind = PREF_KIND.get(choice.objective)
    ids = read_train_ids(dataset_path, f"{kind}_train_ids.tsv") if kind else sft_ids
    p = _plan(cycle.settings, overrides, ids, champ, seed=version)
    job_dir = cycle.state.dir / "jobs" / job_id
    folder = private_dir(private_dir(job_dir) / "plan")
    planned = folder / (f"{kind}_train.jsonl" if kind else "train.jsonl")
    lines = _copy_lines(dataset_path / planned.name, planned, p.sequence)
    new_path = None
    if champ is not None:  # the learned_new check: the newest good answers new since the champion's dataset
        floor = champ.champion.dataset_version
        new = sorted((i for i, (_, v) in enumerate(sft_ids) if v > floor), key=lambda i: (-sft_ids[i][1], i))
        if new:
            new_path = folder / "new.jsonl"
            _copy_lines(dataset_path / "train.jsonl", new_path, sorted(new[:NEW_EVAL_MAX]))
    cfg = jobspec.render_job_config(
        overrides, job_id=job_id, job_dir=job_dir, base_model=t.base_model,
        chat_template=t.chat_template, backend=t.backend,
        train_path=dataset_path / "train.jsonl" if kind else planned,
        eval_path=dataset_path / "eval.jsonl", max_steps=p.steps, champion_adapter=champ_adapter,
        init_adapter=champ.adapter if p.init == "champion" and champ else None, new_path=new_path,
        learning_rate=p.learning_rate, objective=choice.objective,
        pref_train_path=planned if kind else None,
        pref_eval_path=dataset_path / f"{kind}_eval.jsonl" if kind else None,
        canary_path=gate.CANARY_PATH if "canary" in cycle.settings.gate.checks else None,
        token_cache_dir=cycle.state.dir / "cache" / "tokens",
    )
    cfg["training"]["num_train_epochs"] = 1  # the plan's file holds the epochs; max_steps covers it exactly
    return cfg, p, choice, _trained(choice.objective, ids, p, lines)


def run(cycle: Cycle) -> bool:
    """Train on ``cycle.dataset_path``; fills the result (the gate, export and registration follow a success)."""
    settings, state, result = cycle.settings, cycle.state, cycle.result
    t, version, dataset_path = settings.training, result.dataset_version, cycle.dataset_path
    if version is None or dataset_path is None:
        raise RuntimeError("the training stage runs only after a dataset was built")
    job_id = jobspec.new_job_id()
    try:
        cfg, p, choice, trained = _job_config(cycle, job_id, dataset_path, version)
    except templates.UnknownTemplate as exc:
        result.end(Outcome.ERROR, f"training.chat_template: {exc}")
        return False
    except (OSError, ValueError) as exc:  # the dataset's files are unreadable: a one-line reason, never a crash
        result.end(Outcome.ERROR, f"cannot plan the run on dataset v{version}: {exc}")
        return False
    line = f"{choice.objective} ({choice.why}); {p.line()}"
    summary = result.counts["plan"] = {**p.summary(), "objective": choice.objective, "objective_why": choice.why,
                                       "line": line}
    _log.info("training.plan", job_id=job_id, dataset_version=version, **summary)
    short = disk.check(f"training job {job_id}", state.dir / "jobs",
                       disk.training_needs(disk.tree_bytes(dataset_path), jobspec.base_weights(t.base_model)))
    if short is not None:
        _log.warning("training.no_space", job_id=job_id, needed=short.needed, free=short.free)
        result.end(Outcome.NO_SPACE, str(short))
        return False
    cycle.step("training", f"job {job_id} on dataset v{version}: {line}")
    freed = gpu_share.free_gpu(settings)
    result.counts["ollama_unload"] = {"unloaded": freed.unloaded, "line": freed.line()}
    with state.transaction():
        state.service.set_last_run_at(cycle.now().isoformat())
    result.job_id = job_id
    with cycle.timed("train"):
        try:
            if t.executor == "ray":
                job = ray_jobs.start_job(state, t, settings.ray, config=cfg, dataset_version=version,
                                         cycle_id=result.cycle_id, created_at=cycle.now().isoformat(), plan=summary,
                                         trained=trained)
            else:
                job = runner.start_job(state, python=t.python, config=cfg, dataset_version=version,
                                       cycle_id=result.cycle_id, env=t.env, created_at=cycle.now().isoformat(),
                                       plan=summary, trained=trained)
        except (OSError, RayError) as exc:
            result.job_status = "failed"
            result.end(Outcome.TRAIN_FAILED, str(exc) if isinstance(exc, RayError)
                       else f"cannot start the trainer {t.python}: {exc.strerror or exc}")
            deciding.set_backoff(settings, state, cycle.now())
            return False

        seen: list[dict[str, Any]] = []

        def on_step(m: dict[str, Any]) -> None:
            """``step 12/20 (60%), 850 tokens/s, loss 1.2345, ETA 1m`` for the phase line and a --wait."""
            seen.append(m)
            del seen[:-STEPS_KEPT]
            shown = progress.job_progress(seen, p.steps, cycle.now())
            cycle.report("training", f"job {job_id} {shown.line() if shown else 'started'}")

        outcome = _supervise(cycle, job, on_step)
    gating.conclude(cycle, outcome)
    return True


def reattached(cycle: Cycle, job: runner.Job) -> None:
    """Follow a job that a previous service started (found alive after a restart) to its end, then the gate."""
    result = cycle.result
    cycle.step("training", f"re-attached job {job.id}")
    result.decision, result.reason = True, f"re-attached job {job.id} after a restart"
    result.dataset_version = job.row.get("dataset_version")
    gating.conclude(cycle, _supervise(cycle, job, None))


def _supervise(cycle: Cycle, job: runner.Job, on_step: Callable[[dict[str, Any]], None] | None) -> runner.JobOutcome:
    """Follow the job where it runs: a process here, or a Ray job (its row's params say which)."""
    timeout = cycle.settings.training.timeout
    if runner.is_remote(job.row):
        return ray_jobs.supervise(cycle.state, job, cycle.settings.ray, timeout_s=timeout, cancel=cycle.cancel,
                                  stop=cycle.stop, on_progress=on_step)
    return runner.supervise(cycle.state, job, timeout_s=timeout, cancel=cycle.cancel, stop=cycle.stop,
                            on_progress=on_step)
