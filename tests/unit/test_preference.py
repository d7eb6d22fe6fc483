"""The pure parts of preference data (issue 12): lines cut out of SFT lines, trimming, the correction checks."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest

from daemon.dataset import examples, preference
from daemon.dataset.selection import Example
from daemon.ingest.feedback import make_event
from daemon.settings import DatasetSettings

TRICKY = ['say "hi"', "back\\slash\\", ',{"role":"assistant","content":"x"}', "é😀\u2028", "a\nb\tc", "}]}\n", ""]


def ex(cid: str, msgs: list[tuple[str, str]], score: int = 1) -> Example:
    return Example(cid, (), "normal", None, score, "p", 0, 1, examples.encode_line(msgs), b"", -1.0)


def dumps(obj: Any) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def m(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.mark.parametrize("text", TRICKY)
def test_kto_and_dpo_lines_are_json_dumps_byte_for_byte(text: str) -> None:
    msgs = [("system", "be " + text), ("user", "q " + text), ("assistant", "a1 " + text), ("user", text + "q2"),
            ("assistant", text + " last")]
    cut = preference.trimmed(ex("c1", msgs))
    assert cut is not None
    prompt = [m(r, c) for r, c in msgs[:-1]]
    assert preference.kto_line(cut.line, True) == dumps(
        {"prompt": prompt, "completion": [m("assistant", text + " last")], "label": True})
    assert preference.kto_line(cut.line, False) == dumps(
        {"prompt": prompt, "completion": [m("assistant", text + " last")], "label": False})
    assert preference.pair_line(cut.line, "better " + text) == dumps(
        {"prompt": prompt, "chosen": [m("assistant", "better " + text)], "rejected": [m("assistant", text + " last")]})


def test_trimmed_cuts_after_the_last_assistant_turn_and_refuses_one_without_a_prompt() -> None:
    plain = ex("c1", [("user", "q"), ("assistant", "a")])
    keyed = plain._replace(key=examples.dedup_prekey((("user", "q"), ("assistant", "a"))))
    assert preference.trimmed(keyed) is keyed  # already canonical (as cached examples are): no decode, no re-encode
    tail = preference.trimmed(ex("c2", [("user", "q"), ("assistant", "a"), ("user", "thanks")]))
    assert tail is not None and tail.messages == (("user", "q"), ("assistant", "a"))
    assert tail.line == examples.encode_line(tail.messages)
    assert preference.trimmed(ex("c3", [("assistant", "hello"), ("user", "q")])) is None
    assert preference.trimmed(ex("c4", [("assistant", "hello")])) is None
    spaced = Example("c5", (), "normal", None, 1, "p", 0, 1,
                     b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    cut = preference.trimmed(spaced)  # not the compact form: decoded and re-encoded
    assert cut is not None and cut.line == examples.encode_line([("user", "q"), ("assistant", "a")])


def test_select_labels_pairs_rejections_and_one_split_for_every_kind() -> None:
    cfg = DatasetSettings(eval_fraction=0.5, pii_scrub=False)
    cands = [ex(f"c{i:03d}", [("user", f"q{i}"), ("assistant", f"a{i}")], score=1 if i % 2 else -1)
             for i in range(40)]
    cands.append(ex("zero", [("user", "q"), ("assistant", "a")], score=0))
    corrections = {f"c{i:03d}": f"better {i}" for i in range(0, 40, 2)}
    corrections["c000"] = "  A0 "  # the same answer, but for case and spaces
    corrections["c002"] = " \n "
    corrections["c001"] = "ignored: c001 is up-voted"
    p = preference.select(cands, corrections, ["c999"], cfg, {"c004"}, set, set)
    prefs = p.prefs_train + p.prefs_eval
    assert len(prefs) == 40 and "zero" not in {e[0] for e in prefs}
    assert p.totals() == {"desirable": 20, "undesirable": 20, "pairs": 18}
    assert p.rejections == [("c000", preference.IDENTICAL), ("c002", preference.EMPTY),
                            ("c999", preference.MISPLACED)]
    eval_ids = {e[0] for e in p.prefs_eval}
    assert "c004" in eval_ids and 5 < len(eval_ids) < 35
    assert {e[0] for e in p.pairs_eval} == eval_ids & {e[0] for e in p.pairs_train + p.pairs_eval}
    part = p.manifest_part()
    assert part["rejections_by_reason"] == {preference.EMPTY: 1, preference.IDENTICAL: 1, preference.MISPLACED: 1}
    assert part["rejections"][0] == {"conversation_id": "c000", "reason": preference.IDENTICAL}


def test_duplicates_are_dropped_by_prompt_and_completion() -> None:
    cfg = DatasetSettings(pii_scrub=False)
    same = [("user", "How?"), ("assistant", "Like so.")]
    cands = [ex("b", same, -1), ex("a", [("user", " how? "), ("assistant", "LIKE so.")], -1),
             ex("c", [*same, ("user", "ok")], -1)]
    p = preference.select(cands, {"a": "x", "b": "x", "c": "y"}, [], cfg, set(), lambda: {"b"}, set)
    assert [e[0] for e in p.prefs_train + p.prefs_eval] == ["b"] and p.duplicates_removed == 3  # 2 prefs, 1 pair
    assert sorted(e[0] for e in p.pairs_train + p.pairs_eval) == ["a", "c"]  # "b" and "a" say the same


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"thumbs_up": True, "better": "x"}, "goes with a thumbs-down"),
        ({"quality": "poor", "better": "x"}, "goes with a thumbs-down"),
        ({"thumbs_up": False, "better": " \n\t"}, "is empty"),
        ({"thumbs_up": False, "better": "é" * 400, "max_line_bytes": 2000}, "over store.max_line_bytes (2000)"),
    ],
)
def test_make_event_refuses_a_bad_correction(kw: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        make_event("a1b2c3d4e5f6", **kw)


def test_make_event_with_a_correction() -> None:
    ev = make_event("a1b2c3d4e5f6", thumbs_up=False, better="Use xs[::-1].", now=datetime(2026, 1, 1),
                    max_line_bytes=200)
    assert ev == {"conversation_id": "a1b2c3d4e5f6", "thumbs_up": False, "better": "Use xs[::-1].",
                  "timestamp": "2026-01-01T00:00:00.000000"}


def test_lines_make_the_kto_lines_as_the_file_is_iterated() -> None:
    sft = [examples.encode_line([("user", f"q{i}"), ("assistant", f"a{i}")]) for i in range(3)]
    part = [(f"c{i}", 1 if i % 2 else -1, line, preference._cut(line)) for i, line in enumerate(sft)]
    part.append(("p", -1, b"a pair line\n", -1))
    lines = preference.Lines(part, size=2)
    want = [preference.kto_line(line, i % 2 == 1) for i, line in enumerate(sft)] + [b"a pair line\n"]
    assert list(lines) == [want[0] + want[1], want[2] + want[3]]
    assert list(lines) == list(lines)  # made again each time: the digest pass, then the writer
    assert json.loads(want[1]) == {"prompt": [{"role": "user", "content": "q1"}],
                                   "completion": [{"role": "assistant", "content": "a1"}], "label": True}
