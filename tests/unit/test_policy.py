"""Policy rules with fixed UTC datetimes: each rule both ways, edges, windows across midnight, reasons, JSON."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.cron import trigger as cron_trigger
from daemon.settings import PolicySettings, Window
from daemon.train.policy import PolicyInput, current_window, day_start, decide, expected_next, next_window_open

NOW = datetime(2025, 3, 14, 6, 56, tzinfo=UTC)  # a Friday


def cfg(**kw: Any) -> PolicySettings:
    base: dict[str, Any] = {
        "min_new_examples": 50,
        "min_total_examples": 100,
        "min_positive_ratio": 0.5,
        "cooldown": 6 * 3600.0,
        "windows": [],
        "max_runs_per_day": 2,
    }
    base.update(kw)
    return PolicySettings(**base)


def win(cron: str, hours: float) -> Window:
    return Window(cron=cron, duration=hours * 3600)


READY = PolicyInput(
    new_examples=62,
    total_examples=140,
    positive_examples=114,
    last_trained_version=3,
    last_run_at=datetime(2025, 3, 12, 20, 0, tzinfo=UTC),
    runs_today=1,
    job_running=False,
)


def at(h: int, m: int = 0, s: int = 0, day: int = 14) -> datetime:
    return datetime(2025, 3, day, h, m, s, tzinfo=UTC)


# --- the happy path -----------------------------------------------------------------------------------------------


def test_all_rules_pass_gives_a_ready_sentence_with_the_numbers() -> None:
    d = decide(READY, cfg(), NOW)
    assert d.train is True
    assert d.blockers == []
    assert d.reason == "ready: 62 new rated examples since v3, 140 total, 81.4% positive"
    assert d.next_window is None


def test_new_thumbs_down_are_named_in_the_ready_sentence() -> None:
    """A preference objective counts new thumbs-down as new feedback; the total stays the SFT-eligible count."""
    d = decide(replace(READY, new_examples=62, new_thumbs_down=20), cfg(), NOW)
    assert d.reason == "ready: 62 new rated examples (20 thumbs-down) since v3, 140 total, 81.4% positive"
    assert d.numbers["new_thumbs_down"] == 20


def test_first_run_has_no_version_and_no_cooldown() -> None:
    first = replace(READY, last_trained_version=None, last_run_at=None, runs_today=0)
    d = decide(first, cfg(), NOW)
    assert d.train
    assert d.reason == "ready: 62 new rated examples (no model trained yet), 140 total, 81.4% positive"
    assert d.numbers["cooldown_left_s"] == 0.0


# --- each rule both ways --------------------------------------------------------------------------------------------


def test_new_examples_below_threshold() -> None:
    d = decide(replace(READY, new_examples=37), cfg(), NOW)
    assert not d.train
    assert d.reason == "37/50 new rated examples since v3"
    assert d.blockers == [d.reason]


def test_new_examples_exactly_at_threshold_passes() -> None:
    assert decide(replace(READY, new_examples=50), cfg(), NOW).train


def test_total_examples_both_ways() -> None:
    d = decide(replace(READY, total_examples=99, positive_examples=99), cfg(), NOW)
    assert not d.train
    assert d.reason == "99/100 rated examples in total"
    assert decide(replace(READY, total_examples=100, positive_examples=100), cfg(), NOW).train


def test_positive_ratio_both_ways() -> None:
    below = decide(replace(READY, total_examples=1000, positive_examples=599), cfg(min_positive_ratio=0.6), NOW)
    assert not below.train
    # Floored, so a ratio under the threshold never prints as reaching it.
    assert below.reason == "positive ratio 59.9% (599/1000) is below the required 60%"
    exact = decide(replace(READY, total_examples=1000, positive_examples=600), cfg(min_positive_ratio=0.6), NOW)
    assert exact.train
    assert exact.numbers["positive_ratio"] == 0.6


def test_zero_total_is_blocked_even_without_a_ratio_requirement() -> None:
    empty = replace(READY, new_examples=0, total_examples=0, positive_examples=0)
    d = decide(empty, cfg(min_new_examples=0, min_total_examples=0, min_positive_ratio=0.0), NOW)
    assert not d.train
    assert d.blockers == ["no rated examples yet, so no positive ratio"]
    assert d.numbers["positive_ratio"] is None


def test_job_running_blocks_and_comes_first() -> None:
    d = decide(replace(READY, job_running=True, new_examples=1), cfg(), NOW)
    assert not d.train
    assert d.reason == "a training job is running"
    assert d.blockers == ["a training job is running", "1/50 new rated examples since v3"]


def test_daily_limit_both_ways() -> None:
    d = decide(replace(READY, runs_today=2), cfg(), NOW)
    assert not d.train
    assert d.reason == "daily limit reached: 2/2 runs today; resets 00:00 UTC (in 17h04m)"
    assert decide(replace(READY, runs_today=1), cfg(), NOW).train
    assert decide(replace(READY, runs_today=2), cfg(max_runs_per_day=3), NOW).train


def test_day_start_is_utc_midnight() -> None:
    assert day_start(at(23, 59, 59)) == at(0)
    assert day_start(datetime(2025, 3, 15, 1, 0, tzinfo=timezone(timedelta(hours=5)))) == at(0)


# --- cooldown --------------------------------------------------------------------------------------------------------


def test_cooldown_reason_names_time_left_and_last_run() -> None:
    d = decide(replace(READY, last_run_at=at(3, 10)), cfg(), at(6, 56))
    assert not d.train
    assert d.reason == "cooldown: 2h14m left (last run 03:10 UTC)"
    assert d.numbers["cooldown_left_s"] == pytest.approx(2 * 3600 + 14 * 60)


def test_cooldown_boundary_is_inclusive() -> None:
    last = at(3, 10)
    exactly = decide(replace(READY, last_run_at=last), cfg(), last + timedelta(hours=6))
    assert exactly.train
    one_second_early = decide(replace(READY, last_run_at=last), cfg(), last + timedelta(hours=6) - timedelta(seconds=1))
    assert not one_second_early.train
    assert one_second_early.reason == "cooldown: 1s left (last run 03:10 UTC)"
    micro_early = decide(replace(READY, last_run_at=last), cfg(), last + timedelta(hours=6, microseconds=-1))
    assert not micro_early.train


def test_zero_cooldown_never_blocks() -> None:
    assert decide(replace(READY, last_run_at=NOW), cfg(cooldown=0), NOW).train


def test_cooldown_shows_the_date_when_the_last_run_is_old() -> None:
    d = decide(replace(READY, last_run_at=at(3, 10)), cfg(cooldown=3 * 86400), at(6, 56, day=15))
    assert d.reason == "cooldown: 1d20h14m left (last run 2025-03-14 03:10 UTC)"


# --- windows ---------------------------------------------------------------------------------------------------------


def test_empty_window_list_is_always_open() -> None:
    d = decide(READY, cfg(windows=[]), NOW)
    assert d.train and d.numbers["window_open"] is True and d.next_window is None
    assert next_window_open(cfg(), NOW) is None


def test_outside_a_nightly_window() -> None:
    c = cfg(windows=[win("0 2 * * *", 4)])
    d = decide(READY, c, at(20, 48))
    assert not d.train
    assert d.reason == "outside training windows; next opens 02:00 UTC (in 5h12m)"
    assert d.next_window == at(2, day=15)
    assert d.numbers["next_window"] == "2025-03-15T02:00:00+00:00"


@pytest.mark.parametrize(
    ("now", "is_open"),
    [
        (at(1, 59, 59), False),
        (at(2, 0, 0), True),  # opens exactly at the fire time
        (at(5, 59, 59), True),
        (at(6, 0, 0), False),  # closes exactly duration later
    ],
)
def test_window_edges(now: datetime, is_open: bool) -> None:
    c = cfg(windows=[win("0 2 * * *", 4)])
    assert decide(READY, c, now).train is is_open
    assert (current_window(c, now) is not None) is is_open


def test_window_crossing_midnight_is_open_next_morning() -> None:
    c = cfg(windows=[win("0 23 * * *", 4)])
    d = decide(READY, c, at(1, 0, day=15))
    assert d.train
    assert d.numbers["window_opened_at"] == "2025-03-14T23:00:00+00:00"
    assert d.numbers["window_closes_at"] == "2025-03-15T03:00:00+00:00"
    assert d.next_window == at(23, day=15)
    assert not decide(READY, c, at(3, 0, day=15)).train
    closed = decide(READY, c, at(22, 59))
    assert closed.reason == "outside training windows; next opens 23:00 UTC (in 1m)"


def test_multiple_windows() -> None:
    c = cfg(windows=[win("0 2 * * *", 2), win("30 13 * * sat", 1)])
    friday = decide(READY, c, at(13, 45))
    assert not friday.train
    assert friday.next_window == at(2, day=15)
    saturday = decide(READY, c, at(13, 45, day=15))
    assert saturday.train
    assert saturday.numbers["window_closes_at"] == "2025-03-15T14:30:00+00:00"
    assert decide(READY, c, at(3, 0, day=15)).train
    assert next_window_open(c, at(3, 0, day=15)) == at(13, 30, day=15)


def test_overlapping_fires_keep_the_window_open_until_the_last_fire_plus_duration() -> None:
    c = cfg(windows=[win("*/10 * * * *", 1)])
    ow = current_window(c, at(12, 34, 56))
    assert ow is not None
    assert ow.opened_at == at(12, 30) and ow.closes_at == at(13, 30)
    # Every minute for a week: bisection finds the latest fire without walking 10,000 of them.
    week = current_window(cfg(windows=[win("* * * * *", 24 * 7)]), at(12, 34, 56))
    assert week is not None and week.opened_at == at(12, 34)


def test_a_window_that_never_opens() -> None:
    d = decide(READY, cfg(windows=[win("0 0 30 2 *", 1)]), NOW)
    assert not d.train
    assert d.reason == "outside training windows; none of them opens again"
    assert d.next_window is None


def test_window_note_is_added_to_another_first_reason() -> None:
    d = decide(replace(READY, new_examples=37), cfg(windows=[win("0 2 * * *", 4)]), at(20, 48))
    assert d.reason == "37/50 new rated examples since v3; window opens 02:00 UTC"
    assert d.blockers == [
        "37/50 new rated examples since v3",
        "outside training windows; next opens 02:00 UTC (in 5h12m)",
    ]


# --- every failing rule is listed -----------------------------------------------------------------------------------


def test_all_blockers_are_listed_in_order() -> None:
    bad = PolicyInput(
        new_examples=3,
        total_examples=10,
        positive_examples=2,
        last_trained_version=7,
        last_run_at=at(20, 0),
        runs_today=5,
        job_running=True,
    )
    d = decide(bad, cfg(windows=[win("0 2 * * *", 4)]), at(20, 48))
    assert not d.train
    assert len(d.blockers) == 7
    assert [b.split(" ")[0] for b in d.blockers] == ["a", "3/50", "10/100", "positive", "daily", "cooldown:", "outside"]
    assert "20%" in d.blockers[3] and "5/2" in d.blockers[4] and "5h12m" in d.blockers[5]


# --- time handling ---------------------------------------------------------------------------------------------------


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValueError, match="now must be a timezone-aware"):
        decide(READY, cfg(), datetime(2025, 3, 14, 6, 56))
    with pytest.raises(ValueError, match="last_run_at"):
        decide(replace(READY, last_run_at=datetime(2025, 3, 14, 1, 0)), cfg(), NOW)
    with pytest.raises(ValueError):
        next_window_open(cfg(windows=[win("0 2 * * *", 1)]), datetime(2025, 3, 14))


def test_other_offsets_are_converted_to_utc() -> None:
    c = cfg(windows=[win("0 2 * * *", 4)])
    plus_two = datetime(2025, 3, 14, 5, 0, tzinfo=timezone(timedelta(hours=2)))  # 03:00 UTC: inside
    d = decide(READY, c, plus_two)
    assert d.train
    assert d.numbers["now"] == "2025-03-14T03:00:00+00:00"


def test_numbers_are_json_and_hold_inputs_and_thresholds() -> None:
    d = decide(READY, cfg(windows=[win("0 2 * * *", 4)]), at(3))
    data = json.loads(json.dumps(d.numbers))
    assert data["new_examples"] == 62 and data["min_new_examples"] == 50
    assert data["total_examples"] == 140 and data["min_total_examples"] == 100
    assert data["positive_examples"] == 114 and data["min_positive_ratio"] == 0.5
    assert data["last_trained_version"] == 3 and data["last_run_at"] == "2025-03-12T20:00:00+00:00"
    assert data["cooldown_s"] == 21600.0 and data["runs_today"] == 1 and data["max_runs_per_day"] == 2
    assert data["job_running"] is False and data["window_open"] is True
    assert data["windows"] == [{"cron": "0 2 * * *", "duration_s": 14400.0}]


# --- the bisection agrees with walking every fire time ---------------------------------------------------------------


def _walk_last_fire(cron: str, now: datetime, duration: timedelta) -> datetime | None:
    """The policy's bisection against a linear walk over the same standard-cron trigger (daemon.cron); which days
    a cron names is pinned separately, against known dates (tests/unit/test_cron.py)."""
    trig = cron_trigger(cron)
    last = None
    t = trig.get_next_fire_time(None, now - duration + timedelta(microseconds=1))
    while t is not None and t <= now:
        last = t
        t = trig.get_next_fire_time(t, t)
    return last


@settings(max_examples=60, deadline=None)
@given(
    cron=st.sampled_from(["*/7 * * * *", "0 2 * * *", "15 */3 * * *", "0 23 * * 1-5", "5,50 * * * *", "0 0 1 * *"]),
    minutes=st.integers(min_value=1, max_value=3 * 1440),
    offset_s=st.integers(min_value=0, max_value=60 * 86400),
)
def test_current_window_matches_a_brute_force_walk(cron: str, minutes: int, offset_s: int) -> None:
    now = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=offset_s)
    duration = timedelta(minutes=minutes)
    expected = _walk_last_fire(cron, now, duration)
    got = current_window(cfg(windows=[Window(cron=cron, duration=duration.total_seconds())]), now)
    assert (got.opened_at if got else None) == expected


# -- expected_next: when a waiting service expects to train (issue 16) ----------------------------------------------


def test_expected_next_ready_and_running() -> None:
    assert expected_next(decide(READY, cfg(), NOW)).startswith("now:")
    assert expected_next(decide(replace(READY, job_running=True), cfg(), NOW)) == "after the running job ends"


def test_expected_next_names_the_data_it_waits_for() -> None:
    line = expected_next(decide(replace(READY, new_examples=37), cfg(), NOW))
    assert line == "when 13 more new rated example(s) arrive"


def test_expected_next_is_the_latest_of_cooldown_and_window() -> None:
    last = NOW - timedelta(hours=5)  # 1 h of cooldown left: 07:56
    assert expected_next(decide(replace(READY, last_run_at=last), cfg(), NOW)) == "at 07:56 UTC (in 1h00m)"
    nightly = cfg(windows=[win("0 2 * * *", 3)])  # opens 02:00 tomorrow, after the cooldown
    assert expected_next(decide(replace(READY, last_run_at=last), nightly, NOW)) == "at 02:00 UTC (in 19h04m)"
    limit = decide(replace(READY, runs_today=2), cfg(), NOW)  # the daily limit resets at midnight UTC
    assert expected_next(limit) == "at 00:00 UTC (in 17h04m)"
