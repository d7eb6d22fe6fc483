"""The eval gate: promote when the candidate's eval loss is within tolerance of the champion's, never without a
usable candidate loss."""

from __future__ import annotations

import math

import pytest

from daemon.train.gate import decide


def test_promotes_within_tolerance_and_rejects_beyond() -> None:
    ok = decide(1.04, 1.0, 0.05, champion_name="champion")
    assert ok.promote and ok.reason == "promoted: eval loss 1.0400 <= champion 1.0000 (tolerance 5.0%)"
    assert ok.numbers["limit"] == pytest.approx(1.05)
    worse = decide(1.06, 1.0, 0.05, champion_name="champion")
    assert not worse.promote and worse.reason == "rejected: eval loss 1.0600 > champion 1.0000 x (1 + 0.05)"
    assert decide(1.0, 1.0, 0.0, champion_name="base").reason == "promoted: eval loss 1.0000 <= base 1.0000"


@pytest.mark.parametrize("candidate", [None, math.nan, math.inf, True])
def test_an_unusable_candidate_never_promotes(candidate: float | None) -> None:
    verdict = decide(candidate, 1.0, 0.5, champion_name="champion")
    assert not verdict.promote and verdict.reason.startswith("rejected: the candidate has no usable eval loss")


@pytest.mark.parametrize("champion", [None, math.nan, False])
def test_without_a_champion_loss_a_finite_candidate_promotes(champion: float | None) -> None:
    verdict = decide(0.9, champion, 0.0, champion_name="base")
    assert verdict.promote and verdict.reason == "promoted: eval loss 0.9000 (no base loss to compare)"
    assert "limit" not in verdict.numbers


def test_learned_new_is_a_named_check_beside_held_out() -> None:
    g = decide(1.79, 1.80, 0.0, champion_name="champion j-1", new=(1.12, 2.31), min_new_gain=0.05)
    assert g.promote
    assert [(c["name"], c["passed"]) for c in g.numbers["checks"]] == [("held_out", True), ("learned_new", True)]
    assert g.numbers["candidate_new_loss"] == 1.12 and g.numbers["champion_new_loss"] == 2.31


@pytest.mark.parametrize(("cand", "champ", "promote"), [(0.95, 1.0, True), (0.951, 1.0, False), (1.2, 1.0, False),
                                                        (float("nan"), 1.0, False), (0.5, None, True)])
def test_learned_new_needs_min_new_gain_below_the_champion(cand: float, champ: float | None, promote: bool) -> None:
    g = decide(1.0, 1.0, 0.0, champion_name="champion j-1", new=(cand, champ), min_new_gain=0.05)
    assert g.promote is promote
    if not promote:
        assert "learned_new" in g.reason and g.numbers["checks"][1]["passed"] is False


def test_learned_new_is_skipped_without_new_examples_and_held_out_still_rules() -> None:
    g = decide(1.0, 1.0, 0.0, champion_name="c", new=None, min_new_gain=0.05)
    assert g.promote and g.numbers["checks"][1] == {"name": "learned_new", "passed": True,
                                                    "detail": "skipped: no new examples"}
    worse = decide(1.5, 1.0, 0.0, champion_name="c", new=(0.1, 1.0), min_new_gain=0.05)
    assert not worse.promote and worse.numbers["checks"][0]["passed"] is False
