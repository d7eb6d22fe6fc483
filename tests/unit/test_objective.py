"""Which objective a run trains (issue 12): auto picks what the data supports; an explicit one the data cannot
support trains SFT and says why."""

from __future__ import annotations

import pytest

from daemon.train.objective import Minimums, choose

M = Minimums(desirable=4, undesirable=4, pairs=4)


def counts(d: int, u: int, p: int, ed: int = 1, eu: int = 1, ep: int = 1) -> dict[str, dict[str, int]]:
    return {"train": {"desirable": d, "undesirable": u, "pairs": p},
            "eval": {"desirable": ed, "undesirable": eu, "pairs": ep}}


@pytest.mark.parametrize(("setting", "c", "objective", "why"), [
    ("auto", counts(10, 0, 0), "sft", "auto: no thumbs-down yet"),
    ("auto", counts(10, 5, 0), "kto", "auto: thumbs up and down (10 desirable, 5 undesirable)"),
    ("auto", counts(10, 5, 4), "dpo", "auto: 4 correction pairs"),
    ("auto", counts(10, 5, 3), "kto", "auto: thumbs up and down"),
    ("auto", counts(10, 2, 0), "sft", "too few preference examples"),
    ("auto", counts(10, 5, 0, ed=0, eu=0), "sft", "too few preference examples"),
    ("auto", {}, "sft", "auto: no thumbs-down yet"),
    ("sft", counts(10, 5, 9), "sft", "training.objective is sft"),
    ("kto", counts(10, 5, 0), "kto", "training.objective is kto"),
    ("kto", counts(10, 0, 0), "sft", "training.objective kto needs >= 4 desirable and >= 4 undesirable"),
    ("dpo", counts(10, 5, 6), "dpo", "training.objective is dpo (6 pairs)"),
    ("dpo", counts(10, 5, 6, ep=0), "sft", "training.objective dpo needs >= 4 correction pairs"),
])
def test_choose(setting: str, c: dict[str, dict[str, int]], objective: str, why: str) -> None:
    got = choose(setting, c, M)
    assert got.objective == objective and why in got.why, got
