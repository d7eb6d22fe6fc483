"""Generate a realistic ChatOS store (for the demo, the tests and the benchmarks).

Writes what ChatOS writes, the way it writes it: ``logs/conversations_<day>.jsonl`` full records,
``training_data/training_<day>.jsonl`` copies for excellent/good/unrated records, a few older ``*.json`` exports,
non-data files that must be ignored, plus sidecar feedback events for a fraction of conversations.
Deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

_WORDS = (  # noqa: SIM905 - one readable string, split once
    "the a list function return value python code error file data model train test loop index string number "
    "print import class object method call reverse sort key dict set tuple async await thread process memory "
    "disk network request response server client json parse write read line byte path folder system user "
    "question answer because when then else while for with from into over under about between example "
    "simple fast slow better best good careful check run build install package version update config option"
).split()
_MODELS = ("qwen2.5:7b", "llama3.1:8b", "mistral:7b", "qwen2.5-coder:7b")
_QUALITIES = ("unrated",) * 6 + ("good", "excellent", "acceptable", "poor", "failed")


def _text(rng: random.Random, lo: int, hi: int) -> str:
    words = rng.choices(_WORDS, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + "."


def _iso(dt: datetime) -> str:
    return dt.isoformat(timespec="microseconds")


def full_record(
    rng: random.Random, cid: str, when: datetime, *, quality: str = "unrated", thumbs_up: bool | None = None,
    mode: str | None = None, assistant_words: tuple[int, int] = (80, 220),
) -> dict[str, Any]:
    """One ``logs/`` record with ChatOS's keys in ChatOS's order."""
    model = rng.choice(_MODELS)
    mode = mode or ("code" if rng.random() < 0.3 else "normal")
    user = _text(rng, 8, 60)
    answer = _text(rng, *assistant_words)
    latency = round(rng.uniform(300, 9000), 1)
    end = when + timedelta(milliseconds=latency)
    return {
        "session_id": f"{rng.getrandbits(64):016x}",
        "conversation_id": cid,
        "started_at": _iso(when),
        "ended_at": _iso(end),
        "messages": [
            {"role": "user", "content": user, "timestamp": _iso(when), "model": None, "tokens": None,
             "latency_ms": None},
            {"role": "assistant", "content": answer, "timestamp": _iso(end), "model": model, "tokens": None,
             "latency_ms": latency},
        ],
        "mode": mode,
        "rag_enabled": rng.random() < 0.2,
        "rag_context": None,
        "project_id": None,
        "project_name": None,
        "models_used": [model],
        "chosen_model": model,
        "council_votes": {model: len(answer)},
        "quality": quality,
        "user_feedback": None,
        "thumbs_up": thumbs_up,
        "total_tokens": 0,
        "total_latency_ms": latency,
        "error": None,
    }


def training_record(rec: dict[str, Any]) -> dict[str, Any]:
    """The ``training_data/`` copy ChatOS writes for excellent/good/unrated records."""
    return {
        "messages": [{"role": m["role"], "content": m["content"]} for m in rec["messages"] if m["role"] != "system"],
        "metadata": {
            "source": "chatos_interaction",
            "conversation_id": rec["conversation_id"],
            "mode": rec["mode"],
            "quality": rec["quality"],
            "model": rec["chosen_model"],
            "timestamp": rec["ended_at"],
        },
    }


def line(obj: dict[str, Any]) -> str:
    """Exactly what ChatOS writes: ``json.dumps(record) + "\\n"`` (ASCII escapes, ", " separators)."""
    return json.dumps(obj) + "\n"


@dataclass
class GroundTruth:
    conversations: dict[str, int] = field(default_factory=dict)  # cid -> effective score
    rated: set[str] = field(default_factory=set)
    feedback_events: int = 0
    files: list[Path] = field(default_factory=list)

    def eligible(self, min_score: int = 1, include_unrated: bool = False) -> set[str]:
        return {c for c, s in self.conversations.items() if s >= min_score and (c in self.rated or include_unrated)}


def generate_store(
    root: Path,
    n_records: int,
    *,
    days: int = 30,
    seed: int = 0,
    feedback_fraction: float = 0.3,
    start: datetime | None = None,
    assistant_words: tuple[int, int] = (80, 220),
    extras: bool = True,
) -> GroundTruth:
    """Write a store of ``n_records`` chat requests over ``days`` day files; returns what a reader should find."""
    rng = random.Random(seed)
    start = start or datetime(2026, 10, 1, 9, 0, 0)
    truth = GroundTruth()
    for sub in ("logs", "training_data", "feedback"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    per_day = max(1, n_records // days)
    fb_lines: dict[str, list[str]] = {}
    day_logs: dict[str, list[str]] = {}
    day_train: dict[str, list[str]] = {}
    for i in range(n_records):
        day = min(i // per_day, days - 1)
        when = start + timedelta(days=day, seconds=(i % per_day) * 30 + rng.randint(0, 29))
        cid = f"{rng.getrandbits(48):012x}"
        quality = rng.choice(_QUALITIES)
        rec = full_record(rng, cid, when, quality=quality, assistant_words=assistant_words)
        dstr = f"{when:%Y-%m-%d}"
        day_logs.setdefault(dstr, []).append(line(rec))
        if quality in ("excellent", "good", "unrated"):
            day_train.setdefault(dstr, []).append(line(training_record(rec)))
        score = {"excellent": 1, "good": 1, "poor": -1, "failed": -1}.get(quality, 0)
        if quality != "unrated":
            truth.rated.add(cid)
        if rng.random() < feedback_fraction:
            thumbs = rng.random() < 0.7
            ev = {"conversation_id": cid, "thumbs_up": thumbs, "feedback": None,
                  "timestamp": _iso(when + timedelta(minutes=2))}
            fb_lines.setdefault(dstr, []).append(json.dumps(ev) + "\n")
            truth.feedback_events += 1
            truth.rated.add(cid)
            score = 1 if thumbs else -1
        truth.conversations[cid] = score
    for folder, name, by_day in (
        ("logs", "conversations", day_logs), ("training_data", "training", day_train),
        ("feedback", "feedback", fb_lines),
    ):
        for d, lines in by_day.items():
            p = root / folder / f"{name}_{d}.jsonl"
            with p.open("a", encoding="ascii") as f:
                f.writelines(lines)
            truth.files.append(p)
    if extras:
        (root / "training_data" / "export_20261001.json").write_text(json.dumps([{"messages": []}]))
        (root / "training_data" / "run_20261001.json").write_text(json.dumps([{"step": 1}]))
        (root / "training_data" / "train_lora.py").write_text("print('not data')\n")
        (root / "training_data" / "analytics").mkdir(exist_ok=True)
        (root / "training_data" / "analytics" / "summary.jsonl").write_text('{"not": "data"}\n')
    return truth


def append_records(root: Path, n: int, *, seed: int = 1, when: datetime | None = None,
                   quality: str = "good") -> list[str]:
    """Append ``n`` new records (ChatOS style) to today's logs file; returns their ids."""
    rng = random.Random(seed)
    when = when or datetime(2026, 11, 25, 12, 0, 0)
    p = root / "logs" / f"conversations_{when:%Y-%m-%d}.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    ids = []
    with p.open("a", encoding="ascii") as f:
        for i in range(n):
            cid = f"{rng.getrandbits(48):012x}"
            ids.append(cid)
            f.write(line(full_record(rng, cid, when + timedelta(seconds=i), quality=quality)))
    return ids
