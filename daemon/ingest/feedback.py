"""The sidecar feedback log: ``<root>/feedback/feedback_YYYY-MM-DD.jsonl``, one event per line.

Stock ChatOS never writes feedback to disk, so this is where thumbs and ratings go, from our CLI or from the
small patch to ChatOS's endpoints in docs/chatos-integration.md. One event is appended with a single
``O_APPEND`` write, so concurrent writers never interleave within a line.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.ingest.records import QUALITY_SCORE, Rejection, parse_feedback


def make_event(
    conversation_id: str,
    *,
    thumbs_up: bool | None = None,
    quality: str | None = None,
    note: str | None = None,
    better: str | None = None,
    now: datetime | None = None,
    max_line_bytes: int | None = None,
) -> dict[str, Any]:
    """Build one event (pure). Raises ValueError with a one-line reason when it would be rejected on ingest, or
    when its correction (``better``, the answer that should have been given) would be: one needs a thumbs-down and
    some text, and the event's line must fit ``max_line_bytes`` (store.max_line_bytes: ingest rejects longer
    lines)."""
    if better is not None:
        if thumbs_up is not False:
            raise ValueError("a correction (--better) goes with a thumbs-down (--down) only")
        if not better.strip():
            raise ValueError("the correction (--better) is empty")
    event: dict[str, Any] = {"conversation_id": conversation_id}
    if thumbs_up is not None:
        event["thumbs_up"] = thumbs_up
    if quality is not None:
        event["quality"] = quality
    if note is not None:
        event["feedback"] = note
    if better is not None:
        event["better"] = better
    event["timestamp"] = (now or datetime.now()).isoformat(timespec="microseconds")
    line = json.dumps(event).encode()
    checked = parse_feedback(line)
    if isinstance(checked, Rejection):
        raise ValueError(checked.reason)
    if max_line_bytes is not None and len(line) + 1 > max_line_bytes:
        raise ValueError(f"the event would be a {len(line) + 1}-byte line, over store.max_line_bytes "
                         f"({max_line_bytes}), which ingest rejects")
    return event


def feedback_path(root: Path, day: datetime) -> Path:
    return root / "feedback" / f"feedback_{day:%Y-%m-%d}.jsonl"


def append_event(root: Path, event: dict[str, Any], *, now: datetime | None = None) -> Path:
    """Append ``event`` to today's sidecar file with one ``O_APPEND`` write; returns the file's path."""
    path = feedback_path(root, now or datetime.now())
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(event) + "\n").encode("ascii")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        written = os.write(fd, line)
        if written != len(line):  # pragma: no cover - regular files do not short-write short lines
            raise OSError(f"short write to {path} ({written} of {len(line)} bytes)")
    finally:
        os.close(fd)
    return path


QUALITIES = tuple(QUALITY_SCORE)
