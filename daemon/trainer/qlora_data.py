"""The job's examples: SFT conversations (``{"messages": [...]}`` lines) and preference examples (TRL's KTO or DPO
conversational lines), or DataError (exit 3) naming file:line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


# The preference files (``objective`` kto or dpo): TRL's conversational formats, one JSON object a line.
PREF_FIELDS = {"kto": ("prompt", "completion"), "dpo": ("prompt", "chosen", "rejected")}


def read_preferences(path: str, key: str, objective: str, *, both_labels: bool = False) -> list[dict[str, Any]]:
    """The examples of a preference file, each reduced to TRL's fields, or :class:`DataError` naming file:line.

    kto: ``{"prompt": [messages], "completion": [assistant messages], "label": true|false}``;
    dpo: ``{"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}``. Other keys are
    ignored. ``both_labels`` (the kto train split): desirable and undesirable examples must both be there.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"At '{key}': {path} not found")
    examples: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                examples.append(_preference(line, f"{path}:{lineno}", objective))
    if not examples:
        raise DataError(f"At '{key}': {path} holds no examples")
    if both_labels:
        good = sum(1 for ex in examples if ex["label"])
        if good in (0, len(examples)):
            raise DataError(f"At '{key}': {path}: KTO needs both desirable and undesirable examples "
                            f"({good} desirable, {len(examples) - good} undesirable)")
    return examples


def _preference(line: str, where: str, objective: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a JSON object")
    out: dict[str, Any] = {}
    for field in PREF_FIELDS[objective]:
        out[field] = _messages(obj.get(field), f"{where}: '{field}'", assistant=field != "prompt")
    if objective == "kto":
        if not isinstance(obj.get("label"), bool):
            raise DataError(f"{where}: 'label' must be true or false")
        out["label"] = obj["label"]
    return out


def _messages(value: Any, what: str, *, assistant: bool) -> list[dict[str, str]]:
    """A non-empty message list; a completion's messages are the assistant's, with some content."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{what} must be a non-empty list of messages")
    roles = ("assistant",) if assistant else ROLES
    clean = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise DataError(f"{what}: each message needs a role in {roles} and a string content")
        clean.append({"role": m["role"], "content": m["content"]})
    if assistant and not any(m["content"].strip() for m in clean):
        raise DataError(f"{what}: no content")
    if not assistant and clean[-1]["role"] != "user":
        raise DataError(f"{what} must end with a user message")
    return clean
