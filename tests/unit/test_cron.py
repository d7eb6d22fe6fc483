"""Standard cron weekdays, checked against a table of known dates (not against APScheduler's own reading of a
crontab, which numbers Monday 0 and is exactly what these tests must catch). 2026-11-30 is a Monday."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from daemon import cron

WEEK = [datetime(2026, 11, 30, tzinfo=UTC) + timedelta(days=i) for i in range(7)]  # Mon 30 Nov .. Sun 6 Dec
NAMES = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def fire_days(expression: str, start: datetime = WEEK[0], days: int = 7) -> list[str]:
    """The weekday names of the days the expression fires on, in [start, start + days)."""
    trig = cron.trigger(expression)
    out: list[str] = []
    t = trig.get_next_fire_time(None, start)
    end = start + timedelta(days=days)
    while t is not None and t < end:
        name = NAMES[t.weekday()]
        if name not in out:
            out.append(name)
        t = trig.get_next_fire_time(t, t + timedelta(minutes=1))
    return out


@pytest.mark.parametrize(("expression", "days"), [
    ("0 23 * * 1-5", ["mon", "tue", "wed", "thu", "fri"]),
    ("0 12 * * 0", ["sun"]),
    ("0 12 * * 7", ["sun"]),
    ("0 12 * * sun", ["sun"]),
    ("0 12 * * 6,0", ["sat", "sun"]),
    ("0 12 * * sat-sat", ["sat"]),
    ("0 12 * * mon-fri", ["mon", "tue", "wed", "thu", "fri"]),
    ("0 12 * * 0-6", NAMES),
    ("0 12 * * 1-7", NAMES),
    ("0 12 * * */2", ["tue", "thu", "sat", "sun"]),  # 0,2,4,6: Sun, Tue, Thu, Sat
    ("0 12 * * 1/2", ["mon", "wed", "fri", "sun"]),  # 1,3,5,7
    ("30 2 * * *", NAMES),
    ("0 3 * * 5", ["fri"]),
])
def test_weekdays_follow_crontab(expression: str, days: list[str]) -> None:
    assert fire_days(expression) == days


def test_first_fire_times_on_known_dates() -> None:
    # Saturday 5 Dec 2026, 10:00: a Monday-Friday window next opens Monday 7 Dec at 23:00, a Sunday one tomorrow.
    sat = datetime(2026, 12, 5, 10, tzinfo=UTC)
    assert cron.trigger("0 23 * * 1-5").get_next_fire_time(None, sat) == datetime(2026, 12, 7, 23, tzinfo=UTC)
    assert cron.trigger("0 12 * * 0").get_next_fire_time(None, sat) == datetime(2026, 12, 6, 12, tzinfo=UTC)
    assert cron.trigger("15 4 * * sat").get_next_fire_time(None, sat) == datetime(2026, 12, 12, 4, 15, tzinfo=UTC)


def test_both_day_fields_restricted_match_either() -> None:
    """crontab(5): "0 0 1 * 1" fires on the 1st of the month and on every Monday."""
    trig = cron.trigger("0 0 1 * 1")
    got = []
    t = trig.get_next_fire_time(None, datetime(2026, 11, 25, tzinfo=UTC))
    while t is not None and t < datetime(2026, 12, 20, tzinfo=UTC):
        got.append(t.day)
        t = trig.get_next_fire_time(t, t + timedelta(minutes=1))
    assert got == [30, 1, 7, 14]  # Mon 30 Nov, Tue 1 Dec (the 1st), Mon 7, Mon 14
    # a star in either day field: the other alone decides
    assert fire_days("0 0 */1 * 3") == ["wed"]


@pytest.mark.parametrize(("expression", "words"), [
    ("0 0 * * 8", "0-7 or sun-sat"),
    ("0 0 * * 5-1", "runs backwards"),
    ("0 0 * * */0", "positive"),
    ("0 0 * *", "5 fields"),
    ("61 0 * * *", "minute"),
    ("0 0 * * funday", "0-7 or sun-sat"),
])
def test_bad_expressions_say_what_is_wrong(expression: str, words: str) -> None:
    with pytest.raises(cron.CronError, match=words):
        cron.trigger(expression)


def test_the_policy_and_its_next_window_read_weekdays_as_cron_does() -> None:
    """What ``status`` shows as the next window comes from the policy, which reads windows through daemon.cron."""
    from daemon.settings import PolicySettings
    from daemon.train import policy

    cfg = PolicySettings(windows=[{"cron": "0 23 * * 1-5", "duration": 3600}])
    sat = datetime(2026, 12, 5, 10, tzinfo=UTC)
    assert policy.next_window_open(cfg, sat) == datetime(2026, 12, 7, 23, tzinfo=UTC)  # Monday, not Tuesday
    assert policy.current_window(cfg, datetime(2026, 12, 4, 23, 30, tzinfo=UTC)) is not None  # Friday night
    assert policy.current_window(cfg, datetime(2026, 12, 5, 23, 30, tzinfo=UTC)) is None  # Saturday night
    sunday = PolicySettings(windows=[{"cron": "0 12 * * 0", "duration": 3600}])
    assert policy.next_window_open(sunday, sat) == datetime(2026, 12, 6, 12, tzinfo=UTC)
