"""Ingest on a real temp store: appends, partial lines, roll-over, rewrites, replacements, deletions, feedback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    fb,
    feedback_file,
    give_away,
    logs_file,
    rec,
    run_python_unprivileged,
    unprivileged_dir,
    write_lines,
)
from structlog.testing import capture_logs

from daemon import api
from daemon.ingest.ingestor import Ingestor
from daemon.state import State, StateError
from daemon.state.cursors import Cursors


def ingest(state: State, root: Path, **kw: Any) -> Any:
    return Ingestor(state, root, **kw).scan()


def cids(state: State, deleted: bool | None = False) -> set[str]:
    sql = "SELECT cid FROM conversations" + ("" if deleted is None else f" WHERE deleted = {int(deleted)}")
    return {r[0] for r in state.conn.execute(sql)}


def eligible(state: State) -> set[str]:
    return {e.cid for e in state.examples.eligible(["normal", "code"], 1, False)}


def test_partial_last_line_waits_for_its_newline(store: Path, state: State) -> None:
    p = logs_file(store)
    full = [json.dumps(rec(f"{i:012x}")) + "\n" for i in range(3)]
    p.write_text(full[0] + full[1] + full[2][:40])
    r = ingest(state, store)
    assert r.conversations == 2 and r.rejected == 0
    assert cids(state) == {f"{i:012x}" for i in range(2)}
    with p.open("a") as f:
        f.write(full[2][40:])
    r = ingest(state, store)
    assert r.conversations == 1 and r.rejected == 0
    assert len(cids(state)) == 3
    assert ingest(state, store).conversations == 0  # nothing new: nothing read again


def test_midnight_rollover_to_a_new_day_file(store: Path, state: State) -> None:
    write_lines(logs_file(store, "2026-11-24"), [rec("aaaaaaaaaaa1")])
    ingest(state, store)
    write_lines(logs_file(store, "2026-11-24"), [rec("aaaaaaaaaaa2")])
    write_lines(logs_file(store, "2026-11-25"), [rec("bbbbbbbbbbb1")])
    r = ingest(state, store)
    assert r.conversations == 2
    assert cids(state) == {"aaaaaaaaaaa1", "aaaaaaaaaaa2", "bbbbbbbbbbb1"}


def _chatos_delete(path: Path, cid: str) -> None:
    """What ChatOS does when a chat is deleted: truncate and rewrite the day's file in place."""
    lines = [ln for ln in path.read_text().splitlines(keepends=True) if f'"conversation_id": "{cid}"' not in ln]
    with path.open("r+") as f:
        f.truncate(0)
        f.write("".join(lines))


def test_chatos_in_place_rewrite_after_delete_marks_it_deleted_even_with_a_training_copy(
    store: Path, state: State
) -> None:
    ids = ["a00000000001", "a00000000002", "a00000000003"]
    write_lines(logs_file(store), [rec(c, quality="good") for c in ids])
    write_lines(store / "training_data" / "training_2025-12-05.jsonl", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "metadata": {"conversation_id": c, "quality": "good", "mode": "normal"}} for c in ids])
    ingest(state, store)
    assert eligible(state) == set(ids)
    ino = os.stat(logs_file(store)).st_ino
    _chatos_delete(logs_file(store), ids[1])
    assert os.stat(logs_file(store)).st_ino == ino
    r = ingest(state, store)
    assert r.deleted == 1 and r.rereads == 1
    assert eligible(state) == {ids[0], ids[2]}
    assert cids(state, deleted=True) == {ids[1]}
    # the training_data copy is still there; a later re-read of it does not resurrect the conversation
    (store / "training_data" / "training_2025-12-05.jsonl").touch()
    os.utime(store / "training_data" / "training_2025-12-05.jsonl", ns=(1, 1))
    ingest(state, store)
    assert eligible(state) == {ids[0], ids[2]}


def test_rewrite_that_leaves_the_file_longer_is_still_caught(store: Path, state: State) -> None:
    """Delete one chat, then more chats are appended before we look: size grew, but read bytes changed."""
    p = logs_file(store)
    write_lines(p, [rec(f"b0000000000{i}", answer="x" * 50) for i in range(1, 4)])
    ingest(state, store)
    _chatos_delete(p, "b00000000002")
    write_lines(p, [rec("b00000000009", answer="y" * 400)])
    r = ingest(state, store)
    assert r.rereads == 1 and r.deleted == 1
    assert cids(state) == {"b00000000001", "b00000000003", "b00000000009"}
    assert cids(state, deleted=True) == {"b00000000002"}


def test_replaced_file_new_inode(store: Path, state: State) -> None:
    p = logs_file(store)
    write_lines(p, [rec("c00000000001"), rec("c00000000002")])
    ingest(state, store)
    tmp = p.with_suffix(".tmp")
    write_lines(tmp, [rec("c00000000001"), rec("c00000000002"), rec("c00000000003")])
    os.replace(tmp, p)
    r = ingest(state, store)
    assert r.rereads == 1 and r.deleted == 0
    assert cids(state) == {"c00000000001", "c00000000002", "c00000000003"}
    assert state.conn.execute("SELECT COUNT(*) FROM sightings").fetchone()[0] == 3  # not counted twice


def test_deleted_file_deletes_its_conversations(store: Path, state: State) -> None:
    write_lines(logs_file(store, "2026-01-01"), [rec("d00000000001")])
    write_lines(logs_file(store, "2026-01-02"), [rec("d00000000002")])
    ingest(state, store)
    logs_file(store, "2026-01-01").unlink()
    r = ingest(state, store)
    assert r.deleted == 1
    assert cids(state) == {"d00000000002"}
    assert state.cursors.get(str(logs_file(store, "2026-01-01"))) is None


def test_logs_content_wins_over_training_copy(store: Path, state: State) -> None:
    write_lines(store / "training_data" / "training_2025-12-05.jsonl", [
        {"messages": [{"role": "user", "content": "old q"}, {"role": "assistant", "content": "old a"}],
         "metadata": {"conversation_id": "e00000000001", "quality": "good"}}])
    ingest(state, store)
    assert "old a" in state.conversations.get("e00000000001")["messages"]  # type: ignore[index]
    write_lines(logs_file(store), [rec("e00000000001", answer="new a", quality="good")])
    ingest(state, store)
    row = state.conversations.get("e00000000001")
    assert row is not None and "new a" in row["messages"] and row["rank"] == 2
    # and a later training copy never overrides logs content
    write_lines(store / "training_data" / "training_2025-12-06.jsonl", [
        {"messages": [{"role": "user", "content": "q3"}, {"role": "assistant", "content": "third"}],
         "metadata": {"conversation_id": "e00000000001", "quality": "good"}}])
    ingest(state, store)
    assert "new a" in state.conversations.get("e00000000001")["messages"]  # type: ignore[index]


def test_feedback_before_its_conversation_is_kept_and_joined(store: Path, state: State) -> None:
    write_lines(feedback_file(store), [fb("f00000000001", True)])
    r = ingest(state, store)
    assert r.feedback_events == 1
    assert state.conversations.counts()["feedback_waiting"] == 1
    assert eligible(state) == set()
    write_lines(logs_file(store), [rec("f00000000001")])  # unrated in the log
    ingest(state, store)
    assert eligible(state) == {"f00000000001"}
    assert state.conversations.counts()["feedback_waiting"] == 0


def test_latest_thumbs_vote_wins_by_timestamp_and_a_later_rating_does_not_replace_it(store: Path,
                                                                                    state: State) -> None:
    write_lines(logs_file(store), [rec("f00000000002", quality="excellent")])
    write_lines(feedback_file(store, "2026-11-25"), [fb("f00000000002", False, ts="2026-11-25T10:00:00")])
    ingest(state, store)
    assert eligible(state) == set()  # thumbs down overrides the inline "excellent"
    # an older event arriving later (another day's file) does not win
    write_lines(feedback_file(store, "2026-11-24"), [fb("f00000000002", True, ts="2026-11-24T09:00:00")])
    ingest(state, store)
    assert eligible(state) == set()
    # a later quality rating does not replace the thumbs-down: the thumbs vote is the user's own word
    write_lines(feedback_file(store, "2026-11-25"), [fb("f00000000002", None, quality="good",
                                                        ts="2026-11-25T11:00:00")])
    ingest(state, store)
    assert eligible(state) == set()
    # a later thumbs vote does
    write_lines(feedback_file(store, "2026-11-25"), [fb("f00000000002", True, ts="2026-11-25T12:00:00")])
    ingest(state, store)
    assert eligible(state) == {"f00000000002"}


def test_bad_lines_warn_once_with_file_and_line_and_are_counted(store: Path, state: State) -> None:
    p = logs_file(store)
    with p.open("w") as f:
        f.write(json.dumps(rec("g00000000001")) + "\n")
        f.write("not json\n")
        f.write(json.dumps([1, 2]) + "\n")
        f.write(json.dumps(rec("g00000000002", thumbs_up="yes")) + "\n")
        f.write(json.dumps(rec("g00000000003")) + "\n")
    with capture_logs() as logs:
        r = ingest(state, store)
    warnings = [e for e in logs if e["event"] == "ingest.line_rejected"]
    assert [(w["file"], w["line"]) for w in warnings] == [(str(p), 2), (str(p), 3), (str(p), 4)]
    assert "invalid JSON" in warnings[0]["reason"] and "thumbs_up" in warnings[2]["reason"]
    assert r.rejected == 3 and r.conversations == 2
    assert state.conversations.counts()["rejected_lines"] == 3
    # a re-read of the whole file (rewrite) does not warn again for the same bad lines
    write_lines(p, [rec("g00000000004")])
    _chatos_delete(p, "g00000000001")
    with capture_logs() as logs:
        r = ingest(state, store)
    assert r.rereads == 1
    assert not [e for e in logs if e["event"] == "ingest.line_rejected"]
    assert state.conversations.counts()["rejected_lines"] == 3


def test_huge_line_over_the_cap_is_rejected_without_holding_it(store: Path, state: State) -> None:
    p = logs_file(store)
    with p.open("w") as f:
        f.write(json.dumps(rec("h00000000001")) + "\n")
        f.write(json.dumps(rec("h00000000002", answer="z" * 5000)) + "\n")
        f.write(json.dumps(rec("h00000000003")) + "\n")
    with capture_logs() as logs:
        r = ingest(state, store, max_line_bytes=2000)
    assert r.conversations == 2 and r.rejected == 1
    assert [e["line"] for e in logs if e["event"] == "ingest.line_rejected"] == [2]


def test_non_data_files_are_ignored(store: Path, state: State) -> None:
    td = store / "training_data"
    (td / "export_1.json").write_text(json.dumps([rec("i00000000001")]))
    (td / "run_1.json").write_text("{}")
    (td / "train_x.py").write_text("x = 1\n")
    (td / "analytics").mkdir()
    write_lines(td / "analytics" / "a.jsonl", [rec("i00000000002")])
    write_lines(store / "elsewhere.jsonl", [rec("i00000000003")])
    with capture_logs() as logs:
        r = ingest(state, store)
    assert r.files_seen == 0 and cids(state) == set()
    assert not [e for e in logs if e["log_level"] == "warning"]


def test_json_training_files_are_read_whole_and_reread_on_change(store: Path, state: State) -> None:
    p = store / "training_data" / "chat_001.json"
    obj = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
           "feedback_score": 1}
    p.write_text(json.dumps(obj))
    ingest(state, store)
    assert len(eligible(state)) == 1
    obj["feedback_score"] = -1
    p.write_text(json.dumps(obj, indent=2))
    ingest(state, store)
    assert eligible(state) == set() and len(cids(state)) == 1


def test_symlink_outside_root_is_not_followed(store: Path, state: State, tmp_path: Path) -> None:
    outside = tmp_path / "outside.jsonl"
    write_lines(outside, [rec("j00000000001")])
    (store / "logs" / "conversations_2026-01-01.jsonl").symlink_to(outside)
    inside = logs_file(store, "2026-01-02")
    write_lines(inside, [rec("j00000000002")])
    (store / "logs" / "conversations_2026-01-03.jsonl").symlink_to(inside)
    ing = Ingestor(state, store)  # the service keeps one: a warning is given once per path
    with capture_logs() as logs:
        ing.scan()
        ing.scan()
    assert cids(state) == {"j00000000002"}
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["ingest.symlink_outside_root"]


def test_symlink_loop_and_dangling_link_do_not_crash(store: Path, state: State) -> None:
    a, b = store / "logs" / "conversations_a.jsonl", store / "logs" / "conversations_b.jsonl"
    a.symlink_to(b)
    b.symlink_to(a)
    (store / "logs" / "conversations_c.jsonl").symlink_to(store / "missing.jsonl")
    write_lines(logs_file(store), [rec("k00000000001")])
    ingest(state, store)
    assert cids(state) == {"k00000000001"}


def test_fifo_is_skipped_without_hanging(store: Path, state: State) -> None:
    os.mkfifo(store / "logs" / "conversations_fifo.jsonl")
    write_lines(logs_file(store), [rec("l00000000001")])
    with capture_logs() as logs:
        ingest(state, store)
    assert cids(state) == {"l00000000001"}
    assert any(e["event"] == "ingest.unreadable" for e in logs)


def test_file_replaced_by_a_directory_counts_as_gone(store: Path, state: State) -> None:
    p = logs_file(store)
    write_lines(p, [rec("m00000000001")])
    ingest(state, store)
    p.unlink()
    p.mkdir()
    r = ingest(state, store)
    assert r.deleted == 1 and cids(state) == set()


_INGEST_AS_CHILD = """
import json, sys
from pathlib import Path
from structlog.testing import capture_logs
from daemon.ingest.ingestor import Ingestor
from daemon.state import State
with State(Path(sys.argv[2])) as state, capture_logs() as logs:
    Ingestor(state, Path(sys.argv[1])).scan()
    cids = [r[0] for r in state.conn.execute("SELECT cid FROM conversations WHERE deleted = 0")]
print(json.dumps({"events": [e["event"] for e in logs], "cids": cids}))
"""


def test_permission_denied_is_a_warning_and_retried() -> None:
    # root reads files regardless of permissions: the ingest runs in a child as an unprivileged user (helpers)
    with unprivileged_dir("perm-ingest-") as base:
        store = base / "ChatOS-Memory"
        p = logs_file(store)
        write_lines(p, [rec("n00000000001")])
        give_away(store)
        p.chmod(0)
        first = run_python_unprivileged(_INGEST_AS_CHILD, str(store), str(base / "state"))
        assert any(e == "ingest.unreadable" for e in first["events"])
        p.chmod(0o644)
        second = run_python_unprivileged(_INGEST_AS_CHILD, str(store), str(base / "state"))
        assert set(second["cids"]) == {"n00000000001"}


def test_crash_mid_file_loses_nothing_and_counts_nothing_twice(
    store: Path, state: State, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_lines(logs_file(store), [rec(f"o0000000000{i}") for i in range(5)])
    write_lines(feedback_file(store), [fb("o00000000001")])

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("killed")

    monkeypatch.setattr(Cursors, "save", boom)
    with pytest.raises(RuntimeError):
        ingest(state, store)
    monkeypatch.undo()
    assert cids(state) == set() and state.conversations.counts()["feedback_events"] == 0  # rolled back with the cursor
    ingest(state, store)
    ingest(state, store)
    assert len(cids(state)) == 5 and state.conversations.counts()["feedback_events"] == 1


def test_targeted_scan_reads_only_given_paths(store: Path, state: State) -> None:
    write_lines(logs_file(store, "2026-01-01"), [rec("p00000000001")])
    write_lines(logs_file(store, "2026-01-02"), [rec("p00000000002")])
    r = Ingestor(state, store).scan([str(logs_file(store, "2026-01-02")), str(store / "training_data" / "x.py")])
    assert r.files_seen == 1 and cids(state) == {"p00000000002"}


def test_status_counts(store: Path, state: State, make_settings: Any) -> None:
    write_lines(logs_file(store), [rec("q00000000001", quality="good"), rec("q00000000002"),
                                   rec("q00000000003", answer=" ")])
    write_lines(feedback_file(store), [fb("q00000000002", True), fb("q0000000000x", False)])
    (logs_file(store).parent / "conversations_bad.jsonl").write_text("{oops\n")
    s = make_settings()
    ingest(state, store)
    st = api.store_status(s, state)
    assert st.conversations == {"total": 3, "eligible": 2, "positive": 2, "deleted": 0, "unusable": 1,
                                "rejected_lines": 1}
    assert st.feedback_events == 2 and st.feedback_waiting == 1
    assert st.new_eligible_since_dataset == 2 and st.latest_dataset is None
    assert st.files_tracked == 3


def test_state_files_are_private(tmp_path: Path) -> None:
    d = tmp_path / "st"
    State(d).close()
    assert (d.stat().st_mode & 0o777) == 0o700
    assert ((d / "state.sqlite3").stat().st_mode & 0o777) == 0o600


def test_state_refuses_a_newer_schema(tmp_path: Path) -> None:
    st = State(tmp_path / "s")
    st.conn.execute("PRAGMA user_version=99")
    st.close()
    with pytest.raises(StateError, match="newer than this version"):
        State(tmp_path / "s")


def test_copy_of_store_gives_same_counts(store: Path, tmp_path: Path) -> None:
    """Sanity: ingest is a function of the files (two fresh states agree)."""
    from daemon.demo.storegen import generate_store

    truth = generate_store(store, 300, days=3, seed=3)
    a, b = State(tmp_path / "a"), State(tmp_path / "b")
    ingest(a, store)
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    ingest(b, copy)
    assert len(cids(a)) == len(cids(b)) == len(truth.conversations)
    assert eligible(a) == eligible(b) == truth.eligible()
    a.close()
    b.close()
