"""The job's examples: a ``{"messages": [{"role", "content"}, ...]}`` JSONL file -> conversations, or DataError (3)."""

from __future__ import annotations

import json
from pathlib import Path

from trainer_common import Failure

EXIT_DATA = 3
ROLES = ("system", "user", "assistant")


class DataError(Failure):
    """A dataset file is missing, empty or malformed: exit 3."""

    exit_code = EXIT_DATA


def read_examples(path: str, key: str) -> list[list[dict[str, str]]]:
    """Conversations of a ``{"messages": [{"role", "content"}, ...]}`` JSONL file; :class:`DataError` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"At '{key}': {path} not found")
    examples: list[list[dict[str, str]]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                examples.append(_conversation(line, f"{path}:{lineno}"))
    if not examples:
        raise DataError(f"At '{key}': {path} holds no examples")
    return examples


def _conversation(line: str, where: str) -> list[dict[str, str]]:
    """One line's messages, only role and content kept; it must hold an assistant message with content."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg})") from None
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: no 'messages' list")
    clean = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role in {ROLES} and a string content")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
        raise DataError(f"{where}: no assistant message with content")
    return clean
