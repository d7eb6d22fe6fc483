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
