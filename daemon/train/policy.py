"""When to retrain: pure rules over counts, the last runs, the config and ``now``, with reasons an operator reads.

``decide`` checks every rule (never short-circuits) so ``Decision.blockers`` lists all that failed; ``reason`` is the
most useful of them (a running job first, then the data thresholds, then the timing rules), or the "ready" sentence.
All times are timezone-aware and handled in UTC (no DST); training windows are 5-field cron expressions in UTC
read as crontab(5) does (``daemon.cron``: 0 and 7 = Sunday), on APScheduler 3.x's triggers.

``runs_today`` counts runs started in the current UTC day (since ``day_start(now)``, 00:00 UTC), so the daily limit
resets at midnight UTC rather than rolling over 24 hours; callers count runs with ``started_at >= day_start(now)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.base import BaseTrigger

from daemon import cron
from daemon.settings import PolicySettings, Window

_SECOND = timedelta(seconds=1)
_TINY = timedelta(microseconds=1)


@dataclass(frozen=True)
class PolicyInput:
    """What the policy needs to know, counted by the caller from the state database."""

    new_examples: int  # eligible examples not in the last *trained* dataset
    total_examples: int  # eligible examples now
    positive_examples: int  # of those, how many score positive
    last_trained_version: int | None  # dataset version of the last training run, None before the first
    last_run_at: datetime | None  # start of the last training run (any outcome), aware
    runs_today: int  # runs started since 00:00 UTC today (see module docstring)
    job_running: bool = False
    new_thumbs_down: int = 0  # of new_examples, the thumbs-down a preference objective learns from (not in total)


@dataclass(frozen=True)
class Decision:
    """The outcome of one evaluation: ``reason`` is one sentence for ``status``; ``numbers`` is JSON-able."""

    train: bool
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    blockers: list[str] = field(default_factory=list)
    next_window: datetime | None = None


@dataclass(frozen=True)
class OpenWindow:
    """A training window open at some instant: which one, when it opened and when it closes."""

    window: Window
    opened_at: datetime
    closes_at: datetime


def day_start(now: datetime) -> datetime:
    """00:00 UTC of ``now``'s UTC day: the boundary for ``PolicyInput.runs_today``."""
    n = _utc(now, "now")
    return n.replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class _Facts:
    """What the rules look at, worked out once from the inputs, the config and ``now`` (all UTC)."""

    now: datetime
    last_run: datetime | None
    since: str  # "since v<N>", or "(no model trained yet)"
    ratio: float | None  # positive / total; None with no rated examples
    cooldown_left: float  # seconds
    open_win: OpenWindow | None
    next_open: datetime | None
    window_ok: bool


def _facts(inputs: PolicyInput, cfg: PolicySettings, now: datetime) -> _Facts:
    now = _utc(now, "now")
    last_run = _utc(inputs.last_run_at, "last_run_at") if inputs.last_run_at is not None else None
    version = inputs.last_trained_version
    since = f"since v{version}" if version is not None else "(no model trained yet)"
    total, positive = inputs.total_examples, inputs.positive_examples
    ratio = positive / total if total > 0 else None
    cooldown_left = 0.0
    if last_run is not None:
        cooldown_left = max(0.0, cfg.cooldown - (now - last_run).total_seconds())
    open_win = current_window(cfg, now)
    next_open = next_window_open(cfg, now)
    window_ok = not cfg.windows or open_win is not None
    return _Facts(now, last_run, since, ratio, cooldown_left, open_win, next_open, window_ok)


def _data_blockers(inputs: PolicyInput, cfg: PolicySettings, f: _Facts) -> list[str]:
    """The data thresholds that fail: new examples, total examples, positive ratio (in that order)."""
    total, positive = inputs.total_examples, inputs.positive_examples
    blockers: list[str] = []
    if inputs.new_examples < cfg.min_new_examples:
        blockers.append(f"{inputs.new_examples}/{cfg.min_new_examples} new rated examples {f.since}")
    if total < cfg.min_total_examples:
        blockers.append(f"{total}/{cfg.min_total_examples} rated examples in total")
    if f.ratio is None:
        blockers.append("no rated examples yet, so no positive ratio")
    elif f.ratio < cfg.min_positive_ratio:
        blockers.append(
            f"positive ratio {_pct(positive, total)} ({positive}/{total}) is below the required "
            f"{_pct_float(cfg.min_positive_ratio)}"
        )
    return blockers


def _timing_blockers(inputs: PolicyInput, cfg: PolicySettings, f: _Facts) -> list[str]:
    """The timing rules that fail: the daily limit, then the cooldown (the windows are :func:`_window_blocker`)."""
    now, blockers = f.now, []
    if inputs.runs_today >= cfg.max_runs_per_day:
        reset = day_start(now) + timedelta(days=1)
        blockers.append(
            f"daily limit reached: {inputs.runs_today}/{cfg.max_runs_per_day} runs today; "
            f"resets 00:00 UTC (in {span(reset - now)})"
        )
    if f.last_run is not None and f.cooldown_left > 0:
        blockers.append(
            f"cooldown: {span(timedelta(seconds=f.cooldown_left))} left (last run {clock(f.last_run, now)})"
        )
    return blockers


def _window_blocker(f: _Facts) -> str | None:
    """Why no training window is open now, or None when one is (or none are configured)."""
    if f.window_ok:
        return None
    if f.next_open is None:
        return "outside training windows; none of them opens again"
    return f"outside training windows; next opens {clock(f.next_open, f.now)} (in {span(f.next_open - f.now)})"


def _numbers(inputs: PolicyInput, cfg: PolicySettings, f: _Facts) -> dict[str, Any]:
    """The decision's figures for ``status`` (JSON-able)."""
    return {
        "now": f.now.isoformat(),
        "new_examples": inputs.new_examples,
        "new_thumbs_down": inputs.new_thumbs_down,
        "min_new_examples": cfg.min_new_examples,
        "total_examples": inputs.total_examples,
        "min_total_examples": cfg.min_total_examples,
        "positive_examples": inputs.positive_examples,
        "positive_ratio": f.ratio,
        "min_positive_ratio": cfg.min_positive_ratio,
        "last_trained_version": inputs.last_trained_version,
        "last_run_at": f.last_run.isoformat() if f.last_run else None,
        "cooldown_s": cfg.cooldown,
        "cooldown_left_s": f.cooldown_left,
        "runs_today": inputs.runs_today,
        "max_runs_per_day": cfg.max_runs_per_day,
        "job_running": inputs.job_running,
        "windows": [{"cron": w.cron, "duration_s": w.duration} for w in cfg.windows],
        "window_open": f.window_ok,
        "window_opened_at": f.open_win.opened_at.isoformat() if f.open_win else None,
        "window_closes_at": f.open_win.closes_at.isoformat() if f.open_win else None,
        "next_window": f.next_open.isoformat() if f.next_open else None,
    }


def decide(inputs: PolicyInput, cfg: PolicySettings, now: datetime) -> Decision:
    """Evaluate every rule at ``now`` (aware; naive raises ValueError) and explain the outcome."""
    f = _facts(inputs, cfg, now)
    window_blocker = _window_blocker(f)
    blockers = [
        *(["a training job is running"] if inputs.job_running else []),
        *_data_blockers(inputs, cfg, f),
        *_timing_blockers(inputs, cfg, f),
        *([window_blocker] if window_blocker is not None else []),
    ]
    numbers = _numbers(inputs, cfg, f)
    if blockers:
        reason = blockers[0]
        if window_blocker is not None and window_blocker is not reason and f.next_open is not None:
            reason += f"; window opens {clock(f.next_open, f.now)}"
        return Decision(False, reason, numbers, blockers, f.next_open)
    total, positive = inputs.total_examples, inputs.positive_examples
    down = f" ({inputs.new_thumbs_down} thumbs-down)" if inputs.new_thumbs_down else ""
    reason = (f"ready: {inputs.new_examples} new rated examples{down} {f.since}, {total} total, "
              f"{_pct(positive, total)} positive")
    return Decision(True, reason, numbers, [], f.next_open)


def current_window(cfg: PolicySettings, now: datetime) -> OpenWindow | None:
    """The window open at ``now``, if any (the one closing last when several overlap).

    A window opens at each fire time ``f`` of its cron and is open for ``f <= now < f + duration``.
    """
    now = _utc(now, "now")
    best: OpenWindow | None = None
    for w in cfg.windows:
        fired = _last_fire(w.cron, now, timedelta(seconds=w.duration))
        if fired is None:
            continue
        ow = OpenWindow(w, fired, fired + timedelta(seconds=w.duration))
        if best is None or ow.closes_at > best.closes_at:
            best = ow
    return best


def next_window_open(cfg: PolicySettings, now: datetime) -> datetime | None:
    """The next time after ``now`` that any window opens; None when there are no windows (always open)."""
    now = _utc(now, "now")
    times = [t for t in (_trigger(w.cron).get_next_fire_time(None, now + _TINY) for w in cfg.windows) if t]
    return min((t.astimezone(UTC) for t in times), default=None)


@functools.lru_cache(maxsize=64)
def _trigger(expression: str) -> BaseTrigger:
    """Standard 5-field cron (0 and 7 = Sunday), not APScheduler's own crontab reading (0 = Monday)."""
    return cron.trigger(expression)


def _last_fire(cron: str, now: datetime, duration: timedelta) -> datetime | None:
    """The latest fire time in ``(now - duration, now]``, or None. Bisects, so frequent crons cost ~log2(duration)."""
    trig = _trigger(cron)
    first: datetime | None = trig.get_next_fire_time(None, now - duration + _TINY)
    if first is None or first > now:
        return None
    # Invariant: lo is a fire time <= now, and no fire time lies in [hi, now] once hi has moved below now.
    lo, hi = first.astimezone(UTC), now
    while hi - lo > _SECOND:
        mid = lo + (hi - lo) / 2
        f: datetime | None = trig.get_next_fire_time(None, mid)
        if f is not None and f <= now:
            lo = f.astimezone(UTC)
        else:
            hi = mid
    # Cron fire times are whole minutes apart, so no other fire fits between lo and hi (< 1 s apart).
    return lo


def _utc(t: datetime, name: str) -> datetime:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {t.isoformat()}")
    return t.astimezone(UTC)


def span(d: timedelta) -> str:
    """A remaining time, rounded up to the minute: ``2h14m``, ``45m``, ``1d3h``; under a minute in seconds."""
    s = max(0.0, d.total_seconds())
    if s < 60:
        return f"{math.ceil(s)}s"
    m = math.ceil(s / 60)
    days, m = divmod(m, 1440)
    hours, mins = divmod(m, 60)
    if days:
        return f"{days}d{hours}h" if not mins else f"{days}d{hours}h{mins}m"
    if hours:
        return f"{hours}h{mins:02d}m"
    return f"{mins}m"


def clock(t: datetime, now: datetime) -> str:
    """``03:10 UTC`` when within a day of ``now``, else with the date."""
    if abs(t - now) < timedelta(days=1):
        return t.strftime("%H:%M UTC")
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _pct(part: int, whole: int) -> str:
    """Percentage of counts, floored to 0.1 so a ratio under a threshold never prints as reaching it."""
    tenths = part * 1000 // whole
    return f"{tenths // 10}%" if tenths % 10 == 0 else f"{tenths / 10:.1f}%"


def _pct_float(x: float) -> str:
    s = f"{x * 100:.1f}"
    return (s[:-2] if s.endswith(".0") else s) + "%"


def expected_next(decision: Decision) -> str:
    """When training is expected to start, for ``status``: ready now; when more data arrives (a data threshold
    blocks it, so no time can be promised); else the latest of the cooldown's end, the daily reset and the next
    window's opening (those blocks pass by themselves)."""
    n = decision.numbers
    if decision.train:
        return "now: the next cycle trains (a change in the store, the periodic reconcile or `trigger`)"
    if n.get("job_running"):
        return "after the running job ends"
    need = []
    if n["new_examples"] < n["min_new_examples"]:
        need.append(f"{n['min_new_examples'] - n['new_examples']} more new rated example(s)")
    if n["total_examples"] < n["min_total_examples"]:
        need.append(f"{n['min_total_examples'] - n['total_examples']} more rated example(s) in total")
    if n["positive_ratio"] is None or n["positive_ratio"] < n["min_positive_ratio"]:
        need.append("more positive feedback")
    if need:
        return "when " + " and ".join(need) + " arrive"
    now = datetime.fromisoformat(n["now"])
    at = now + timedelta(seconds=float(n.get("cooldown_left_s") or 0))
    if n["runs_today"] >= n["max_runs_per_day"]:
        at = max(at, day_start(now) + timedelta(days=1))
    if not n["window_open"]:
        if decision.next_window is None:
            return "never: no training window opens again"
        at = max(at, decision.next_window)
    return f"at {clock(at, now)} (in {span(at - now)})"
