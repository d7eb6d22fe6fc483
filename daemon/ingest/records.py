"""Parse one ChatOS record (all three shapes) or one sidecar feedback event into a typed value, or say why not.

Pure: bytes in, a record or a :class:`Rejection` out. Never raises on any input.
Shapes (see "How it works" in README.md and docs/chatos-integration.md): full ``logs/`` records,
``training_data/*.jsonl`` training records, ``training_data/*.json`` single objects with a top-level
``feedback_score``; plus ``feedback/*.jsonl`` events. This module holds the shapes, their values and the careful
parsers, which say exactly why a line is rejected; ``ingest.fast_paths`` parses the common valid lines in one pass
to the same values, and ``ingest.blocks`` turns a block of lines into what ingest stores (the parse worker,
``ingest.worker``, runs it in a child process during a bulk ingest).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any, Literal, NamedTuple

Kind = Literal["logs", "training", "training_json", "feedback"]
ROLES = frozenset({"user", "assistant", "system"})
QUALITY_SCORE = {"excellent": 1, "good": 1, "acceptable": 0, "unrated": 0, "poor": -1, "failed": -1}
# Source rank: content from logs/ wins over training_data/ copies.
RANK = {"logs": 2, "training": 1, "training_json": 1}
CID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class Conversation:
    """One chat request (ChatOS's unit): the messages, its mode/model, and the inline feedback fields."""

    conversation_id: str
    messages: tuple[Message, ...]
    mode: str
    model: str | None
    quality: str | None
    thumbs_up: bool | None
    started_at: str | None
    kind: Kind

    @property
    def usable(self) -> bool:
        """Has a user and an assistant message and no message with blank content."""
        roles = {m.role for m in self.messages}
        return "user" in roles and "assistant" in roles and all(m.content.strip() for m in self.messages)

    @property
    def inline_score(self) -> int:
        return score(self.thumbs_up, self.quality)

    @property
    def inline_rated(self) -> bool:
        return rated(self.thumbs_up, self.quality)


@dataclass(frozen=True, slots=True)
class FeedbackEvent:
    conversation_id: str
    thumbs_up: bool | None
    quality: str | None
    note: str | None
    timestamp: str | None
    better: str | None = None  # a corrected answer (meant for a thumbs-down; the dataset build checks that)

    @property
    def score(self) -> int:
        return score(self.thumbs_up, self.quality)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str


def score(thumbs_up: bool | None, quality: str | None) -> int:
    """ChatOS's rule: thumbs up 1 / down -1; else excellent/good 1, acceptable/unrated/unknown 0, poor/failed -1."""
    if thumbs_up is True:
        return 1
    if thumbs_up is False:
        return -1
    return QUALITY_SCORE.get(quality or "unrated", 0)


def rated(thumbs_up: bool | None, quality: str | None) -> bool:
    """Whether a person said anything about this conversation (a thumb, or a quality other than unrated)."""
    return thumbs_up is not None or (quality is not None and quality != "unrated")


def classify(rel: PurePosixPath | str) -> Kind | None:
    """Which record shape a path (relative to the store root) holds, or None for files we never read."""
    parts = PurePosixPath(rel).parts
    if len(parts) != 2:
        return None
    folder, name = parts
    if name.startswith("."):
        return None
    if folder == "logs" and name.endswith(".jsonl"):
        return "logs"
    if folder == "training_data":
        if name.startswith(("export_", "run_")):
            return None
        if name.endswith(".jsonl"):
            return "training"
        if name.endswith(".json"):
            return "training_json"
        return None
    if folder == "feedback" and name.endswith(".jsonl"):
        return "feedback"
    return None


def _decode(raw: bytes) -> dict[str, Any] | Rejection:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection(f"invalid UTF-8 at byte {exc.start}")
    if not text.strip():
        return Rejection("blank line")
    try:
        value = json.loads(text)
    except RecursionError:
        return Rejection("JSON nested too deeply")
    except ValueError as exc:
        return Rejection(f"invalid JSON: {str(exc).split(':')[0]}")
    if not isinstance(value, dict):
        return Rejection(f"expected a JSON object, got {_type(value)}")
    return value


def _type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds half of a UTF-16 surrogate pair (JSON allows a lone ``\\ud800``). Such text cannot be
    stored as UTF-8: left in, it made every ingest of its file fail."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_SURROGATE = "holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape)"


def _opt_str(obj: dict[str, Any], key: str, where: str = "") -> str | Rejection | None:
    value = obj.get(key)
    if value is None:
        return value
    if isinstance(value, str):
        return Rejection(f"field '{where}{key}' {_SURROGATE}") if _lone_surrogate(value) else value
    return Rejection(f"field '{where}{key}' must be a string or null, got {_type(value)}")


def _opt_bool(obj: dict[str, Any], key: str, where: str = "") -> bool | Rejection | None:
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return value
    return Rejection(f"field '{where}{key}' must be true, false or null, got {_type(value)}")


def _cid(value: Any, where: str) -> str | Rejection:
    if value is None:
        return Rejection(f"missing '{where}'")
    if not isinstance(value, str):
        return Rejection(f"field '{where}' must be a string, got {_type(value)}")
    if not CID_RE.match(value):
        return Rejection(f"field '{where}' is not a valid id ({len(value)} chars)")
    return value


def _messages(value: Any) -> tuple[Message, ...] | Rejection:
    if value is None:
        return Rejection("missing 'messages'")
    if not isinstance(value, list):
        return Rejection(f"field 'messages' must be an array, got {_type(value)}")
    if not value:
        return Rejection("field 'messages' is empty")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return Rejection(f"messages[{i}] must be an object, got {_type(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            return Rejection(f"messages[{i}].role must be one of user/assistant/system, got {role!r:.40}")
        if not isinstance(content, str):
            return Rejection(f"messages[{i}].content must be a string, got {_type(content)}")
        if _lone_surrogate(content):
            return Rejection(f"messages[{i}].content {_SURROGATE}")
        out.append(Message(role, content))
    return tuple(out)


def _quality(obj: dict[str, Any], key: str, where: str = "") -> str | Rejection | None:
    q = _opt_str(obj, key, where)
    if isinstance(q, str):
        q = q.strip().lower() or None
    return q


def parse_conversation(raw: bytes, kind: Kind, fallback_id: str | None = None) -> Conversation | Rejection:
    """One line of ``logs/`` or ``training_data/*.jsonl``, or a whole ``training_data/*.json`` file."""
    obj = _decode(raw)
    if isinstance(obj, Rejection):
        return obj
    msgs = _messages(obj.get("messages"))
    if isinstance(msgs, Rejection):
        return msgs
    if kind == "logs":
        return _from_full(obj, msgs)
    meta = obj.get("metadata", {})
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        return Rejection(f"field 'metadata' must be an object, got {_type(meta)}")
    if kind == "training":
        return _from_training(obj, meta, msgs)
    return _from_json_file(obj, meta, msgs, fallback_id)


def _from_full(obj: dict[str, Any], msgs: tuple[Message, ...]) -> Conversation | Rejection:
    cid = _cid(obj.get("conversation_id"), "conversation_id")
    fields = (
        _opt_str(obj, "mode"),
        _opt_str(obj, "chosen_model"),
        _quality(obj, "quality"),
        _opt_bool(obj, "thumbs_up"),
        _opt_str(obj, "started_at"),
    )
    for f in (cid, *fields):
        if isinstance(f, Rejection):
            return f
    mode, model, quality, thumbs, started = fields
    if model is None:
        model = next((m.get("model") for m in obj["messages"] if m.get("role") == "assistant"), None)
        model = model if isinstance(model, str) else None
        if model is not None and _lone_surrogate(model):
            return Rejection(f"field 'model' of the assistant message {_SURROGATE}")
    return Conversation(str(cid), msgs, str(mode or "normal"), model, quality, thumbs, started, "logs")  # type: ignore[arg-type]


def _from_training(obj: dict[str, Any], meta: dict[str, Any], msgs: tuple[Message, ...]) -> Conversation | Rejection:
    cid = _cid(meta.get("conversation_id"), "metadata.conversation_id")
    fields = (
        _opt_str(meta, "mode", "metadata."),
        _opt_str(meta, "model", "metadata."),
        _quality(meta, "quality", "metadata."),
        _opt_bool(meta, "thumbs_up", "metadata."),
        _opt_str(meta, "timestamp", "metadata."),
    )
    for f in (cid, *fields):
        if isinstance(f, Rejection):
            return f
    mode, model, quality, thumbs, ts = fields
    return Conversation(str(cid), msgs, str(mode or "normal"), model, quality, thumbs, ts, "training")  # type: ignore[arg-type]


def _from_json_file(
    obj: dict[str, Any], meta: dict[str, Any], msgs: tuple[Message, ...], fallback_id: str | None
) -> Conversation | Rejection:
    raw_id = obj.get("conversation_id", meta.get("conversation_id", fallback_id))
    cid = _cid(raw_id, "conversation_id")
    fs = obj.get("feedback_score")
    if fs is not None and (isinstance(fs, bool) or not isinstance(fs, int | float)):
        return Rejection(f"field 'feedback_score' must be a number or null, got {_type(fs)}")
    fields = (
        _opt_str(meta, "mode", "metadata."),
        _opt_str(meta, "model", "metadata."),
        _quality(meta, "quality", "metadata."),
    )
    for f in (cid, *fields):
        if isinstance(f, Rejection):
            return f
    mode, model, quality = fields
    thumbs = None if fs is None or fs == 0 else fs > 0
    return Conversation(str(cid), msgs, str(mode or "normal"), model, quality, thumbs, None, "training_json")  # type: ignore[arg-type]


class Fields(NamedTuple):
    """What ingest keeps of one accepted conversation record: :class:`Conversation` as a plain tuple, with the
    messages as ``(role, content)`` pairs. Bulk ingest makes 170k of these; a tuple costs a fraction of a frozen
    dataclass holding frozen dataclasses."""

    conversation_id: str
    messages: list[tuple[str, str]]
    mode: str
    model: str | None
    quality: str | None
    thumbs_up: bool | None
    started_at: str | None
    usable: bool


def fields_of(rec: Conversation) -> Fields:
    return Fields(rec.conversation_id, [(m.role, m.content) for m in rec.messages], rec.mode, rec.model, rec.quality,
                  rec.thumbs_up, rec.started_at, rec.usable)


def normalise_timestamp(value: str) -> str | None:
    """ISO 8601 -> ``YYYY-MM-DDTHH:MM:SS.ffffff`` (naive, as ChatOS writes), or None if it is not a timestamp."""
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        return None
    if dt.tzinfo is not None:
        dt = dt.astimezone().replace(tzinfo=None)
    return dt.isoformat(timespec="microseconds")


def parse_feedback(raw: bytes) -> FeedbackEvent | Rejection:
    """One line of the sidecar feedback log."""
    obj = _decode(raw)
    if isinstance(obj, Rejection):
        return obj
    cid = _cid(obj.get("conversation_id"), "conversation_id")
    thumbs, quality, note, ts, better = (
        _opt_bool(obj, "thumbs_up"),
        _quality(obj, "quality"),
        _opt_str(obj, "feedback"),
        _opt_str(obj, "timestamp"),
        _opt_str(obj, "better"),
    )
    for f in (cid, thumbs, quality, note, ts, better):
        if isinstance(f, Rejection):
            return f
    if thumbs is None and quality is None:
        return Rejection("a feedback event needs 'thumbs_up' or 'quality'")
    if quality is not None and quality not in QUALITY_SCORE:
        return Rejection(f"unknown quality {quality!r:.40}; known: {sorted(QUALITY_SCORE)}")
    norm_ts = None
    if ts is not None:
        norm_ts = normalise_timestamp(str(ts))
        if norm_ts is None:
            return Rejection(f"field 'timestamp' is not an ISO 8601 time: {ts!r:.40}")
    return FeedbackEvent(str(cid), thumbs, quality, note, norm_ts, better)  # type: ignore[arg-type]


# -- what ingest stores per line ---------------------------------------------------------------------------------


# One accepted conversation line, as stored: (cid, messages JSON or None, mode, model, quality, thumbs_up,
# inline_score, inline_rated, usable, started_at). One accepted feedback line: (cid, thumbs_up, quality, note,
# timestamp, score, better).
ConvTuple = tuple[str, str | None, str, str | None, str | None, bool | None, int, bool, bool, str | None]
FeedbackTuple = tuple[str, bool | None, str | None, str | None, str, int, str | None]


class Rejected(NamedTuple):
    reason: str
    line_hash: str


def line_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()
