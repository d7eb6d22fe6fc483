"""A running job as a person reads it (pure): step N/M, percent, tokens/s and an ETA from the trainer's
``metrics.jsonl`` lines seen so far.

The ETA uses the steady pace: the median seconds per step between consecutive step lines (an eval, a checkpoint
or the first step's warm-up makes one interval long; the median ignores it), times the steps left, less the time
since the last line. Tokens/s is the median of the last few lines' figures for the same reason. With fewer than
two step lines there is no pace yet, and no ETA.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from daemon.train.policy import span

RECENT = 5  # tokens/s: the median of the last RECENT figures


@dataclass(frozen=True)
class JobProgress:
    step: int
    total_steps: int | None
    percent: float | None
    tokens_per_s: float | None
    seconds_per_step: float | None
    eta_s: float | None
    train_loss: float | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """``step 12/20 (60%), 850 tokens/s, ETA 1m`` (what is not known yet is left out)."""
        out = f"step {self.step}/{self.total_steps}" if self.total_steps else f"step {self.step}"
        if self.percent is not None:
            out += f" ({self.percent:.0f}%)"
        if self.tokens_per_s is not None:
            out += f", {self.tokens_per_s:,.0f} tokens/s"
        if self.train_loss is not None:
            out += f", loss {self.train_loss:.4f}"
        out += f", ETA {span(timedelta(seconds=self.eta_s))}" if self.eta_s is not None else ", ETA: measuring"
        return out


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _when(line: Mapping[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(line.get("timestamp")))
    except ValueError:
        return None


def seconds_per_step(points: Sequence[tuple[int, datetime]]) -> float | None:
    """The median seconds per step between consecutive (step, time) points with a later step, or None."""
    rates = [(b[1] - a[1]).total_seconds() / (b[0] - a[0]) for a, b in itertools.pairwise(points)
             if b[0] > a[0]]
    rates = [r for r in rates if r >= 0]
    return statistics.median(rates) if rates else None


def job_progress(lines: Sequence[Mapping[str, Any]], total_steps: int | None, now: datetime) -> JobProgress | None:
    """The progress of a job from its metrics lines so far (None before its first step line); ``now`` aware."""
    steps = [m for m in lines if isinstance(m.get("step"), int) and not isinstance(m.get("step"), bool)]
    if not steps:
        return None
    last = steps[-1]
    step = int(last["step"])
    total = total_steps if total_steps and total_steps > 0 else None
    points: list[tuple[int, datetime]] = []
    for m in steps:
        when = _when(m)
        if when is not None and when.tzinfo is not None and (not points or int(m["step"]) > points[-1][0]):
            points.append((int(m["step"]), when))
    pace = seconds_per_step(points)
    eta = None
    if pace is not None and total is not None:
        now = now if now.tzinfo is not None else now.replace(tzinfo=UTC)  # a naive clock reads as UTC
        since_last = max(0.0, (now - points[-1][1]).total_seconds())
        eta = max(0.0, max(0, total - step) * pace - since_last)
    if total is not None and step >= total:
        eta = 0.0  # every planned step done (the final eval and the save remain)
    speeds = [v for m in steps[-RECENT:] if (v := _number(m.get("tokens_per_s"))) is not None]
    return JobProgress(
        step=step, total_steps=total, percent=min(100.0, 100.0 * step / total) if total else None,
        tokens_per_s=statistics.median(speeds) if speeds else None, seconds_per_step=pace, eta_s=eta,
        train_loss=_number(last.get("train_loss")),
    )
