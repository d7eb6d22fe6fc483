"""Stage: decide whether to train now: the policy over what state counts, the backoff after a failed job, and an
operator's trigger (which overrides the thresholds)."""

from __future__ import annotations

from datetime import datetime, timedelta

from daemon import log, proc
from daemon.cycle.context import Cycle
from daemon.settings import Settings
from daemon.state import State
from daemon.train import policy
from daemon.train.backoff import retry_delay

_log = log.get("daemon.cycle")


def policy_input(settings: Settings, state: State, now: datetime) -> policy.PolicyInput:
    """Count what the policy needs from state."""
    d = settings.dataset
    progress = state.service.get()
    trained_v = progress.last_trained_dataset or None
    counts = state.examples.eligible_counts(d.modes, d.min_score, d.include_unrated, since_version=trained_v or 0)
    down = 0
    if settings.training.objective != "sft":  # KTO and DPO learn from thumbs-down: a burst of them is new feedback
        down = state.examples.new_thumbs_down(d.modes, trained_v or 0)
    last_run = progress.last_run_at
    runs = state.jobs.started_since(policy.day_start(now).isoformat())
    return policy.PolicyInput(
        new_examples=counts["new_since_dataset"] + down,
        new_thumbs_down=down,
        total_examples=counts["eligible"],
        positive_examples=counts["positive"],
        last_trained_version=trained_v,
        last_run_at=datetime.fromisoformat(last_run) if last_run else None,
        runs_today=runs,
        job_running=job_running(state),
    )


def job_running(state: State) -> bool:
    """A trainer still runs (one that no cycle supervises: left by a service that was killed, or started by a
    ``trigger`` run elsewhere): never start a second one beside it."""
    return any(proc.alive(j.pid, j.pid_start) for j in state.jobs.recent(status="running") if j.pid)


def backoff_until(state: State) -> datetime | None:
    raw = state.service.get().train_backoff_until
    return datetime.fromisoformat(raw) if raw else None


def set_backoff(settings: Settings, state: State, now: datetime) -> None:
    """One more failed job: wait ``training.retry_backoff`` doubled per failure in a row (at most a day)."""
    failures = state.service.get().train_failures + 1
    delay = retry_delay(settings.training.retry_backoff, failures, 86400.0)
    until = now + timedelta(seconds=delay)
    with state.transaction():
        state.service.set_train_backoff(failures=failures, until=until.isoformat())
    _log.warning("training.backoff", failures=failures, retry_at=until.isoformat())


def clear_backoff(state: State) -> None:
    """A job succeeded: the failures in a row start again from zero."""
    with state.transaction():
        state.service.set_train_backoff(failures=0, until=None)


def run(cycle: Cycle) -> bool:
    """Fill the result's decision and reason; True when the cycle goes on to build and train."""
    settings, state, result = cycle.settings, cycle.state, cycle.result
    cycle.step("deciding", "applying the training policy")
    with cycle.timed("decide"):
        pin = policy_input(settings, state, cycle.now())
        decision = policy.decide(pin, settings.policy, cycle.now())
    result.numbers = decision.numbers
    result.counts["eligible"] = pin.total_examples
    result.counts["new"] = pin.new_examples
    backoff = backoff_until(state)
    if not cycle.request.forced and decision.train and backoff is not None and backoff > cycle.now():
        decision = policy.Decision(False, f"backing off after a failed job; next try after {backoff:%H:%M} UTC",
                                   decision.numbers, ["backoff"], decision.next_window)
    if cycle.request.forced and pin.job_running:  # thresholds give way to an operator; a running trainer does not
        result.decision, result.reason = False, f"triggered by an operator, but {decision.reason}"
    elif cycle.request.forced:
        result.decision = True
        result.reason = "triggered by an operator (thresholds ignored)" + (
            "" if decision.train else f"; policy alone would wait: {decision.reason}")
    else:
        result.decision, result.reason = decision.train, decision.reason
    _log.info("cycle.decided", train=result.decision, reason=result.reason,
              new_examples=pin.new_examples, total_examples=pin.total_examples)
    return result.decision
