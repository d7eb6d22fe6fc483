"""The fast paths of record parsing: a line that is valid in the ordinary way is checked and unpacked in one pass,
to the same values :mod:`daemon.ingest.records`' careful parsers give; anything else goes the careful way, which
says exactly why it is rejected. Ingest parses every line of the store here, so these functions avoid per-line
layers (tests/unit/test_fast_paths.py holds them equal to the careful way; bench/ measures them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from daemon import codec
from daemon.ingest.records import (
    CID_RE,
    QUALITY_SCORE,
    FeedbackTuple,
    Fields,
    Kind,
    Rejection,
    fields_of,
    parse_conversation,
    score,
)

# What json.loads runs, configured as json.loads's default decoder.
_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
# The store's JSON codec (orjson when installed); json still decides every line orjson refuses (see parse_fields).
_orjson_loads = codec.orjson_loads
_OrjsonError = codec.OrjsonError


def parse_fields(raw: bytes, kind: Kind) -> Fields | Rejection:
    """:func:`parse_conversation` for ``logs`` and ``training`` lines, as :class:`Fields`: the same records
    accepted, with the same values, and the same rejection reasons.

    A record that is valid in the ordinary way is checked and unpacked in one pass; anything else (including every
    line that will be rejected) goes through :func:`parse_conversation`, which says exactly why.
    """
    if _orjson_loads is not None:
        # orjson refuses what json would refuse, and more (NaN, lone surrogates, huge numbers): any refusal goes
        # the careful way, which decides with json. What it accepts, it decodes as json does for every field read.
        # (So a line needs no look for a lone surrogate escape: orjson refuses every one.)
        try:
            obj = _orjson_loads(raw)
        except _OrjsonError:
            obj = None
        end = length = 0
    else:
        if b"\\ud" in raw or b"\\uD" in raw:  # a surrogate escape, maybe unpaired: the careful way checks it
            return _slow_fields(raw, kind)
        try:
            text = raw.decode("utf-8")
            # json.loads minus its Python wrapper (a third of its cost on 1-2 KiB lines): the same C scanner,
            # accepted only when the value spans the whole line. Leading or trailing whitespace goes the slow way.
            obj, end = _scan_once(text, 0)
        except (ValueError, RecursionError, StopIteration):  # UnicodeDecodeError is a ValueError
            obj, end, text = None, -1, ""
        length = len(text)
    if end == length and type(obj) is dict:
        fields = _fast_fields(obj, kind)
        if fields is not None:
            return fields
    return _slow_fields(raw, kind)


def _slow_fields(raw: bytes, kind: Kind) -> Fields | Rejection:
    rec = parse_conversation(raw, kind)
    return rec if isinstance(rec, Rejection) else fields_of(rec)


def _fast_fields(obj: dict[str, Any], kind: Kind) -> Fields | None:
    """The common case of :func:`parse_conversation` (``logs`` / ``training``); None when anything is unusual."""
    msgs = obj.get("messages")
    if type(msgs) is not list or not msgs:
        return None
    pairs = []
    user = assistant = False
    filled = True
    for m in msgs:
        if type(m) is not dict:
            return None
        role, content = m.get("role"), m.get("content")
        if type(content) is not str:
            return None
        if role == "user":
            user = True
        elif role == "assistant":
            assistant = True
        elif role != "system":
            return None
        if not content or content.isspace():  # == not content.strip(), without the copy
            filled = False
        pairs.append((role, content))
    if kind == "logs":
        src = obj
        cid, mode, model = obj.get("conversation_id"), obj.get("mode"), obj.get("chosen_model")
        started = obj.get("started_at")
    elif kind == "training":
        meta = obj.get("metadata", {})
        if meta is None:
            meta = {}
        if type(meta) is not dict:
            return None
        src = meta
        cid, mode, model = meta.get("conversation_id"), meta.get("mode"), meta.get("model")
        started = meta.get("timestamp")
    else:
        return None
    quality, thumbs = src.get("quality"), src.get("thumbs_up")
    if type(cid) is not str or not CID_RE.match(cid) or not (thumbs is None or type(thumbs) is bool):
        return None
    for v in (mode, model, quality, started):
        if v is not None and type(v) is not str:
            return None
    if quality is not None:
        quality = quality.strip().lower() or None
    if model is None and kind == "logs":
        model = next((m.get("model") for m in msgs if m.get("role") == "assistant"), None)
        model = model if isinstance(model, str) else None
    return Fields(cid, pairs, mode or "normal", model, quality, thumbs, started, user and assistant and filled)


# The form normalise_timestamp gives: a valid time in this form is its own normal form.
_CANONICAL_TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}")


def fast_feedback(raw: bytes) -> FeedbackTuple | None:
    """The common case of :func:`parse_feedback` (orjson accepts the line, every field has its usual type, the
    timestamp is already in the normal form) as ingest stores it; None for anything else, which goes the careful
    way. Same values as the careful way."""
    try:
        obj = _orjson_loads(raw)
    except _OrjsonError:
        return None
    if type(obj) is not dict:
        return None
    cid, thumbs, quality, note, ts, better = (obj.get("conversation_id"), obj.get("thumbs_up"), obj.get("quality"),
                                              obj.get("feedback"), obj.get("timestamp"), obj.get("better"))
    if type(cid) is not str or not CID_RE.match(cid) or not (thumbs is None or type(thumbs) is bool):
        return None
    if (note is not None and type(note) is not str) or type(ts) is not str or not _CANONICAL_TS.fullmatch(ts):
        return None
    if better is not None and type(better) is not str:
        return None
    try:
        datetime.fromisoformat(ts)  # a real date and time (month 13 is not)
    except ValueError:
        return None
    if quality is not None:
        if type(quality) is not str:
            return None
        quality = quality.strip().lower() or None
        if quality is not None and quality not in QUALITY_SCORE:
            return None
    if thumbs is None and quality is None:
        return None
    return (cid, thumbs, quality, note, ts, score(thumbs, quality), better)


def fast_feedback_parser() -> Callable[[bytes], FeedbackTuple | None] | None:
    """:func:`fast_feedback` when orjson is installed (it decodes with orjson), else None: asked once per block,
    not once per line."""
    return fast_feedback if _orjson_loads is not None else None
