"""The gate as named checks: loss, learned_new, preference, canary, regressions. A check with nothing to judge passes as
skipped, one that should run but cannot fails; a failed check rejects only when it is required."""

from __future__ import annotations

import math
from typing import Any

import pytest

from daemon.train import gate
from daemon.train.gate import Evidence, Limits, decide, judge
from daemon.train.regressions import Case


def by_name(numbers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in numbers["checks"]}


# --- loss (was held_out) ------------------------------------------------------------------------------------------

def test_promotes_within_tolerance_and_rejects_beyond() -> None:
    ok = decide(1.04, 1.0, 0.05, champion_name="champion")
    assert ok.promote and ok.reason == "promoted: loss: eval loss 1.0400 <= champion 1.0000 (tolerance 5.0%)"
    assert ok.numbers["limit"] == pytest.approx(1.05)
    worse = decide(1.06, 1.0, 0.05, champion_name="champion")
    assert not worse.promote and worse.reason == "rejected: loss: eval loss 1.0600 > champion 1.0000 x (1 + 0.05)"
    assert worse.numbers["failed"] == ["loss"]
    assert decide(1.0, 1.0, 0.0, champion_name="base").reason == "promoted: loss: eval loss 1.0000 <= base 1.0000"


@pytest.mark.parametrize("candidate", [None, math.nan, math.inf, True])
def test_an_unusable_candidate_never_promotes(candidate: float | None) -> None:
    verdict = decide(candidate, 1.0, 0.5, champion_name="champion")
    assert not verdict.promote and verdict.reason.startswith("rejected: loss: the candidate has no usable eval loss")


@pytest.mark.parametrize("champion", [None, math.nan, False])
def test_without_a_champion_loss_a_finite_candidate_promotes(champion: float | None) -> None:
    verdict = decide(0.9, champion, 0.0, champion_name="base")
    assert verdict.promote and verdict.reason == "promoted: loss: eval loss 0.9000 (no base loss to compare)"
    assert "limit" not in verdict.numbers


def test_the_loss_check_carries_its_numbers() -> None:
    c = by_name(decide(1.04, 1.0, 0.05, champion_name="c").numbers)["loss"]
    assert c == {"name": "loss", "passed": True, "required": True, "candidate": 1.04, "champion": 1.0,
                 "tolerance": 0.05, "limit": pytest.approx(1.05),
                 "detail": "loss: eval loss 1.0400 <= c 1.0000 (tolerance 5.0%)"}


# --- learned_new -----------------------------------------------------------------------------------------------------

def test_learned_new_is_a_named_check_beside_loss() -> None:
    g = decide(1.79, 1.80, 0.0, champion_name="champion j-1", new=(1.12, 2.31), min_new_gain=0.05)
    assert g.promote
    assert [(c["name"], c["passed"]) for c in g.numbers["checks"]] == [("loss", True), ("learned_new", True)]
    assert g.numbers["candidate_new_loss"] == 1.12 and g.numbers["champion_new_loss"] == 2.31


@pytest.mark.parametrize(("cand", "champ", "promote"), [(0.95, 1.0, True), (0.951, 1.0, False), (1.2, 1.0, False),
                                                        (float("nan"), 1.0, False), (0.5, None, True)])
def test_learned_new_needs_min_new_gain_below_the_champion(cand: float, champ: float | None, promote: bool) -> None:
    g = decide(1.0, 1.0, 0.0, champion_name="champion j-1", new=(cand, champ), min_new_gain=0.05)
    assert g.promote is promote
    if not promote:
        assert "learned_new" in g.reason and g.numbers["checks"][1]["passed"] is False


def test_learned_new_is_skipped_without_new_examples_and_loss_still_rules() -> None:
    g = decide(1.0, 1.0, 0.0, champion_name="c", new=None, min_new_gain=0.05)
    assert g.promote and g.numbers["checks"][1] == {"name": "learned_new", "passed": True, "skipped": True,
                                                    "required": True, "detail": "learned_new: skipped: no new examples"}
    worse = decide(1.5, 1.0, 0.0, champion_name="c", new=(0.1, 1.0), min_new_gain=0.05)
    assert not worse.promote and worse.numbers["checks"][0]["passed"] is False


# --- every check together -------------------------------------------------------------------------------------------

def evidence(**kw: Any) -> Evidence:
    base: dict[str, Any] = {"champion_name": "champion j-1", "eval_loss": (1.0, 1.0), "new": (0.5, 1.0),
                            "canary": (2.0, 2.0)}
    return Evidence(**{**base, **kw})


def test_all_five_checks_run_in_order_and_skipped_or_pending_ones_pass() -> None:
    g = judge(evidence(regressions=3), Limits(min_new_gain=0.05))
    assert [c["name"] for c in g.numbers["checks"]] == list(gate.CHECKS)
    checks = by_name(g.numbers)
    assert checks["preference"]["skipped"] and "no data" in checks["preference"]["detail"]
    assert checks["regressions"]["pending"] and checks["regressions"]["cases"] == 3
    assert checks["regressions"]["detail"] == "regressions: 3 case(s) pending: runs on the exported GGUF"
    assert g.promote and g.numbers["required"] == list(gate.CHECKS) and g.numbers["failed"] == []
    # the reason names what was judged, not the skipped or pending checks
    assert g.reason.startswith("promoted: loss: ") and "canary: perplexity" in g.reason
    assert "regressions" not in g.reason and "preference" not in g.reason


def test_only_the_configured_checks_run() -> None:
    g = judge(evidence(), Limits(checks=("loss", "canary")))
    assert [c["name"] for c in g.numbers["checks"]] == ["loss", "canary"]
    assert g.numbers["required"] == ["loss", "canary"]


def test_a_failed_check_rejects_only_when_required() -> None:
    bad = evidence(canary=(3.0, 2.0))  # ppl e^3 vs e^2: +172%
    rejected = judge(bad, Limits())
    assert not rejected.promote and rejected.numbers["failed"] == ["canary"]
    assert rejected.reason.startswith("rejected: canary: perplexity 20.09 is +171.8% over champion j-1's 7.39")
    kept = judge(bad, Limits(required=("loss", "learned_new")))
    assert kept.promote and by_name(kept.numbers)["canary"] == {**by_name(kept.numbers)["canary"], "passed": False,
                                                                 "required": False}
    assert gate.lines(kept.numbers)[3].startswith("canary       FAILED (not required) perplexity 20.09")


def test_the_reason_names_every_failing_required_check() -> None:
    g = judge(evidence(eval_loss=(2.0, 1.0), canary=(3.0, 2.0), regressions="bad.yaml: entry 2: no expect"),
              Limits())
    assert g.numbers["failed"] == ["loss", "canary", "regressions"]
    assert g.reason.startswith("rejected: loss: eval loss 2.0000 > champion j-1 1.0000; canary: perplexity")
    assert g.reason.endswith("; regressions: cannot run: bad.yaml: entry 2: no expect")


# --- preference ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("cand", "champ", "passed"), [
    (0.70, 0.70, True), (0.65, 0.70, True), (0.649, 0.70, False), (0.90, 0.70, True), (0.5, None, True),
    (None, 0.7, False), (math.nan, 0.7, False),
])
def test_preference_accuracy_may_drop_by_the_tolerance(cand: Any, champ: Any, passed: bool) -> None:
    g = judge(evidence(preference=(cand, champ), pref_examples=20), Limits(preference_tolerance=0.05))
    c = by_name(g.numbers)["preference"]
    assert c["passed"] is passed and g.promote is passed and not c.get("skipped")
    assert c["candidate_accuracy"] is cand and c["examples"] == 20
    if not passed:
        assert g.reason.startswith("rejected: preference: ")


# --- canary ----------------------------------------------------------------------------------------------------------

def test_canary_compares_perplexities_within_the_bound() -> None:
    at_limit = math.log(math.exp(2.0) * 1.1)
    ok = by_name(judge(evidence(canary=(at_limit - 1e-9, 2.0)), Limits()).numbers)["canary"]
    assert ok["passed"] and ok["candidate_ppl"] == pytest.approx(math.exp(2.0) * 1.1)
    assert ok["champion_ppl"] == pytest.approx(math.exp(2.0)) and ok["limit_ppl"] == pytest.approx(math.exp(2) * 1.1)
    assert ok["increase"] == pytest.approx(0.1) and ok["max_increase"] == 0.1
    assert ok["detail"] == "canary: perplexity 7.39 -> 8.13 (+10.0%)"
    over = by_name(judge(evidence(canary=(at_limit + 1e-6, 2.0)), Limits()).numbers)["canary"]
    assert not over["passed"] and "it forgot general text" in over["detail"]
    looser = by_name(judge(evidence(canary=(at_limit + 1e-6, 2.0)), Limits(max_canary_increase=0.2)).numbers)
    assert looser["canary"]["passed"]
    better = by_name(judge(evidence(canary=(1.0, 2.0)), Limits(max_canary_increase=0.0)).numbers)["canary"]
    assert better["passed"] and better["increase"] < 0  # a bound, never a reason: a drop passes like any other


@pytest.mark.parametrize(("canary", "why"), [
    (None, "cannot run: the trainer evaluated no canary set"),
    ((None, 2.0), "the candidate has no usable canary loss"),
    ((2.0, math.nan), "no champion j-1 canary loss to compare"),
])
def test_a_canary_that_cannot_run_fails_when_required(canary: Any, why: str) -> None:
    g = judge(evidence(canary=canary), Limits())
    c = by_name(g.numbers)["canary"]
    assert not c["passed"] and why in c["detail"] and not g.promote
    assert judge(evidence(canary=canary), Limits(required=("loss",))).promote


def test_perplexity_is_exp_of_the_loss() -> None:
    assert gate.perplexity(0.0) == 1.0 and gate.perplexity(None) is None and gate.perplexity(1e6) == math.inf


# --- regressions -----------------------------------------------------------------------------------------------------

def test_regressions_skip_without_a_file_and_fail_on_a_bad_one() -> None:
    skipped = by_name(judge(evidence(regressions=None), Limits()).numbers)["regressions"]
    assert skipped["passed"] and skipped["skipped"]
    bad = judge(evidence(regressions="r.yaml: entry 1: needs an 'id'"), Limits())
    assert not bad.promote and by_name(bad.numbers)["regressions"]["detail"].startswith("regressions: cannot run")


CASES = [Case("two", ({"role": "user", "content": "2+2?"},), contains=("4",)),
         Case("stop", ({"role": "user", "content": "hi"},), must_stop=True)]


def test_after_export_judges_the_answers_and_recomputes_the_decision() -> None:
    before = judge(evidence(regressions=2), Limits())
    assert before.promote
    good = [{"id": "two", "content": "It is 4.", "finish_reason": "stop", "stopped": True},
            {"id": "stop", "content": "Hello.", "finish_reason": "stop", "stopped": True}]
    after = gate.after_export(before.numbers, good, CASES)
    assert after.promote and by_name(after.numbers)["regressions"]["detail"] == (
        "regressions: 2 case(s) met every expectation")
    assert [c["name"] for c in after.numbers["checks"]] == list(gate.CHECKS)
    bad = [{"id": "two", "content": "It is five, " + "really " * 30, "finish_reason": "length", "stopped": False},
           {"id": "stop", "content": "Hello and", "finish_reason": "length", "stopped": False}]
    rejected = gate.after_export(before.numbers, bad, CASES)
    c = by_name(rejected.numbers)["regressions"]
    assert not rejected.promote and rejected.numbers["failed"] == ["regressions"]
    assert c["detail"].startswith("regressions: 2 of 2 case(s) failed: two: does not contain '4'; got 'It is five")
    assert c["failed"][1] == {"id": "stop", "why": "did not stop on its own (finish_reason 'length')",
                              "got": "Hello and"}
    assert len(c["failed"][0]["got"]) <= 80
    assert gate.after_export(before.numbers, bad, CASES, required=["loss"]).promote  # not required: a note only
    assert before.numbers["checks"][4]["pending"]  # the numbers passed in are left as they were


def test_after_export_without_answers_fails_the_check() -> None:
    before = judge(evidence(regressions=2), Limits())
    g = gate.after_export(before.numbers, None, CASES, why_not="the engine is missing")
    assert not g.promote and g.reason == "rejected: regressions: cannot run: the engine is missing"
