"""``metrics.jsonl``: the append-only log the runner tails, and the callback that writes its step lines.

Line shapes (every line also carries ``job_id`` and ``timestamp``): ``{"event": "job_started", ...}``, step lines
``{"step", "max_steps", "train_loss", "eval_loss"?, "epoch", "learning_rate", "tokens_per_s"}``,
``{"event": "evaluated", "phase", "eval_loss"}`` (phases: see ``train_qlora``) and last
``{"event": "job_finished", ...}``. With ``extra`` (the kto and dpo objectives) a step line also carries every other
number the trainer logged, flat, under TRL's own names (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``kl``, ``logps/chosen``, ``logits/chosen``, ``entropy``, ``grad_norm``...; an in-training evaluation's with TRL's
``eval_`` prefix: ``eval_rewards/chosen``...).
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def num(v: Any) -> float | None:
    """A JSON-safe float: NaN/inf (a diverged loss) become null rather than invalid JSON."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class MetricsLog:
    """Append-only JSON lines; each record is one ``write(2)`` of a complete line, so a tailer never sees half."""

    def __init__(self, path: str, job_id: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.job_id = job_id

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"job_id": self.job_id, **record, "timestamp": utcnow()}, allow_nan=False) + "\n"
        os.write(self.fd, line.encode())

    def event(self, name: str, **fields: Any) -> None:
        self.write({"event": name, **fields})

    def close(self) -> None:
        os.close(self.fd)


class StepRecorder:
    """One step line per train log; an in-training eval at the same step is merged into that line.

    The hooks have TrainerCallback's signatures; :func:`make_callback` mixes this class into one (the base class
    lives in transformers, imported only there). ``progress`` (last step and train loss) is kept current so that a
    failed or cancelled run still reports them.
    """

    def __init__(self, log: MetricsLog, progress: dict[str, Any], extra: bool = False) -> None:
        self.log = log
        self.extra = extra
        self.progress = progress
        self.training = False
        self.pending: dict[str, Any] | None = None
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.tokens = 0.0
        self.counter = TokenCounter()  # the batches' own count, when the trainer logs no ``num_tokens``
        self.started: float | None = None  # monotonic time training began
        self.first: tuple[float, float] | None = None  # (tokens, time) at the first step's log
        self.last: tuple[float, float] | None = None  # (tokens, time) at the latest step's log
        self._mark = (0.0, time.monotonic())

    def timings(self) -> dict[str, float | None]:
        """``first_step`` (seconds from the start of training to the first step's log) and ``steady_tokens_per_s``
        (the rate after the first step: compile, warm-up and the first allocations left out)."""
        first_step = (self.first[1] - self.started) if self.first and self.started is not None else None
        steady = None
        if self.first and self.last and self.last[1] > self.first[1]:
            steady = (self.last[0] - self.first[0]) / (self.last[1] - self.first[1])
        return {"first_step": num(first_step), "steady_tokens_per_s": num(steady)}

    def flush(self) -> None:
        if self.pending is not None:
            self.log.write(self.pending)
            self.pending = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.training = True
        self.counter.active = True
        self.started = time.monotonic()
        self.max_steps = int(getattr(state, "max_steps", 0) or 0) or None
        self._mark = (0.0, self.started)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.flush()  # the previous step's line: no eval can join it any more

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
        if not self.training or not logs:
            return
        step = int(state.global_step)
        if "loss" in logs:
            self._train_line(step, logs)
        elif "eval_loss" in logs:
            self._eval_line(step, logs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.flush()
        self.training = False
        self.counter.active = False

    def _train_line(self, step: int, logs: dict[str, Any]) -> None:
        """A train log starts the step's line, held until the step ends (an eval at this step may join it)."""
        self.flush()
        now = time.monotonic()
        tokens = num(logs.get("num_tokens"))
        if tokens is None and self.counter.tokens:
            tokens = float(self.counter.tokens)  # e.g. Unsloth's trainer: counted from the batches
        tps = None
        if tokens is not None:
            seen, then = self._mark
            tps = num((tokens - seen) / (now - then)) if now > then else None
            self._mark = (tokens, now)
            self.tokens = tokens
            if self.first is None:
                self.first = (tokens, now)
            self.last = (tokens, now)
        loss = num(logs["loss"])
        if self.first_loss is None:
            self.first_loss = loss
        self.last_loss = loss
        self.progress.update(step=step, loss=loss)
        self.pending = {
            "step": step,
            "max_steps": getattr(self, "max_steps", None),
            "train_loss": loss,
            "epoch": num(logs.get("epoch")),
            "learning_rate": num(logs.get("learning_rate")),
            "tokens_per_s": round(tps, 1) if tps is not None else None,
        }
        if self.extra:
            self.pending.update(_others(logs, MAPPED))

    def _eval_line(self, step: int, logs: dict[str, Any]) -> None:
        """An eval joins the pending line of its step, else gets a line of its own with the last train loss."""
        eval_loss = num(logs["eval_loss"])
        others = _others(logs, EVAL_MAPPED) if self.extra else {}
        if self.pending is not None and self.pending["step"] == step:
            self.pending.update(eval_loss=eval_loss, **others)
            self.flush()
            return
        self.flush()
        self.log.write(
            {
                "step": step,
                "train_loss": self.last_loss,
                "eval_loss": eval_loss,
                "epoch": num(logs.get("epoch")),
                "learning_rate": None,
                "tokens_per_s": None,
                **others,
            }
        )


class TokenCounter:
    """Wraps the trainer's data collator and counts the tokens of the batches it makes while training runs: the
    attention mask's ones, or with padding-free batches the flattened row's length."""

    def __init__(self) -> None:
        self.tokens = 0
        self.active = False

    def wrap(self, collator: Any) -> Any:
        def collate(examples: Any) -> Any:
            batch = collator(examples)
            if self.active:
                self.tokens += count_tokens(batch)
            return batch

        return collate


def count_tokens(batch: Any) -> int:
    """The real (not padding) tokens of a collated batch."""
    mask = batch.get("attention_mask") if hasattr(batch, "get") else None
    if mask is not None:
        return int(mask.sum())
    ids = batch.get("position_ids") if hasattr(batch, "get") else None
    if ids is None:
        ids = batch["input_ids"]
    return int(ids.numel())


# What a step line holds under its own names, or leaves out (timings), of a train log and of an eval log.
MAPPED = frozenset({"loss", "epoch", "learning_rate", "num_tokens", "total_flos", "train_runtime",
                    "train_samples_per_second", "train_steps_per_second", "train_loss"})
EVAL_MAPPED = frozenset({"eval_loss", "epoch", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
                         "eval_num_tokens"})


def _others(logs: dict[str, Any], mapped: frozenset[str]) -> dict[str, float | None]:
    """The logged numbers a step line does not map itself, under their own names."""
    return {k: num(v) for k, v in logs.items()
            if k not in mapped and isinstance(v, int | float) and not isinstance(v, bool)}


def make_callback(log: MetricsLog, progress: dict[str, Any], extra: bool = False) -> Any:
    """A TrainerCallback writing ChatOS step lines (import it after ``unsloth``: this imports transformers)."""
    from transformers import TrainerCallback

    class MetricsCallback(StepRecorder, TrainerCallback):
        """:class:`StepRecorder`'s hooks first in the MRO: TrainerCallback's own are no-ops."""

    return MetricsCallback(log, progress, extra)
