"""The training plan of a run (pure): where the LoRA starts, which examples it sees and how often, how many steps.

Every vote must reach the model. A run that can build on the champion (same base model, chat template and LoRA
shape, its adapter still on disk, nothing it learned since deleted, fewer than ``full_retrain_every`` versions in a
row built that way) starts from the champion's adapter and trains on every example that is new since the champion's
dataset, ``new_epochs`` times, plus ``replay_ratio`` older examples per new one, chosen among those the champion's
lineage rehearsed least (so old votes keep coming round). Any other run is a full retrain: from the base, over the
whole training split, ``full_epochs`` times (what is new since the champion's dataset, if there is a champion, still
``new_epochs`` times in all). ``max_steps`` caps either; a capped plan keeps the newest examples
(and, warm, the replay ratio) and says so in one line.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Init = Literal["champion", "base"]


@dataclass(frozen=True, slots=True)
class Shape:
    """What a LoRA must share with the champion's to continue from it."""

    base_model: str
    chat_template: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]

    @classmethod
    def of(cls, model: Mapping[str, Any], lora: Mapping[str, Any]) -> Shape:
        """From a job config's (or a job row's params') ``model`` and ``lora`` sections."""
        targets = lora.get("target_modules") or ()
        return cls(str(model.get("name") or ""), str(model.get("chat_template") or ""), int(lora.get("r") or 0),
                   float(lora.get("lora_alpha") or 0.0),
                   tuple(sorted([targets] if isinstance(targets, str) else targets)))

    def differs(self, other: Shape) -> str | None:
        """The first difference that forbids a warm start, as ``what (old -> new)``; None when none."""
        for name, label in (("base_model", "base model"), ("chat_template", "chat template"), ("r", "LoRA r"),
                            ("lora_alpha", "LoRA alpha"), ("target_modules", "LoRA target modules")):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                return f"{label} changed ({_show(a)} -> {_show(b)})"
        return None


def _show(v: Any) -> str:
    return ",".join(v) if isinstance(v, tuple) else str(v)


@dataclass(frozen=True, slots=True)
class Champion:
    """The model a run may build on."""

    job_id: str
    dataset_version: int
    shape: Shape
    adapter_present: bool
    warm_depth: int = 0  # how many warm starts in a row led to it (0: it was trained from the base)
    forgotten: int = 0  # chats in its lineage that are deleted, or whose vote was retracted, since


@dataclass(frozen=True, slots=True)
class PlanSettings:
    new_epochs: int = 4
    replay_ratio: float = 3.0
    full_epochs: int = 1
    full_retrain_every: int = 10
    max_steps: int = 1000
    batch: int = 8  # examples per optimizer step (per-device batch x gradient accumulation)
    learning_rate: float = 2e-4
    warm_lr_scale: float = 1.0


@dataclass(frozen=True)
class Plan:
    init: Init
    why: str
    parent_job: str | None
    champion_dataset: int | None
    new: tuple[int, ...]  # indices into the training split, newest first
    replay: tuple[int, ...]
    sequence: tuple[int, ...]  # what the job trains on, in file order (repeats included)
    steps: int
    learning_rate: float
    lr_note: str | None = None
    capped: str | None = None
    totals: dict[str, int] = field(default_factory=dict)

    @property
    def trained(self) -> set[int]:
        return set(self.sequence)

    def summary(self) -> dict[str, Any]:
        """What status, trigger and the cycle summary show."""
        return {
            "init": self.init, "why": self.why, "parent_job": self.parent_job,
            "champion_dataset": self.champion_dataset, "new": len(self.new), "replay": len(self.replay),
            "examples": len(self.sequence), "steps": self.steps, "learning_rate": self.learning_rate,
            "lr_note": self.lr_note, "capped": self.capped, **self.totals,
        }

    def line(self) -> str:
        """One line: ``warm start from j-...: 40 new x 2 + 120 replayed = 200 examples, 25 steps``."""
        if self.init == "champion":
            out = (f"warm start from {self.parent_job}: {len(self.new)} new x {self.totals.get('new_epochs', 1)}"
                   f" + {len(self.replay)} replayed = {len(self.sequence)} examples, {self.steps} steps")
        else:
            epochs, distinct = self.totals.get("full_epochs", 1), len(set(self.sequence))
            extra = self.totals.get("new_extra_passes", 0) if self.new else 0
            out = f"full retrain from the base ({self.why}): {distinct} examples" + (
                f" x {epochs}" if epochs != 1 else "") + (
                f" + {len(self.new)} new x {extra} more" if extra else "") + (
                f" = {len(self.sequence)}" if epochs != 1 or extra else "") + f", {self.steps} steps"
        if self.lr_note:
            out += f"; {self.lr_note}"
        if self.capped:
            out += f"; {self.capped}"
        return out


def _why_full(champion: Champion | None, shape: Shape, n_new: int, s: PlanSettings) -> str | None:
    """Why this run cannot build on the champion; None when it can."""
    if champion is None:
        return "no champion yet"
    if not champion.adapter_present:
        return f"the champion's adapter ({champion.job_id}) is no longer on disk"
    changed = champion.shape.differs(shape)
    if changed:
        return changed
    if champion.forgotten:
        return f"{champion.forgotten} chat(s) the current model learned were deleted or their votes retracted"
    if champion.warm_depth + 1 >= s.full_retrain_every:
        return f"every {s.full_retrain_every} versions one is a full retrain (training.full_retrain_every)"
    if n_new == 0:
        return f"nothing new since the champion's dataset v{champion.dataset_version}"
    return None


def _newest_first(indices: Sequence[int], since: Sequence[int]) -> list[int]:
    return sorted(indices, key=lambda i: (-since[i], i))


def make(
    train: Sequence[tuple[str, int]],
    champion: Champion | None,
    shape: Shape,
    s: PlanSettings,
    *,
    rehearsed: Mapping[str, int] | None = None,
    seed: int = 0,
) -> Plan:
    """The plan for a training split given as ``(conversation id, first dataset version)`` per line, in file order.

    ``rehearsed``: how many times the champion's lineage trained each conversation (replay prefers the least).
    """
    since = [v for _, v in train]
    cap = s.max_steps * s.batch
    floor = champion.dataset_version if champion is not None else 0
    new = [i for i, v in enumerate(since) if v > floor]
    why = _why_full(champion, shape, len(new), s)
    rng = random.Random(seed)
    if why is None and champion is not None:
        new = _newest_first(new, since)
        is_new = set(new)
        old = [i for i in range(len(train)) if i not in is_new]
        per_new = s.new_epochs + s.replay_ratio
        capped = None
        want_new, want_replay = len(new), min(len(old), math.ceil(s.replay_ratio * len(new)))
        if want_new * s.new_epochs + want_replay > cap:
            keep = max(1, min(len(new), int(cap // per_new)))
            capped = (f"capped by training.max_steps={s.max_steps}: {len(new)} new examples need "
                      f"{math.ceil((want_new * s.new_epochs + want_replay) / s.batch)} steps; training the newest "
                      f"{keep}")
            new = new[:keep]
            want_replay = max(0, min(len(old), math.ceil(s.replay_ratio * keep), cap - keep * s.new_epochs))
        counts = rehearsed or {}
        rng.shuffle(old)
        replay = sorted(old, key=lambda i: counts.get(train[i][0], 0))[:want_replay]  # stable: ties stay shuffled
        sequence = tuple(sorted([*new * s.new_epochs, *replay]))
        lr = s.learning_rate * s.warm_lr_scale
        note = (f"learning rate {s.learning_rate:g} x {s.warm_lr_scale:g} = {lr:g} (warm start)"
                if s.warm_lr_scale != 1 else None)
        return Plan("champion", "builds on the champion", champion.job_id, champion.dataset_version, tuple(new),
                    tuple(sorted(replay)), sequence, math.ceil(len(sequence) / s.batch), lr, note, capped,
                    {"new_epochs": s.new_epochs, "split": len(train)})
    everything = _newest_first(range(len(train)), since)  # the new examples (with a champion) come first
    # With a champion, what is new since its dataset is still seen new_epochs times in all: extra passes over it.
    extra = max(0, s.new_epochs - s.full_epochs) if champion is not None else 0
    n_new = len(new)
    need = len(everything) * s.full_epochs + n_new * extra
    capped = None
    if need > cap:
        per_new = s.full_epochs + extra
        keep = cap // per_new if n_new * per_new >= cap else n_new + (cap - n_new * per_new) // s.full_epochs
        keep = max(1, keep)
        capped = (f"capped by training.max_steps={s.max_steps}: {len(everything)} examples x {s.full_epochs}"
                  + (f" (+{extra} more pass(es) over {n_new} new)" if extra and n_new else "")
                  + f" need {math.ceil(need / s.batch)} steps; training the newest {keep}")
        everything = everything[:keep]
    kept = set(everything)
    kept_new = [i for i in _newest_first(new, since) if i in kept]
    sequence = tuple(sorted(everything * s.full_epochs + kept_new * extra))
    return Plan("base", why or "", None, champion.dataset_version if champion else None,
                tuple(kept_new), (), sequence,
                math.ceil(len(sequence) / s.batch),
                s.learning_rate, None, capped, {"full_epochs": s.full_epochs, "new_extra_passes": extra,
                                                "split": len(train)})
