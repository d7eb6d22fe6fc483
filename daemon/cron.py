"""Standard 5-field cron, as crontab(5) reads it, on top of APScheduler 3's trigger.

``minute hour day-of-month month day-of-week`` in UTC. Day of week 0 and 7 are Sunday, 1 is Monday, names
``sun``-``sat`` are accepted, and when both day fields are restricted a time matches when EITHER does (crontab(5):
"0 0 1 * 1" is midnight on the 1st and on every Monday). APScheduler 3's ``CronTrigger.from_crontab`` numbers
weekdays 0 = Monday and requires both day fields; this module translates the day-of-week field into weekday names
and joins the two day fields with an ``OrTrigger``, so every caller (the settings check, the policy's windows, the
service's scheduler, ``status``'s next window) reads a window the same, standard way. Pure: a leaf.
"""

from __future__ import annotations

from datetime import UTC

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # index = crontab(5) number (7 is Sunday too)


class CronError(ValueError):
    """The expression is not standard 5-field cron; the message says which part."""


def _day_number(token: str) -> int:
    if token in DAY_NAMES:
        return DAY_NAMES.index(token)
    if token.isdigit() and int(token) <= 7:
        return int(token)
    raise CronError(f"day of week {token!r} is not 0-7 or sun-sat")


def weekdays(field: str) -> frozenset[int]:
    """The days a day-of-week field selects, Sunday = 0 ... Saturday = 6 (``7`` and ``sun`` are 0)."""
    days: set[int] = set()
    for part in field.lower().split(","):
        base, slash, step_text = part.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"day of week step {step_text!r} is not a positive number")
            step = int(step_text)
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base:
            first, _, last = base.partition("-")
            lo, hi = _day_number(first), _day_number(last)
            if lo > hi:
                raise CronError(f"day of week range {base!r} runs backwards")
        else:
            lo = _day_number(base)
            hi = 7 if slash else lo  # "1/2": from Monday on, every second day (as cronie reads it)
        days.update(d % 7 for d in range(lo, hi + 1, step))
    return frozenset(days)


def aps_day_of_week(field: str) -> str:
    """A crontab(5) day-of-week field as APScheduler's ``day_of_week`` (weekday names, so no numbering to mix up)."""
    if field == "*":
        return "*"
    days = weekdays(field)
    return ",".join(DAY_NAMES[d] for d in sorted(days))


def trigger(expression: str) -> BaseTrigger:
    """The APScheduler trigger (UTC) that fires when the 5-field cron ``expression`` does, crontab(5)'s way.
    Raises :class:`CronError` with the part that is wrong."""
    fields = expression.split()
    if len(fields) != 5:
        raise CronError(f"expected 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}")
    minute, hour, dom, month, dow = fields
    for name, key, value in (("minute", "minute", minute), ("hour", "hour", hour), ("day of month", "day", dom),
                             ("month", "month", month)):
        try:
            CronTrigger(**{key: value}, timezone=UTC)
        except ValueError as exc:
            raise CronError(f"{name} {value!r}: {exc}") from None

    def cron(day: str, day_of_week: str) -> CronTrigger:
        return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week, timezone=UTC)

    if dom.startswith("*") or dow.startswith("*"):  # one of them restricts (or neither): both must match
        return cron(dom, aps_day_of_week(dow))
    return OrTrigger([cron(dom, "*"), cron("*", aps_day_of_week(dow))])  # both restrict: either matches
