"""The record parser: every shape of CHATOS_STORE, every hazard, and never a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import rec
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.ingest import records
from daemon.ingest.records import Conversation, FeedbackEvent, Rejection, classify, parse_conversation, parse_feedback


def enc(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_full_record_parses_into_typed_record() -> None:
    out = parse_conversation(enc(rec("a1b2c3d4e5f6", quality="good")), "logs")
    assert isinstance(out, Conversation)
    assert out.conversation_id == "a1b2c3d4e5f6"
    assert [m.role for m in out.messages] == ["user", "assistant"]
    assert out.messages[1].content == "Use xs[::-1]."
    assert (out.mode, out.model, out.quality, out.thumbs_up) == ("normal", "qwen2.5:7b", "good", None)
    assert out.started_at == "2025-12-05T14:03:11.123456"
    assert out.usable and out.inline_score == 1 and out.inline_rated


def test_older_full_record_without_project_name_parses() -> None:
    r = rec("a1b2c3d4e5f6")
    del r["project_name"]
    assert isinstance(parse_conversation(enc(r), "logs"), Conversation)


def test_model_falls_back_to_assistant_message_model() -> None:
    out = parse_conversation(enc(rec("a1b2c3d4e5f6", chosen_model=None)), "logs")
    assert isinstance(out, Conversation) and out.model == "qwen2.5:7b"


def test_training_record_shape() -> None:
    line = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        "metadata": {"source": "chatos_interaction", "conversation_id": "abcdefabcdef", "mode": "code",
                     "quality": "excellent", "model": "llama3.1:8b", "timestamp": "2025-12-05T14:03:15"},
    }
    out = parse_conversation(enc(line), "training")
    assert isinstance(out, Conversation)
    assert (out.conversation_id, out.mode, out.model, out.quality, out.kind) == (
        "abcdefabcdef", "code", "llama3.1:8b", "excellent", "training")
    assert out.inline_score == 1


def test_training_record_honours_metadata_thumbs_up() -> None:
    line = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "metadata": {"conversation_id": "abcdefabcdef", "quality": "excellent", "thumbs_up": False}}
    out = parse_conversation(enc(line), "training")
    assert isinstance(out, Conversation) and out.inline_score == -1


@pytest.mark.parametrize(("fs", "thumbs", "score"), [(1, True, 1), (0.5, True, 1), (-2, False, -1), (0, None, 0),
                                                      (None, None, 0)])
def test_json_file_shape_feedback_score(fs: Any, thumbs: bool | None, score: int) -> None:
    obj = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "feedback_score": fs}
    out = parse_conversation(enc(obj), "training_json", fallback_id="json-0123456789ab")
    assert isinstance(out, Conversation)
    assert out.conversation_id == "json-0123456789ab"
    assert out.thumbs_up is thumbs and out.inline_score == score


def test_json_file_prefers_its_own_conversation_id() -> None:
    obj = {"conversation_id": "ffffffffffff", "messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}
    out = parse_conversation(enc(obj), "training_json", fallback_id="json-x")
    assert isinstance(out, Conversation) and out.conversation_id == "ffffffffffff"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe{}", "invalid UTF-8"),
        (b'{"conversation_id": "a\x00"', "invalid JSON"),
        (b"[1, 2]", "expected a JSON object, got array"),
        (b'"text"', "expected a JSON object, got string"),
        (b"42", "expected a JSON object, got number"),
        (b"null", "expected a JSON object, got null"),
        (b"   ", "blank line"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"messages": []}', "field 'messages' is empty"),
        (b'{"conversation_id": "abc"}', "missing 'messages'"),
    ],
)
def test_malformed_lines_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    out = parse_conversation(raw, "logs")
    assert isinstance(out, Rejection)
    assert reason in out.reason


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("conversation_id", None, "missing 'conversation_id'"),
        ("conversation_id", 123, "must be a string"),
        ("conversation_id", "", "not a valid id"),
        ("conversation_id", "x" * 500, "not a valid id"),
        ("conversation_id", "../../etc", "not a valid id"),
        ("messages", "hello", "must be an array"),
        ("messages", [1], "messages[0] must be an object"),
        ("messages", [{"role": "robot", "content": "x"}], "role must be one of"),
        ("messages", [{"role": "user", "content": 5}], "content must be a string"),
        ("messages", [{"role": "user"}], "content must be a string"),
        ("mode", 3, "field 'mode' must be a string"),
        ("quality", ["good"], "field 'quality' must be a string"),
        ("thumbs_up", "yes", "field 'thumbs_up' must be true, false or null"),
        ("thumbs_up", 1, "field 'thumbs_up' must be true, false or null"),
        ("chosen_model", {}, "field 'chosen_model' must be a string"),
        ("started_at", 17, "field 'started_at' must be a string"),
    ],
)
def test_wrong_types_in_full_records(field: str, value: Any, reason: str) -> None:
    out = parse_conversation(enc(rec("a1b2c3d4e5f6", **{field: value})), "logs")
    assert isinstance(out, Rejection), out
    assert reason in out.reason


def test_training_metadata_wrong_types() -> None:
    base = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert "metadata" in parse_conversation(enc({**base, "metadata": []}), "training").reason  # type: ignore[union-attr]
    out = parse_conversation(enc({**base, "metadata": {"conversation_id": "abcabcabcabc", "mode": 1}}), "training")
    assert isinstance(out, Rejection) and "metadata.mode" in out.reason
    out = parse_conversation(enc({**base, "metadata": {}}), "training")
    assert isinstance(out, Rejection) and "metadata.conversation_id" in out.reason
    out = parse_conversation(enc({**base, "feedback_score": "1"}), "training_json", fallback_id="json-a")
    assert isinstance(out, Rejection) and "feedback_score" in out.reason


def test_blank_content_is_kept_but_not_usable() -> None:
    out = parse_conversation(enc(rec("a1b2c3d4e5f6", answer="   \n ")), "logs")
    assert isinstance(out, Conversation) and not out.usable


def test_missing_assistant_is_not_usable() -> None:
    r = rec("a1b2c3d4e5f6")
    r["messages"] = r["messages"][:1]
    out = parse_conversation(enc(r), "logs")
    assert isinstance(out, Conversation) and not out.usable


@pytest.mark.parametrize(
    ("thumbs", "quality", "score", "rated"),
    [
        (True, None, 1, True), (False, "excellent", -1, True), (True, "failed", 1, True),
        (None, "excellent", 1, True), (None, "good", 1, True), (None, "acceptable", 0, True),
        (None, "unrated", 0, False), (None, None, 0, False), (None, "poor", -1, True), (None, "failed", -1, True),
        (None, "weird", 0, True),
    ],
)
def test_scoring_exactly_as_chatos(thumbs: bool | None, quality: str | None, score: int, rated: bool) -> None:
    assert records.score(thumbs, quality) == score
    assert records.rated(thumbs, quality) is rated


def test_feedback_event() -> None:
    ev = parse_feedback(enc({"conversation_id": "a1b2c3d4e5f6", "thumbs_up": True, "quality": "good",
                             "feedback": "nice", "timestamp": "2026-11-25T10:00:00"}))
    assert isinstance(ev, FeedbackEvent)
    assert (ev.thumbs_up, ev.quality, ev.note, ev.score) == (True, "good", "nice", 1)
    assert ev.timestamp == "2026-11-25T10:00:00.000000"


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"conversation_id": "a1b2c3d4e5f6"}, "needs 'thumbs_up' or 'quality'"),
        ({"conversation_id": "a1b2c3d4e5f6", "quality": "superb"}, "unknown quality"),
        ({"conversation_id": "a1b2c3d4e5f6", "thumbs_up": "true"}, "thumbs_up"),
        ({"conversation_id": "a1b2c3d4e5f6", "thumbs_up": True, "timestamp": "yesterday"}, "timestamp"),
        ({"conversation_id": "a1b2c3d4e5f6", "thumbs_up": True, "timestamp": 5}, "timestamp"),
        ({"thumbs_up": True}, "missing 'conversation_id'"),
        ({"conversation_id": "a1b2c3d4e5f6", "thumbs_up": False, "better": 3}, "field 'better' must be a string"),
        ({"conversation_id": "a1b2c3d4e5f6", "thumbs_up": False, "better": "\ud800"}, "field 'better' holds a lone"),
    ],
)
def test_bad_feedback_events(obj: dict[str, Any], reason: str) -> None:
    out = parse_feedback(enc(obj))
    assert isinstance(out, Rejection) and reason in out.reason


def test_feedback_event_keeps_a_correction_whatever_the_vote() -> None:
    """A correction is kept on any event: the dataset build decides whether it counts (a thumbs-down only)."""
    for thumbs in (False, True, None):
        ev = parse_feedback(enc({"conversation_id": "a1b2c3d4e5f6", "thumbs_up": thumbs, "quality": "poor",
                                 "better": "Use reversed(xs)."}))
        assert isinstance(ev, FeedbackEvent) and ev.better == "Use reversed(xs)."
    ev = parse_feedback(enc({"conversation_id": "a1b2c3d4e5f6", "thumbs_up": False}))
    assert isinstance(ev, FeedbackEvent) and ev.better is None


def test_feedback_timestamp_with_timezone_is_normalised_to_naive() -> None:
    ev = parse_feedback(enc({"conversation_id": "a1b2c3d4e5f6", "thumbs_up": False,
                             "timestamp": "2026-11-25T10:00:00+00:00"}))
    assert isinstance(ev, FeedbackEvent) and ev.timestamp is not None and "+" not in ev.timestamp


@pytest.mark.parametrize(
    ("rel", "kind"),
    [
        ("logs/conversations_2025-12-05.jsonl", "logs"),
        ("training_data/training_2025-12-05.jsonl", "training"),
        ("training_data/old_export.json", "training_json"),
        ("training_data/export_20251205.json", None),
        ("training_data/run_1.json", None),
        ("training_data/train_lora.py", None),
        ("training_data/analytics/summary.jsonl", None),
        ("feedback/feedback_2026-11-25.jsonl", "feedback"),
        ("logs/.conversations.swp.jsonl", None),
        ("logs/readme.txt", None),
        ("other/x.jsonl", None),
        ("conversations.jsonl", None),
    ],
)
def test_classify(rel: str, kind: str | None) -> None:
    assert classify(rel) == kind


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)
record_like = st.fixed_dictionaries(
    {},
    optional={
        "conversation_id": json_values | st.from_regex(r"[0-9a-f]{12}", fullmatch=True),
        "messages": json_values | st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant",
                                                                                          "system", "x"]),
                                                                  "content": json_values | st.text()}), max_size=3),
        "mode": json_values, "quality": json_values, "thumbs_up": json_values, "metadata": json_values,
        "feedback_score": json_values, "chosen_model": json_values, "timestamp": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(value=json_values | record_like, kind=st.sampled_from(["logs", "training", "training_json", "feedback"]))
def test_random_json_values_never_crash_the_parser(value: Any, kind: str) -> None:
    raw = json.dumps(value).encode()
    out = parse_feedback(raw) if kind == "feedback" else parse_conversation(raw, kind, fallback_id="json-f")  # type: ignore[arg-type]
    assert isinstance(out, Conversation | FeedbackEvent | Rejection)
    if isinstance(out, Rejection):
        assert out.reason and "\n" not in out.reason


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_random_bytes_never_crash_the_parser(raw: bytes) -> None:
    assert isinstance(parse_conversation(raw, "logs"), Conversation | Rejection)
    assert isinstance(parse_feedback(raw), FeedbackEvent | Rejection)
