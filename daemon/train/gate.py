"""The eval gate (pure): promote a candidate only if it is not worse than the champion beyond a tolerance."""

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


def decide(candidate: float | None, champion: float | None, tolerance: float, *, champion_name: str) -> GateDecision:
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
