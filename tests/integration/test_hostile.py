"""Hostile input: a corpus of malformed lines and files in one store, plus >= 10,000 fuzz cases for the parser and
the cursor. Zero crashes; each bad line reported once, with its file and line; every good record kept."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from helpers import fb, logs_file, need, rec, write_lines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from daemon.ingest import records
from daemon.ingest.ingestor import Ingestor
from daemon.state import State

BAD_LINES: list[tuple[bytes, str]] = [
    (b"\xff\xfe\xfd not utf-8", "invalid UTF-8"),
    (b'{"conversation_id": "a\x00b"}', "invalid JSON"),
    (b"\x00\x00\x00", "invalid JSON"),
    (b"[1, 2, 3]", "expected a JSON object"),
    (b'"just a string"', "expected a JSON object"),
    (b"12345", "expected a JSON object"),
    (b"true", "expected a JSON object"),
    (b"null", "expected a JSON object"),
    (b'{"a":' * 20_000 + b"1" + b"}" * 20_000, "nested too deeply"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b"{}", "missing 'messages'"),
    (b'{"messages": []}', "field 'messages' is empty"),
    (b'{"conversation_id": "abcabcabcabc", "messages": "hi"}', "must be an array"),
    (b"   \t ", "blank line"),
    (b"{not json at all", "invalid JSON"),
]
# one wrong type for every field the parser reads
WRONG_TYPES: list[tuple[str, Any]] = [("conversation_id", 12), ("conversation_id", None), ("messages", {}),
                                      ("mode", ["x"]), ("chosen_model", 1.5), ("quality", {"q": 1}),
                                      ("thumbs_up", "no"), ("started_at", [])]


def test_corpus_store_zero_crashes_each_bad_line_reported_once(store: Path, tmp_path: Path) -> None:
    p = logs_file(store)
    good = [rec(f"g{i:011d}", quality="good", answer=f"fine {i}") for i in range(5)]
    lines: list[bytes] = [json.dumps(good[0]).encode()]
    expected_bad: dict[int, str] = {}
    for raw, reason in BAD_LINES:
        lines.append(raw)
        expected_bad[len(lines)] = reason
    for field, value in WRONG_TYPES:
        lines.append(json.dumps(rec("w00000000001", **{field: value})).encode())
        expected_bad[len(lines)] = field
    msgs_bad = rec("w00000000002")
    msgs_bad["messages"][0]["role"] = 7
    lines.append(json.dumps(msgs_bad).encode())
    expected_bad[len(lines)] = "role"
    huge = rec("w00000000003", answer="z" * 300_000)
    lines.append(json.dumps(huge).encode())
    expected_bad[len(lines)] = "line over"
    lines += [json.dumps(g).encode() for g in good[1:]]
    # whitespace-only and empty content are kept but never trained on; duplicate ids: the later line wins
    lines.append(json.dumps(rec("e00000000001", answer="   ")).encode())
    lines.append(json.dumps(rec("e00000000002", user="")).encode())
    lines.append(json.dumps(rec("d00000000001", quality="good", answer="first")).encode())
    lines.append(json.dumps(rec("d00000000001", quality="good", answer="second")).encode())
    p.write_bytes(b"\n".join(lines) + b"\n")
    # hostile files next to it
    os.mkfifo(store / "logs" / "conversations_fifo.jsonl")
    (store / "logs" / "conversations_loop.jsonl").symlink_to(store / "logs" / "conversations_loop.jsonl")
    outside = tmp_path / "outside.jsonl"
    write_lines(outside, [rec("o00000000001")])
    (store / "logs" / "conversations_out.jsonl").symlink_to(outside)
    (store / "logs" / "conversations_dir.jsonl").mkdir()
    (store / "feedback" / "feedback_2026-11-25.jsonl").write_bytes(
        b'{"conversation_id": "g00000000001", "thumbs_up": "yes"}\n' + json.dumps(fb("g00000000001")).encode()
        + b"\n\xff\n")
    state = State(tmp_path / "state")
    ing = Ingestor(state, store, max_line_bytes=200_000)
    with capture_logs() as logs:
        r1 = ing.scan()
        r2 = ing.scan()
    rejected = [e for e in logs if e["event"] == "ingest.line_rejected"]
    logs_rejected = {e["line"]: e["reason"] for e in rejected if e["file"] == str(p)}
    assert set(logs_rejected) == set(expected_bad), (sorted(logs_rejected), sorted(expected_bad))
    for line, fragment in expected_bad.items():
        assert fragment in logs_rejected[line], (line, fragment, logs_rejected[line])
    assert len(rejected) == len(expected_bad) + 2  # + two bad feedback lines, each once across both scans
    assert r2.conversations == 0 and r2.rejected == 0
    cids = {r[0] for r in state.conn.execute("SELECT cid FROM conversations")}
    assert {g["conversation_id"] for g in good} <= cids and "o00000000001" not in cids
    eligible = {e.cid for e in state.examples.eligible(["normal", "code"], 1, False)}
    assert eligible == {g["conversation_id"] for g in good} | {"d00000000001"}
    assert "second" in state.conversations.get("d00000000001")["messages"]  # type: ignore[index]
    warned = {e["event"] for e in logs if e["log_level"] == "warning"}
    assert {"ingest.symlink_outside_root", "ingest.unreadable"} <= warned
    assert r1.rejected == len(expected_bad) + 2
    state.close()


def test_file_truncated_while_being_read(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer truncates the file between our plan and our read: nothing crashes and the next scan reconciles."""
    from daemon.ingest import tail

    p = logs_file(store)
    write_lines(p, [rec(f"t0000000000{i}", quality="good", answer=f"t{i}") for i in range(6)])
    state = State(tmp_path / "state")
    real = tail.open_for_read

    def truncating_open(path: str) -> int:
        fd = real(path)
        with open(path, "r+b") as f:
            f.truncate(300)
        return fd

    monkeypatch.setattr(tail, "open_for_read", truncating_open)
    Ingestor(state, store).scan()
    monkeypatch.undo()
    write_lines(p, [rec("t00000000009", quality="good", answer="t9")], mode="w")
    Ingestor(state, store).scan()
    cids = {r[0] for r in state.conn.execute("SELECT cid FROM conversations WHERE deleted = 0")}
    assert cids == {"t00000000009"}
    state.close()


def test_permission_denied_as_an_unprivileged_user(tmp_path: Path) -> None:
    need(os.geteuid() == 0 and shutil.which("setpriv"), "needs root and setpriv (util-linux) to drop to nobody")
    base = Path(tempfile.mkdtemp(prefix="perm-"))
    try:
        os.chmod(base, 0o777)
        store = base / "store"
        (store / "logs").mkdir(parents=True)
        write_lines(store / "logs" / "conversations_a.jsonl", [rec("p00000000001", quality="good")])
        write_lines(store / "logs" / "conversations_b.jsonl", [rec("p00000000002", quality="good")])
        os.chmod(store / "logs" / "conversations_b.jsonl", 0o600)  # root-owned: nobody cannot read it
        for d in (store, store / "logs"):
            os.chmod(d, 0o755)
        os.chmod(store / "logs" / "conversations_a.jsonl", 0o644)
        state_dir = base / "state"
        env = {**os.environ, "CHATOS_RETRAIN_STORE__ROOT": str(store), "CHATOS_RETRAIN_STATE__DIR": str(state_dir),
               "HOME": str(base), "PYTHONDONTWRITEBYTECODE": "1"}
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                              "daemon", "ingest", "--json"], capture_output=True, text=True, env=env, timeout=120,
                             cwd=Path(__file__).resolve().parents[2])
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["conversations"] == 1 and report["skipped"] == 1
        assert "ingest.unreadable" in out.stderr and "conversations_b.jsonl" in out.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                     max_size=4), max_leaves=12)
shaped = st.fixed_dictionaries({}, optional={k: json_any for k in (
    "conversation_id", "messages", "metadata", "mode", "quality", "thumbs_up", "feedback_score", "chosen_model",
    "timestamp", "feedback", "started_at")})


@settings(max_examples=8500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_any | shaped, raw=st.binary(max_size=64), kind=st.sampled_from(["logs", "training",
                                                                                   "training_json", "feedback"]))
def test_fuzz_parser(value: Any, raw: bytes, kind: str) -> None:
    for data in (json.dumps(value).encode(), raw, json.dumps(value).encode()[: len(raw)]):
        out = (records.parse_feedback(data) if kind == "feedback"
               else records.parse_conversation(data, kind, fallback_id="json-fuzz"))  # type: ignore[arg-type]
        assert isinstance(out, records.Conversation | records.FeedbackEvent | records.Rejection)


@settings(max_examples=1600, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(max_size=300) | st.sampled_from([b"\n", json.dumps(rec("f00000000001")).encode()
                                                                    + b"\n"]), max_size=8),
       rewrite=st.booleans())
def test_fuzz_cursor(chunks: list[bytes], rewrite: bool) -> None:
    """Arbitrary bytes appended (and sometimes rewritten) never crash the cursor, and the final state matches a fresh
    ingest of the final file, except for conversations that vanished on the way (deletions are permanent)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "s"
        (root / "logs").mkdir(parents=True)
        p = root / "logs" / "conversations_x.jsonl"
        p.touch()
        state = State(Path(tmp) / "st")
        ing = Ingestor(state, root)
        for i, c in enumerate(chunks):
            if rewrite and i == len(chunks) // 2:
                p.write_bytes(p.read_bytes()[: len(c)])
            with p.open("ab") as f:
                f.write(c)
            ing.scan()
        fresh = State(Path(tmp) / "st2")
        Ingestor(fresh, root).scan()
        q = "SELECT cid FROM conversations WHERE deleted = 0"
        gone = {r[0] for r in state.conn.execute("SELECT cid FROM conversations WHERE deleted = 1")}
        assert {r[0] for r in state.conn.execute(q)} == {r[0] for r in fresh.conn.execute(q)} - gone
        state.close()
        fresh.close()
