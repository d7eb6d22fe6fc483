"""The gate (pure): promote a candidate only when every named check passes.

* ``held_out``: its eval loss on the held-out split is not worse than the champion's beyond a tolerance (did it
  keep the rest?);
* ``learned_new``: its loss on the examples new since the champion's dataset is at least ``min_new_gain`` below the
  champion's (did it learn what was just taught?); skipped when there are no new examples, or no champion yet (a
  first model has only the base to beat, and ``held_out`` says that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeGuard


@dataclass(frozen=True, slots=True)
class GateDecision:
    promote: bool
    reason: str
    numbers: dict[str, Any]


def _ok(x: Any) -> TypeGuard[float]:
    """A finite number (not a bool): a loss the gate can compare."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def decide(candidate: float | None, champion: float | None, tolerance: float, *, champion_name: str,
           new: tuple[Any, Any] | None = None, min_new_gain: float = 0.0,
           skipped: str = "no new examples") -> GateDecision:
    """:func:`held_out`, then (``new`` = (candidate, champion) losses on the new examples) ``learned_new``."""
    first = held_out(candidate, champion, tolerance, champion_name=champion_name)
    checks = [{"name": "held_out", "passed": first.promote, "detail": first.reason}]
    numbers = {**first.numbers, "checks": checks}
    if new is None:
        checks.append({"name": "learned_new", "passed": True, "detail": f"skipped: {skipped}"})
        return GateDecision(first.promote, first.reason, numbers)
    ok, detail = learned_new(new[0], new[1], min_new_gain, champion_name=champion_name)
    checks.append({"name": "learned_new", "passed": ok, "detail": detail})
    numbers.update(candidate_new_loss=new[0], champion_new_loss=new[1], min_new_gain=min_new_gain)
    if not first.promote:
        return GateDecision(False, first.reason, numbers)
    if not ok:
        return GateDecision(False, f"rejected: {detail}", numbers)
    return GateDecision(True, f"{first.reason}; {detail}", numbers)


def learned_new(candidate: Any, champion: Any, min_gain: float, *, champion_name: str) -> tuple[bool, str]:
    """Whether the candidate's loss on the new examples is at least ``min_gain`` below the champion's."""
    if not _ok(candidate):
        return False, f"learned_new: the candidate has no usable loss on the new examples ({candidate!r})"
    if not _ok(champion):
        return True, f"learned_new: new-example loss {candidate:.4f} (no {champion_name} loss to compare)"
    limit = champion * (1 - min_gain)
    if candidate <= limit:
        return True, f"learned_new: new-example loss {champion:.4f} -> {candidate:.4f}"
    return False, (f"learned_new: new-example loss {candidate:.4f} is not {min_gain:.0%} below {champion_name}'s "
                   f"{champion:.4f} (limit {limit:.4f}): it did not learn the new feedback")


def held_out(candidate: float | None, champion: float | None, tolerance: float, *, champion_name: str
             ) -> GateDecision:
    """``candidate`` and ``champion`` are eval losses on the same eval split; lower is better.

    Promote when candidate <= champion * (1 + tolerance). A missing or non-finite candidate loss never promotes;
    a missing champion loss (nothing to compare with) promotes a finite candidate.
    """
    numbers = {"candidate_eval_loss": candidate, "champion_eval_loss": champion, "tolerance": tolerance,
               "champion": champion_name}
    if not _ok(candidate):
        return GateDecision(False, f"rejected: the candidate has no usable eval loss ({candidate!r})", numbers)
    if not _ok(champion):
        return GateDecision(True, f"promoted: eval loss {candidate:.4f} (no {champion_name} loss to compare)",
                            numbers)
    limit = champion * (1 + tolerance)
    numbers["limit"] = limit
    if candidate <= limit:
        return GateDecision(True, f"promoted: eval loss {candidate:.4f} <= {champion_name} {champion:.4f}"
                            + (f" (tolerance {tolerance:.1%})" if tolerance else ""), numbers)
    return GateDecision(False, f"rejected: eval loss {candidate:.4f} > {champion_name} {champion:.4f}"
                        + (f" x (1 + {tolerance:g})" if tolerance else ""), numbers)
