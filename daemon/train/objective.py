"""Which objective a run trains (pure): SFT on the good answers, KTO on thumbs up and down, DPO on corrections.

``training.objective`` ``auto`` picks what the data supports: DPO when there are at least ``min_pairs`` correction
pairs (a thumbs-down with the answer the user wanted), else KTO when there are at least ``min_desirable`` desirable
and ``min_undesirable`` undesirable examples, else SFT. An objective set explicitly that the data cannot support
falls back to SFT, and the reason says so (never a crash, never a silent skip).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

OBJECTIVES = ("sft", "kto", "dpo", "auto")


@dataclass(frozen=True, slots=True)
class Minimums:
    desirable: int = 4
    undesirable: int = 4
    pairs: int = 4


@dataclass(frozen=True, slots=True)
class Choice:
    objective: str  # sft | kto | dpo
    why: str


def _n(counts: Mapping[str, Mapping[str, int]], split: str, kind: str) -> int:
    return int((counts.get(split) or {}).get(kind) or 0)


def choose(setting: str, counts: Mapping[str, Mapping[str, int]], m: Minimums) -> Choice:
    """``counts``: the dataset manifest's ``counts.preference`` (``{"train": {"desirable", "undesirable", "pairs"},
    "eval": {...}}``; empty for a dataset built before preference data existed)."""
    d, u, p = (_n(counts, "train", k) for k in ("desirable", "undesirable", "pairs"))
    ed, eu, ep = (_n(counts, "eval", k) for k in ("desirable", "undesirable", "pairs"))
    if setting == "sft":
        return Choice("sft", "training.objective is sft")
    dpo_ok = p >= max(1, m.pairs) and ep > 0
    kto_ok = d >= max(1, m.desirable) and u >= max(1, m.undesirable) and ed + eu > 0
    have = f"{d} desirable, {u} undesirable, {p} pairs in training (eval: {ed}/{eu}/{ep})"
    if setting == "dpo":
        return Choice("dpo", f"training.objective is dpo ({p} pairs)") if dpo_ok else Choice(
            "sft", f"training.objective dpo needs >= {max(1, m.pairs)} correction pairs in training and 1 in eval "
                   f"({have}): SFT instead")
    if setting == "kto":
        return Choice("kto", f"training.objective is kto ({d} desirable, {u} undesirable)") if kto_ok else Choice(
            "sft", f"training.objective kto needs >= {max(1, m.desirable)} desirable and >= {max(1, m.undesirable)} "
                   f"undesirable examples in training and some in eval ({have}): SFT instead")
    if dpo_ok:
        return Choice("dpo", f"auto: {p} correction pairs (>= {m.pairs})")
    if kto_ok:
        return Choice("kto", f"auto: thumbs up and down ({d} desirable, {u} undesirable)")
    if u == 0:
        return Choice("sft", "auto: no thumbs-down yet")
    return Choice("sft", f"auto: too few preference examples for KTO or DPO ({have}; minimums "
                         f"{m.desirable}/{m.undesirable}/{m.pairs})")
