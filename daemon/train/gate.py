"""The gate (pure): promote a candidate only when every required named check passes.

* ``loss``: its eval loss on the held-out split is not worse than the champion's beyond ``tolerance`` (did it keep
  the rest?);
* ``learned_new``: its loss on the examples new since the champion's dataset is at least ``min_new_gain`` below the
  champion's (did it learn what was just taught?); skipped when there are no new examples, or no champion yet (a
  first model has only the base to beat, and ``loss`` says that);
* ``preference``: its preference accuracy on the preference eval split is not below the champion's minus
  ``preference_tolerance`` (absolute); skipped ("no data") while the run scored no preference examples;
* ``canary``: its perplexity (exp of the mean token loss) on the canary set shipped with the package (general text
  and chat turns, ``canary.jsonl``) is at most the champion's x (1 + ``max_canary_increase``): the forgetting guard.
  A bound, never a reason to promote (a fine-tune may raise perplexity while it improves);
* ``regressions``: the operator's prompts with deterministic expectations (``regressions.py``), run on the exported
  GGUF: before the export it is *pending* (not a failure), :func:`after_export` judges the answers.

A check that has nothing to judge passes as *skipped*; a check that should run but cannot (its numbers are missing,
its file is unreadable) fails, and a failed check rejects the candidate only when it is required. Each check is a
dict ``{"name", "passed", "required", "detail", "skipped"?, "pending"?, numbers...}``; the decision's
``numbers["checks"]`` lists them in :data:`CHECKS` order and the reason names the failing required checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

from daemon.train import regressions as regression_cases

CHECKS = ("loss", "learned_new", "preference", "canary", "regressions")
CANARY_PATH = Path(__file__).with_name("canary.jsonl")  # the canary set shipped in the package


@dataclass(frozen=True, slots=True)
class GateDecision:
    promote: bool
    reason: str
    numbers: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Limits:
    """The gate's settings: the checks that run, those that must pass (None: every one that runs) and the bounds."""

    tolerance: float = 0.0
    min_new_gain: float = 0.0
    preference_tolerance: float = 0.05
    max_canary_increase: float = 0.10
    checks: tuple[str, ...] = CHECKS
    required: tuple[str, ...] | None = None

    def is_required(self, name: str) -> bool:
        return name in (self.checks if self.required is None else self.required)


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the checks judge, each a (candidate, champion) pair measured on the same set in the same job.

    ``new`` None: no new-example losses (``new_skipped`` says why); ``preference`` None: no preference examples were
    scored; ``canary`` None: the canary set was not evaluated (``canary_missing`` says why); ``regressions``: the
    number of cases in the operator's file, a string saying why the file cannot be used, or None (no file).
    """

    champion_name: str
    eval_loss: tuple[Any, Any]
    new: tuple[Any, Any] | None = None
    new_skipped: str = "no new examples"
    preference: tuple[Any, Any] | None = None
    pref_examples: Any = None
    canary: tuple[Any, Any] | None = None
    canary_missing: str = "the trainer evaluated no canary set"
    regressions: int | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _ok(x: Any) -> TypeGuard[float]:
    """A finite number (not a bool): a loss the gate can compare."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check(name: str, passed: bool, detail: str, **numbers: Any) -> dict[str, Any]:
    return {"name": name, "passed": passed, "detail": f"{name}: {detail}", **numbers}


def _skipped(name: str, why: str) -> dict[str, Any]:
    return {"name": name, "passed": True, "skipped": True, "detail": f"{name}: skipped: {why}"}


def loss(candidate: Any, champion: Any, tolerance: float, *, champion_name: str) -> dict[str, Any]:
    """``candidate`` and ``champion`` are eval losses on the same eval split; lower is better.

    Passes when candidate <= champion * (1 + tolerance). A missing or non-finite candidate loss never passes; a
    missing champion loss (nothing to compare with) passes a finite candidate.
    """
    nums = {"candidate": candidate, "champion": champion, "tolerance": tolerance}
    if not _ok(candidate):
        return _check("loss", False, f"the candidate has no usable eval loss ({candidate!r})", **nums)
    if not _ok(champion):
        return _check("loss", True, f"eval loss {candidate:.4f} (no {champion_name} loss to compare)", **nums)
    limit = champion * (1 + tolerance)
    if candidate <= limit:
        return _check("loss", True, f"eval loss {candidate:.4f} <= {champion_name} {champion:.4f}"
                      + (f" (tolerance {tolerance:.1%})" if tolerance else ""), **nums, limit=limit)
    return _check("loss", False, f"eval loss {candidate:.4f} > {champion_name} {champion:.4f}"
                  + (f" x (1 + {tolerance:g})" if tolerance else ""), **nums, limit=limit)


def learned_new(candidate: Any, champion: Any, min_gain: float, *, champion_name: str) -> dict[str, Any]:
    """Whether the candidate's loss on the new examples is at least ``min_gain`` below the champion's."""
    nums = {"candidate": candidate, "champion": champion, "min_gain": min_gain}
    if not _ok(candidate):
        return _check("learned_new", False, f"the candidate has no usable loss on the new examples ({candidate!r})",
                      **nums)
    if not _ok(champion):
        return _check("learned_new", True, f"new-example loss {candidate:.4f} (no {champion_name} loss to compare)",
                      **nums)
    limit = champion * (1 - min_gain)
    if candidate <= limit:
        return _check("learned_new", True, f"new-example loss {champion:.4f} -> {candidate:.4f}", **nums, limit=limit)
    return _check("learned_new", False, f"new-example loss {candidate:.4f} is not {min_gain:.0%} below "
                  f"{champion_name}'s {champion:.4f} (limit {limit:.4f}): it did not learn the new feedback",
                  **nums, limit=limit)


def preference(candidate: Any, champion: Any, tolerance: float, *, champion_name: str, examples: Any = None
               ) -> dict[str, Any]:
    """Preference accuracy (higher is better): passes when candidate >= champion - tolerance (absolute)."""
    nums = {"candidate_accuracy": candidate, "champion_accuracy": champion, "tolerance": tolerance,
            "examples": examples}
    if not _ok(candidate):
        return _check("preference", False, f"the candidate has no usable preference accuracy ({candidate!r})",
                      **nums)
    if not _ok(champion):
        return _check("preference", True, f"accuracy {candidate:.3f} (no {champion_name} accuracy to compare)",
                      **nums)
    limit = champion - tolerance
    if candidate >= limit - 1e-12:
        return _check("preference", True, f"accuracy {champion:.3f} -> {candidate:.3f}", **nums, limit=limit)
    return _check("preference", False, f"accuracy {candidate:.3f} < {champion_name}'s {champion:.3f} - {tolerance:g}"
                  ": it ranks the answers users preferred worse", **nums, limit=limit)


def perplexity(loss_value: Any) -> float | None:
    """exp(mean token loss), or None for a missing loss (inf beyond what a float holds)."""
    if not _ok(loss_value):
        return None
    try:
        return math.exp(loss_value)
    except OverflowError:
        return math.inf


def canary(candidate: Any, champion: Any, max_increase: float, *, champion_name: str) -> dict[str, Any]:
    """Canary losses -> perplexities: passes when candidate ppl <= champion ppl * (1 + max_increase)."""
    cand_ppl, champ_ppl = perplexity(candidate), perplexity(champion)
    nums = {"candidate_loss": candidate, "champion_loss": champion, "candidate_ppl": cand_ppl,
            "champion_ppl": champ_ppl, "max_increase": max_increase}
    if cand_ppl is None:
        return _check("canary", False, f"the candidate has no usable canary loss ({candidate!r})", **nums)
    if champ_ppl is None:
        return _check("canary", False, f"no {champion_name} canary loss to compare ({champion!r})", **nums)
    limit = champ_ppl * (1 + max_increase)
    rise = cand_ppl / champ_ppl - 1 if champ_ppl > 0 else math.inf
    nums.update(limit_ppl=limit, increase=rise)
    if cand_ppl <= limit:
        return _check("canary", True, f"perplexity {champ_ppl:.2f} -> {cand_ppl:.2f} ({rise:+.1%})", **nums)
    return _check("canary", False, f"perplexity {cand_ppl:.2f} is {rise:+.1%} over {champion_name}'s {champ_ppl:.2f} "
                  f"(at most +{max_increase:.0%}): it forgot general text", **nums)


PENDING = "runs on the exported GGUF"


def regressions_pending(cases: int | str | None) -> dict[str, Any]:
    """The ``regressions`` check before the export: skipped without a file, failed when the file cannot be used,
    else pending (it passes for now; :func:`after_export` judges the answers)."""
    if cases is None:
        return _skipped("regressions", "no regressions file (gate.regressions_file)")
    if isinstance(cases, str):
        return _check("regressions", False, f"cannot run: {cases}")
    return {**_check("regressions", True, f"{cases} case(s) pending: {PENDING}"), "pending": True, "cases": cases}


def regressions(answers: Sequence[dict[str, Any]] | None, cases: Sequence[regression_cases.Case],
                why_not: str = "no answers from the exported GGUF") -> dict[str, Any]:
    """The ``regressions`` check on the exported GGUF's answers (``regressions.evaluate``); None: it could not run."""
    if not cases:
        return _skipped("regressions", "no regression cases")
    if answers is None:
        return _check("regressions", False, f"cannot run: {why_not}", cases=len(cases))
    failures = regression_cases.evaluate(answers, cases)
    if not failures:
        return _check("regressions", True, f"{len(cases)} case(s) met every expectation", cases=len(cases), failed=[])
    head = "; ".join(f.line() for f in failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
    return _check("regressions", False, f"{len(failures)} of {len(cases)} case(s) failed: {head}", cases=len(cases),
                  failed=[f.as_dict() for f in failures])


def _verdict(checks: list[dict[str, Any]], numbers: dict[str, Any]) -> GateDecision:
    """Promote when every required check passed; the reason names the failing required ones."""
    failed = [c for c in checks if c["required"] and not c["passed"]]
    numbers["checks"] = checks
    numbers["failed"] = [c["name"] for c in failed]
    if failed:
        return GateDecision(False, "rejected: " + "; ".join(c["detail"] for c in failed), numbers)
    said = [c["detail"] for c in checks if c["required"] and not c.get("skipped") and not c.get("pending")]
    return GateDecision(True, "promoted: " + ("; ".join(said) or "no required check"), numbers)


def judge(ev: Evidence, limits: Limits) -> GateDecision:
    """Run the checks of ``limits.checks`` on ``ev``; ``numbers`` keeps the flat loss numbers beside ``checks``."""
    name = ev.champion_name
    numbers: dict[str, Any] = {"candidate_eval_loss": ev.eval_loss[0], "champion_eval_loss": ev.eval_loss[1],
                               "tolerance": limits.tolerance, "champion": name, **ev.extra}
    checks: list[dict[str, Any]] = []
    for check in CHECKS:
        if check not in limits.checks:
            continue
        if check == "loss":
            c = loss(ev.eval_loss[0], ev.eval_loss[1], limits.tolerance, champion_name=name)
            if "limit" in c:
                numbers["limit"] = c["limit"]
        elif check == "learned_new":
            if ev.new is None:
                c = _skipped(check, ev.new_skipped)
            else:
                c = learned_new(ev.new[0], ev.new[1], limits.min_new_gain, champion_name=name)
                numbers.update(candidate_new_loss=ev.new[0], champion_new_loss=ev.new[1],
                               min_new_gain=limits.min_new_gain)
        elif check == "preference":
            c = (_skipped(check, "no data (no preference examples were scored)") if ev.preference is None
                 else preference(ev.preference[0], ev.preference[1], limits.preference_tolerance, champion_name=name,
                                 examples=ev.pref_examples))
        elif check == "canary":
            c = (_check(check, False, f"cannot run: {ev.canary_missing}") if ev.canary is None
                 else canary(ev.canary[0], ev.canary[1], limits.max_canary_increase, champion_name=name))
        else:
            c = regressions_pending(ev.regressions)
        c["required"] = limits.is_required(check)
        checks.append(c)
    numbers["required"] = [c for c in limits.checks if limits.is_required(c)]
    return _verdict(checks, numbers)


def after_export(decision_numbers: dict[str, Any], answers: Sequence[dict[str, Any]] | None,
                 cases: Sequence[regression_cases.Case], required: Sequence[str] | None = None,
                 why_not: str = "no answers from the exported GGUF") -> GateDecision:
    """The gate again once the exported GGUF answered the regression prompts: the ``regressions`` check of
    ``decision_numbers`` (the numbers of the decision before the export) is replaced by its verdict on ``answers``
    (None: the prompts could not be run, ``why_not``), and the decision recomputed. ``required``: the required
    checks (None: those ``decision_numbers`` recorded)."""
    numbers = dict(decision_numbers)
    need = set(required if required is not None else numbers.get("required") or CHECKS)
    checks = []
    for old in numbers.get("checks") or []:
        c = regressions(answers, cases, why_not) if old.get("name") == "regressions" else dict(old)
        c["required"] = c["name"] in need
        checks.append(c)
    if not any(c["name"] == "regressions" for c in checks):
        c = regressions(answers, cases, why_not)
        c["required"] = "regressions" in need
        checks.append(c)
    numbers["required"] = [c["name"] for c in checks if c["required"]]
    return _verdict(checks, numbers)


def decide(candidate: float | None, champion: float | None, tolerance: float, *, champion_name: str,
           new: tuple[Any, Any] | None = None, min_new_gain: float = 0.0,
           skipped: str = "no new examples") -> GateDecision:
    """The ``loss`` and ``learned_new`` checks alone (``new`` = (candidate, champion) losses on the new examples)."""
    return judge(Evidence(champion_name, (candidate, champion), new=new, new_skipped=skipped),
                 Limits(tolerance=tolerance, min_new_gain=min_new_gain, checks=("loss", "learned_new")))


def check_state(check: dict[str, Any]) -> str:
    """``skipped``, ``pending``, ``passed`` or ``FAILED``: how one check of a decision ended."""
    if check.get("skipped"):
        return "skipped"
    if check.get("pending"):
        return "pending"
    return "passed" if check.get("passed") else "FAILED"


def lines(numbers: dict[str, Any] | None) -> list[str]:
    """One line per check of a decision's numbers: ``canary    passed  canary: perplexity 12.1 -> 12.3 (+1.7%)``."""
    out = []
    for c in (numbers or {}).get("checks") or []:
        state = check_state(c)
        opt = "" if c.get("required", True) else " (not required)"
        detail = str(c.get("detail", "")).split(": ", 1)[-1].removeprefix("skipped: ")
        out.append(f"{c.get('name', '?'):<12} {state + opt:<7} {detail}")
    return out
