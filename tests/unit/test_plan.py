"""The training plan (issue 19): warm start or full retrain and why, every new example seen new_epochs times, the
replay ratio, least-rehearsed replay, the max_steps cap keeping the newest, steps from the plan."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from daemon.train import plan

SHAPE = plan.Shape("/models/base", "qwen-2.5", 16, 16.0, ("k_proj", "q_proj"))
S = plan.PlanSettings(new_epochs=2, replay_ratio=3.0, full_epochs=1, full_retrain_every=10, max_steps=1000, batch=8,
                      learning_rate=0.01, warm_lr_scale=0.5)


def split(old: int, new: int, champion_version: int = 1) -> list[tuple[str, int]]:
    """``old`` examples from v1 and ``new`` that first appeared after the champion's dataset, interleaved."""
    rows = [(f"old{i}", 1) for i in range(old)] + [(f"new{i}", champion_version + 1) for i in range(new)]
    return sorted(rows)  # file order is not the arrival order


def champ(**kw: object) -> plan.Champion:
    return plan.Champion(**{"job_id": "j-1", "dataset_version": 1, "shape": SHAPE, "adapter_present": True, **kw})  # type: ignore[arg-type]


def test_a_warm_plan_trains_every_new_example_twice_plus_replay() -> None:
    train = split(2000, 40)
    p = plan.make(train, champ(), SHAPE, S)
    assert p.init == "champion" and p.parent_job == "j-1"
    counts = Counter(p.sequence)
    new_idx = {i for i, (cid, _) in enumerate(train) if cid.startswith("new")}
    assert set(p.new) == new_idx and all(counts[i] == 2 for i in new_idx)
    assert len(p.replay) == 120 and all(counts[i] == 1 and i not in new_idx for i in p.replay)
    assert len(p.sequence) == 200 and p.steps == 25
    assert p.learning_rate == pytest.approx(0.005) and "warm start" in (p.lr_note or "")
    assert "40 new x 2 + 120 replayed = 200 examples, 25 steps" in p.line()


def test_replay_prefers_what_the_lineage_rehearsed_least() -> None:
    train = split(300, 10)
    rehearsed = {f"old{i}": 1 for i in range(270)}  # only old270..old299 were never replayed
    p = plan.make(train, champ(), SHAPE, replace(S, replay_ratio=3.0), rehearsed=rehearsed)
    assert {train[i][0] for i in p.replay} == {f"old{i}" for i in range(270, 300)}


def test_replay_is_bounded_by_the_old_examples() -> None:
    p = plan.make(split(5, 40), champ(), SHAPE, S)
    assert len(p.replay) == 5


@pytest.mark.parametrize(
    ("champion", "shape", "settings", "why"),
    [
        (None, SHAPE, S, "no champion yet"),
        (champ(adapter_present=False), SHAPE, S, "no longer on disk"),
        (champ(), replace(SHAPE, base_model="/models/other"), S, "base model changed (/models/base -> /models/other)"),
        (champ(), replace(SHAPE, chat_template="llama-3.1"), S, "chat template changed"),
        (champ(), replace(SHAPE, r=8), S, "LoRA r changed (16 -> 8)"),
        (champ(), replace(SHAPE, target_modules=("q_proj",)), S, "LoRA target modules changed"),
        (champ(forgotten=2), SHAPE, S, "2 chat(s) the current model learned were deleted"),
        (champ(warm_depth=9), SHAPE, S, "every 10 versions one is a full retrain"),
    ],
)
def test_full_retrain_and_why(champion: plan.Champion | None, shape: plan.Shape, settings: plan.PlanSettings,
                              why: str) -> None:
    train = split(100, 10)
    p = plan.make(train, champion, shape, settings)
    assert p.init == "base" and why in p.why and p.parent_job is None
    counts = Counter(p.sequence)
    assert set(counts) == set(range(len(train)))  # the whole split (full_epochs 1) ...
    new = {i for i, (cid, _) in enumerate(train) if cid.startswith("new")}
    extra = 1 if champion is not None else 0  # ... and what is new since a champion still new_epochs (2) times
    assert all(counts[i] == (1 + extra if i in new else 1) for i in counts)
    assert p.learning_rate == settings.learning_rate and p.steps == -(-(110 + 10 * extra) // 8)
    assert "full retrain from the base" in p.line()


def test_the_ninth_warm_start_in_a_row_is_still_warm() -> None:
    assert plan.make(split(100, 10), champ(warm_depth=8), SHAPE, S).init == "champion"


def test_nothing_new_is_a_full_retrain() -> None:
    p = plan.make(split(100, 0), champ(), SHAPE, S)
    assert p.init == "base" and "nothing new since the champion's dataset v1" in p.why


def test_full_epochs_repeat_the_split() -> None:
    p = plan.make(split(16, 0), None, SHAPE, replace(S, full_epochs=3))
    assert Counter(Counter(p.sequence).values()) == {3: 16} and p.steps == 6


def test_the_cap_keeps_the_newest_and_the_replay_ratio_and_says_so() -> None:
    train = [(f"c{i}", 2 + i // 100) for i in range(400)] + [(f"old{i}", 1) for i in range(1000)]
    p = plan.make(train, champ(), SHAPE, replace(S, max_steps=10))  # 80 examples: 16 new x 2 + 48 replayed
    assert p.steps <= 10 and len(p.sequence) <= 80
    assert len(p.new) == 16 and {train[i][1] for i in p.new} == {5}  # the newest version's examples
    assert len(p.replay) == 48
    assert p.capped and "training.max_steps=10" in p.capped and "newest 16" in p.capped
    full = plan.make(train, None, SHAPE, replace(S, max_steps=10))
    assert len(full.sequence) == 80 and min(train[i][1] for i in full.sequence) == 5 and full.capped


def test_shape_of_a_job_config() -> None:
    s = plan.Shape.of({"name": "/m", "chat_template": "qwen-2.5"},
                      {"r": 16, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"]})
    assert s == plan.Shape("/m", "qwen-2.5", 16, 16.0, ("q_proj", "v_proj"))
    assert s.differs(s) is None
