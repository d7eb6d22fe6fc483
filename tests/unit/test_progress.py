"""A running job's progress line and ETA (pure): step N/M, %, steady tokens/s, ETA from the median step pace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.train.progress import job_progress, seconds_per_step

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def line(step: int, at_s: float, tps: float | None = 800.0, loss: float = 1.5, **kw: Any) -> dict[str, Any]:
    return {"step": step, "train_loss": loss, "tokens_per_s": tps, "timestamp": (T0 + timedelta(seconds=at_s))
            .isoformat(), **kw}


def test_no_step_line_yet_is_no_progress() -> None:
    assert job_progress([{"event": "job_started", "timestamp": T0.isoformat()}], 20, T0) is None


def test_one_step_has_a_percentage_but_no_pace_yet() -> None:
    p = job_progress([line(1, 30)], 20, T0 + timedelta(seconds=31))
    assert p is not None and p.percent == 5.0 and p.eta_s is None
    assert p.line() == "step 1/20 (5%), 800 tokens/s, loss 1.5000, ETA: measuring"


def test_eta_uses_the_median_pace_so_an_eval_pause_does_not_skew_it() -> None:
    # 2 s a step, except a 60 s eval between steps 5 and 6
    times = [10, 12, 14, 16, 18, 78, 80, 82]
    lines = [line(i + 1, t) for i, t in enumerate(times)]
    assert seconds_per_step([(i + 1, T0 + timedelta(seconds=t)) for i, t in enumerate(times)]) == 2.0
    p = job_progress(lines, 20, T0 + timedelta(seconds=83))
    assert p is not None and p.step == 8 and p.percent == 40.0
    assert p.seconds_per_step == 2.0 and p.eta_s == 12 * 2.0 - 1.0
    assert p.line() == "step 8/20 (40%), 800 tokens/s, loss 1.5000, ETA 23s"


def test_tokens_per_s_is_the_median_of_the_recent_lines_and_eval_lines_join_in() -> None:
    lines = [line(1, 0, tps=100.0), line(2, 2, tps=900.0), line(3, 4, tps=1000.0), line(4, 6, tps=None),
             line(5, 8, tps=950.0, eval_loss=1.2)]
    p = job_progress(lines, None, T0 + timedelta(seconds=9))
    assert p is not None and p.tokens_per_s == 925.0  # median of 100, 900, 1000, 950
    assert p.total_steps is None and p.percent is None and p.eta_s is None
    assert p.line().startswith("step 5, ")


def test_a_late_status_counts_down_and_never_goes_below_zero() -> None:
    lines = [line(1, 0), line(2, 10), line(3, 20)]
    p = job_progress(lines, 4, T0 + timedelta(seconds=25))
    assert p is not None and p.eta_s == 5.0
    late = job_progress(lines, 4, T0 + timedelta(seconds=500))
    assert late is not None and late.eta_s == 0.0


def test_hostile_lines_give_no_pace_rather_than_an_error() -> None:
    lines = [{"step": 1, "timestamp": 5}, {"step": True}, {"step": 2, "timestamp": "2026-12-05T12:00:00"},
             {"step": 3, "timestamp": {"x": 1}, "train_loss": "nan", "tokens_per_s": float("inf")}]
    p = job_progress(lines, 10, datetime(2026, 12, 5, 12, 1))  # naive timestamps and clock: no pace from them
    assert p is not None and p.step == 3 and p.eta_s is None and p.tokens_per_s is None and p.train_loss is None


def test_every_planned_step_done_is_no_time_left_even_without_a_pace() -> None:
    p = job_progress([{"step": 20, "train_loss": 1.0}], 20, T0)
    assert p is not None and p.percent == 100.0 and p.eta_s == 0.0 and p.line().endswith("ETA 0s")
