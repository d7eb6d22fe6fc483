"""Stage: judge a finished job: backoff on failure, else the gate (candidate vs champion on the same eval split);
a promoted candidate goes on to export and registration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from daemon import faults, log
from daemon.cycle import deciding, exporting
from daemon.cycle.context import Cycle, Outcome
from daemon.state import PendingExport
from daemon.train import gate, regressions, runner

_log = log.get("daemon.cycle")


def _champion_used(config_path: str | None) -> bool:
    """Whether the job's config named a champion adapter (the trainer then evaluated it on the same split)."""
    try:
        cfg = yaml.safe_load(Path(str(config_path)).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return bool(cfg.get("gate", {}).get("champion_adapter"))


def _regression_cases(path: Path | None) -> int | str | None:
    """How many cases ``gate.regressions_file`` holds, why it cannot be used, or None without one."""
    if path is None:
        return None
    try:
        return len(regressions.load(path))
    except regressions.RegressionFileError as exc:
        return str(exc)


def _decide(cycle: Cycle, job_id: str, config_path: str | None, res: dict[str, Any]) -> gate.GateDecision:
    """The gate against the champion the trainer evaluated, else against the base model."""
    g = cycle.settings.gate
    used = _champion_used(config_path)
    champ_id = cycle.state.service.get().champion_job if used else None
    name = f"champion {champ_id}" if used else "the base model"
    key = "champion_{}" if used else "{}_before"  # the champion's numbers, or the starting weights'
    if used and not isinstance(res.get("champion_eval_loss"), int | float):
        # the champion adapter could not be evaluated: compare with the base model rather than promote blindly
        _log.warning("gate.champion_unavailable", job_id=job_id, reason=res.get("champion_error"))
        name, key = "the base model (champion could not be evaluated)", "{}_before"

    def champ(what: str, champion_key: str) -> Any:
        return res.get(champion_key if key.startswith("champion") else key.format(what))

    first_model = cycle.state.service.get().champion_job is None
    new = ((res.get("new_loss_after"), champ("new_loss", "champion_new_loss"))
           if res.get("new_examples") and not first_model else None)
    pref = ((res.get("pref_accuracy_after"), champ("pref_accuracy", "champion_pref_accuracy"))
            if res.get("pref_eval_examples") else None)
    canary_evaluated = res.get("canary_examples") is not None or res.get("canary_loss_after") is not None
    canary = ((res.get("canary_loss_after"), champ("canary_loss", "champion_canary_loss"))
              if canary_evaluated else None)
    evidence = gate.Evidence(
        name, (res.get("eval_loss_after"), champ("eval_loss", "champion_eval_loss")), new=new,
        new_skipped="no champion yet (a first model)" if first_model else "no new examples",
        preference=pref, pref_examples=res.get("pref_eval_examples"), canary=canary,
        canary_missing="the trainer evaluated no canary set (its result.json has no canary losses)",
        regressions=_regression_cases(g.regressions_file) if "regressions" in g.checks else None,
    )
    limits = gate.Limits(tolerance=g.tolerance, min_new_gain=g.min_new_gain,
                         preference_tolerance=g.preference_tolerance, max_canary_increase=g.max_canary_increase,
                         checks=tuple(g.checks), required=g.required_checks())
    return gate.judge(evidence, limits)


def learned_line(numbers: dict[str, Any]) -> str:
    """``learned: new 2.31 -> 1.12, held-out 1.80 -> 1.79`` (champion -> candidate)."""
    def pair(a: Any, b: Any) -> str:
        return " -> ".join(f"{x:.2f}" if isinstance(x, int | float) else "n/a" for x in (a, b))

    out = "learned: "
    if numbers.get("min_new_gain") is not None:
        out += f"new {pair(numbers.get('champion_new_loss'), numbers.get('candidate_new_loss'))}, "
    return out + f"held-out {pair(numbers.get('champion_eval_loss'), numbers.get('candidate_eval_loss'))}"


def conclude(cycle: Cycle, outcome: runner.JobOutcome) -> None:
    """After a job ended (supervised now, or re-attached after a restart)."""
    settings, state, result = cycle.settings, cycle.state, cycle.result
    job_id = result.job_id = outcome.job_id
    result.job_status = outcome.status
    if outcome.status != "succeeded" or outcome.result is None:
        failed = outcome.status != "cancelled"
        result.end(Outcome.TRAIN_FAILED if failed else Outcome.CANCELLED,
                   f"job {job_id} {outcome.status}: {outcome.reason}")
        if failed:
            deciding.set_backoff(settings, state, cycle.now())
        return
    deciding.clear_backoff(state)
    cycle.step("gating", f"job {job_id}")
    found = state.jobs.get(job_id)
    row = found.as_dict() if found else {}
    res = outcome.result
    g = _decide(cycle, job_id, row.get("config_path"), res)
    result.counts["gate"] = g.numbers
    result.counts["learned"] = learned_line(g.numbers)
    with state.transaction():
        state.jobs.judged(job_id, status="promoted" if g.promote else "rejected",
                          error=None if g.promote else g.reason, gate=g.numbers)
        # Trained on, promoted or not: "new examples" count from here, so a rejected candidate's data is not
        # trained again after every cooldown (only new feedback starts the next run).
        state.service.set_last_trained(row.get("dataset_version"))
        # the export's copy of the numbers also names the champion this one replaces: a regression prompt failing
        # on the exported GGUF puts it back (exporting.run)
        to_export = {**g.numbers, exporting.PREVIOUS_CHAMPION: state.service.get().champion_job}
        if g.promote:
            state.service.set_champion(job_id, dataset_version=row.get("dataset_version"))
            if settings.export.enabled:
                state.service.set_pending_export(PendingExport(job_id, to_export))
    _log.info("gate.decided", job_id=job_id, promote=g.promote, reason=g.reason, **g.numbers)
    result.job_status = "promoted" if g.promote else "rejected"
    result.dataset_version = result.dataset_version or row.get("dataset_version")
    result.end(Outcome.PROMOTED if g.promote else Outcome.REJECTED, f"job {job_id} {g.reason}")
    faults.point("gate.decided")  # promoted in state, not exported yet
    if g.promote:
        exporting.run(cycle, row, res, to_export)
