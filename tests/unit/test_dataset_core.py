"""Pure dataset core: filters, dedup, split stability, PII scrub, fingerprint."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.dataset import pii
from daemon.dataset.manifest import fingerprint
from daemon.dataset.selection import Example, dedup_key, select, split, split_bucket
from daemon.settings import DatasetSettings
from daemon.state import Eligible


def row(cid: str, user: str = "q", answer: str = "a", system: str | None = None, score: int = 1) -> Eligible:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return Eligible(cid, json.dumps(msgs), "normal", "qwen2.5:7b", score, True, "/s/logs/x.jsonl", 0, 10)


def ex(cid: str) -> Example:
    return Example(cid, (("user", cid), ("assistant", "a")), "normal", None, 1, "/p", 0, 1)


# -- filters and dedup -------------------------------------------------------------------------------------


def test_system_messages_dropped_unless_configured() -> None:
    rows = [row("c1", system="You are terse.")]
    assert [m[0] for m in select(rows, DatasetSettings()).examples[0].messages] == ["user", "assistant"]
    kept = select(rows, DatasetSettings(include_system=True)).examples[0].messages
    assert [m[0] for m in kept] == ["system", "user", "assistant"]


def test_exact_duplicates_removed_on_normalised_whitespace_and_case() -> None:
    rows = [row("c2", "How  do I\nsort?", "Use sorted()."), row("c1", "how do i sort?", "use   SORTED()."),
            row("c3", "how do i sort?", "Use sorted(xs).")]
    sel = select(rows, DatasetSettings())
    assert [e.cid for e in sel.examples] == ["c1", "c3"]
    assert sel.duplicates_removed == 1
    assert len(select(rows, DatasetSettings(dedup=False)).examples) == 3


def test_dedup_keeps_previous_member_so_the_kept_copy_does_not_flip() -> None:
    rows = [row("b", "same", "same"), row("a", "same", "same")]
    assert [e.cid for e in select(rows, DatasetSettings()).examples] == ["a"]
    assert [e.cid for e in select(rows, DatasetSettings(), keep_first={"b"}).examples] == ["b"]


def test_dedup_key_distinguishes_roles() -> None:
    assert dedup_key([("user", "x"), ("assistant", "y")]) != dedup_key([("user", "y"), ("assistant", "x")])
    assert dedup_key([("user", " X\t")]) == dedup_key([("user", "x")])


def test_pii_scrub_applied_and_counted() -> None:
    rows = [row("c1", "mail me at jane.doe@example.com or +1 415-555-0100", "key sk-abcdefghijklmnopqrstuvwx1234")]
    sel = select(rows, DatasetSettings())
    text = " ".join(c for _, c in sel.examples[0].messages)
    assert "jane.doe@example.com" not in text and "[EMAIL]" in text
    assert "[PHONE]" in text and "[SECRET]" in text
    assert sel.pii_counts == Counter({"email": 1, "phone": 1, "secret": 1})
    off = select(rows, DatasetSettings(pii_scrub=False))
    assert "jane.doe@example.com" in off.examples[0].messages[0][1] and not off.pii_counts
    only_email = select(rows, DatasetSettings(pii_kinds=["email"]))
    assert "+1 415-555-0100" in only_email.examples[0].messages[0][1]


# -- PII patterns ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to bob@mail.example.org today", "email"),
        ("call (415) 555-0100", "phone"),
        ("call 415-555-0100", "phone"),
        ("call +44 20 7946 0958", "phone"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789AB", "secret"),
        ("AKIAABCDEFGHIJKLMNOP is my key", "secret"),
        ("Authorization: Bearer abcdefghijklmnop.qrstuvwx", "secret"),
        ("export OPENAI=sk-proj-abcdefghijklmnopqrstuvwxyz", "secret"),
        ("url?api_key=abcd1234efgh5678", "secret"),
        ("hf_abcdefghijklmnopqrstuvwxyz012345 leaked", "secret"),
        ("server at 192.168.1.20 is down", "ipv4"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIabc\n-----END RSA PRIVATE KEY-----", "secret"),
    ],
)
def test_pii_patterns_match(text: str, kind: str) -> None:
    counts: Counter[str] = Counter()
    out = pii.scrub(text, pii.PLACEHOLDER, counts)
    assert pii.PLACEHOLDER[kind] in out
    assert counts[kind] >= 1


@pytest.mark.parametrize(
    "text",
    [
        "use python 3.11.7 and numpy 1.26",
        "the answer is 4155550100",
        "range(10, 20, 2)",
        "version 1.2.3.4.5",
        "x = 999.1.1.1",
        "arr[2024] = 12",
        "def f(a, b): return a @ b",
    ],
)
def test_pii_leaves_ordinary_text_alone(text: str) -> None:
    counts: Counter[str] = Counter()
    assert pii.scrub(text, pii.PLACEHOLDER, counts) == text
    assert not counts


# -- split -------------------------------------------------------------------------------------------------


def test_pii_multi_character_hints_match_the_secret_hints() -> None:
    """may_contain's byte-level gate (_MULTI_HINTS) names exactly the longer secret hints: one missing there would
    let a secret that holds only it skip the scrub. (Was an import-time assert in pii.py.)"""
    assert {h.decode() for _, hs in pii._MULTI_HINTS for h in hs} == {h for h in pii._SECRET_HINTS if len(h) > 1}


def test_split_bucket_is_stable_and_uniform_enough() -> None:
    assert split_bucket("a1b2c3d4e5f6") == split_bucket("a1b2c3d4e5f6")
    buckets = [split_bucket(f"{i:012x}") for i in range(5000)]
    assert all(0 <= b < 1 for b in buckets)
    assert 0.08 < sum(b < 0.1 for b in buckets) / 5000 < 0.12


@settings(max_examples=60, deadline=None)
@given(n=st.integers(20, 200), extra=st.integers(1, 200), frac=st.sampled_from([0.05, 0.1, 0.3]))
def test_an_example_never_moves_between_train_and_eval_as_the_store_grows(n: int, extra: int, frac: float) -> None:
    first = [ex(f"{i:012x}") for i in range(n)]
    train1, eval1, pins = split(first, frac, 2, set())
    grown = first + [ex(f"{i:012x}") for i in range(n, n + extra)]
    train2, eval2, _ = split(grown, frac, 2, pins)
    assert {e.cid for e in train1} <= {e.cid for e in train2}
    assert {e.cid for e in eval1} <= {e.cid for e in eval2}


def test_min_eval_is_topped_up_with_pins() -> None:
    exs = [ex(f"{i:012x}") for i in range(6)]
    train, evals, pins = split(exs, 0.0, 3, set())
    assert len(evals) == 3 and len(train) == 3 and len(pins) == 3
    assert {e.cid for e in evals} == pins
    # pins keep them in eval later even though their bucket says train
    _train2, evals2, pins2 = split([*exs, ex("ffffffffffff")], 0.0, 3, pins)
    assert {e.cid for e in evals2} == pins and not pins2


def test_fingerprint_changes_with_content_filters_and_split() -> None:
    a, b = [ex("a"), ex("b")], [ex("c")]
    base = fingerprint(a, b, DatasetSettings())
    assert base == fingerprint(list(a), list(b), DatasetSettings())
    assert base != fingerprint(a[:1], b, DatasetSettings())
    assert base != fingerprint(b, a, DatasetSettings())
    assert base != fingerprint(a, b, DatasetSettings(min_score=0))
