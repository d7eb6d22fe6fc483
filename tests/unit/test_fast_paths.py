"""The fast paths of ingest and dataset builds against their plain definitions, on damaged input, with and without
orjson (a dependency; the code falls back to json when it cannot be imported)."""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from daemon import codec
from daemon.dataset import examples, manifest, pii
from daemon.dataset import selection as dataset
from daemon.ingest import blocks, fast_paths, records, tail

ODD: list[Any] = [None, True, False, 0, 1.5, "", " ", "x", "GOOD ", "Excellent", "stellar", [], {}, ["a"], {"a": 1},
                  "\ud800", "\udc00x", "é😀", "a\u0000b", 10**20, "  \n", "unrated", "2026-13-01T00:00:00.000000",
                  "2026-11-25T10:00:00", "2026-11-25T10:00:00.000000", "2026-11-25T10:00:00+02:00", "٢٠٢٦-11-25"]


@pytest.fixture(params=["orjson", "json"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "json":
        monkeypatch.setattr(fast_paths, "_orjson_loads", None)
        monkeypatch.setattr(codec, "orjson_dumps", None)
    else:
        assert fast_paths._orjson_loads is not None, "orjson is a dependency: it should be installed"
    yield request.param


def _damage(rng: random.Random, where: list[dict[str, Any]]) -> None:
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        target = rng.choice(where)
        key = rng.choice([*target, "messages", "metadata", "role", "content", "thumbs_up", "quality", "timestamp"])
        if rng.random() < 0.15:
            target.pop(key, None)
        else:
            target[key] = rng.choice(ODD)


def _encode(rng: random.Random, obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.05:
        text = rng.choice(["", " ", "\ufeff"]) + text + rng.choice(["", " ", "\t", " x"])
    raw = text.encode("utf-8", "surrogatepass")
    return raw[: rng.randint(0, len(raw))] if rng.random() < 0.02 else raw


def conversation_line(rng: random.Random, kind: str) -> bytes:
    """A valid record of ``kind``, usually with a little damage: a wrong type, a missing or odd field, an escape."""
    msgs: list[Any] = [{"role": r, "content": rng.choice(["hi", "line\nnext", "😀 \u2028 é", "x" * 50, "\ud83d"])}
                       for r in rng.choice([["user", "assistant"], ["system", "user", "assistant"], ["user"]])]
    if rng.random() < 0.5:
        msgs[-1]["model"] = rng.choice(["qwen2.5:7b", None, 3, "m\udfff"])
    base = {"conversation_id": rng.choice(["a1b2c3d4e5f6", "id:with.ok_chars-1", "Z" * 128, "bad id"]),
            "mode": rng.choice(["normal", "code", None, ""]), "quality": rng.choice(["good", " Poor ", None, "odd"]),
            "thumbs_up": rng.choice([True, False, None])}
    if kind == "logs":
        obj: Any = {"messages": msgs, "chosen_model": rng.choice(["llama3:8b", None]),
                    "started_at": rng.choice(["2026-01-01T10:00:00", None]), **base}
        where = [obj, obj, *msgs]
    else:
        meta = {"model": rng.choice(["llama3:8b", None]), "timestamp": rng.choice(["2026-01-01T10:00:00", None]),
                **base}
        obj = {"messages": msgs, "metadata": meta}
        where = [meta, obj, *msgs]
    _damage(rng, where)
    return _encode(rng, rng.choice(ODD) if rng.random() < 0.02 else obj)


def feedback_line(rng: random.Random) -> bytes:
    ev: dict[str, Any] = {"conversation_id": "a1b2c3d4e5f6", "thumbs_up": rng.choice([True, False, None]),
                          "quality": rng.choice(["good", " Poor ", None]), "feedback": rng.choice([None, "note"]),
                          "timestamp": rng.choice(["2026-11-25T10:00:00.000000", "2026-11-25T10:00:00"])}
    if rng.random() < 0.3:
        ev["better"] = rng.choice(["the right answer", "", 5, None, ["x"], "é😀"])
    _damage(rng, [ev])
    return _encode(rng, ev)


def test_parse_block_matches_the_careful_parser(decoder: str) -> None:
    rng = random.Random(11)
    fast = slow = 0
    for _ in range(6000):
        kind = rng.choice(["logs", "training", "feedback"])
        raw = feedback_line(rng) if kind == "feedback" else conversation_line(rng, kind)
        got = blocks.parse_block([raw], kind)[0]  # type: ignore[arg-type]
        if kind == "feedback":
            ev = records.parse_feedback(raw)
            if isinstance(ev, records.Rejection):
                assert got == records.Rejected(ev.reason, records.line_hash(raw)), raw
            else:
                assert type(got) is tuple and got[:4] == (ev.conversation_id, ev.thumbs_up, ev.quality, ev.note), raw
                assert got[5] == ev.score and (ev.timestamp is None or got[4] == ev.timestamp), raw
                assert got[6] == ev.better, raw
            continue
        want = records.parse_conversation(raw, kind)  # type: ignore[arg-type]
        if isinstance(want, records.Rejection):
            assert got == records.Rejected(want.reason, records.line_hash(raw)), raw
            slow += 1
            continue
        fast += 1
        f = records.fields_of(want)
        assert got == (f.conversation_id, codec.messages_json(f.messages), f.mode, f.model, f.quality, f.thumbs_up,
                       want.inline_score, want.inline_rated, f.usable, f.started_at), raw
    assert fast > 1000 and slow > 1000  # both kinds of line were exercised


def test_stored_messages_are_compact_json_with_or_without_orjson(decoder: str) -> None:
    rng = random.Random(3)
    chars = ["a", " ", "\n", '"', "\\", "é", "😀", "\x00", "\x1f", "\x7f", "\u2028", "\t", "/", "<"]
    for _ in range(3000):
        pairs = [(rng.choice(["user", "assistant", "system"]), "".join(rng.choices(chars, k=rng.randint(0, 12))))
                 for _ in range(rng.randint(1, 3))]
        want = json.dumps([{"role": r, "content": c} for r, c in pairs], ensure_ascii=False, separators=(",", ":"))
        assert codec.messages_json(pairs) == want
        line = dataset._encode(pairs)
        assert json.loads(line) == {"messages": [{"role": r, "content": c} for r, c in pairs]}
        assert line == b'{"messages":' + want.encode() + b"}\n"


def _plain_dedup_key(messages: list[tuple[str, str]]) -> str:
    return json.dumps([[r, " ".join(c.split()).casefold()] for r, c in messages], ensure_ascii=False)


def test_dedup_digest_groups_exactly_as_the_plain_definition() -> None:
    rng = random.Random(5)
    words = ["Hi", "hi", "HI", "ß", "SS", "ss", "a b", "", " ", "\t", "\n", "\x00", "\x01", "\x00 \x01", "\u2003",
             "\x1c", "user", "assistant"]
    seen: dict[str, bytes] = {}
    inverse: dict[bytes, str] = {}
    prekeys: dict[str, bytes] = {}
    for _ in range(20000):
        msgs = [(rng.choice(["user", "assistant", "system"]), "".join(rng.choices(words, k=rng.randint(0, 4))))
                for _ in range(rng.randint(1, 3))]
        plain, digest = _plain_dedup_key(msgs), dataset._dedup_digest(msgs)
        assert seen.setdefault(plain, digest) == digest, msgs  # same normal form -> same key
        assert inverse.setdefault(digest, plain) == plain, msgs  # same key -> same normal form
        prekey = examples.dedup_prekey(msgs)
        assert prekeys.setdefault(plain, prekey) == prekey, msgs  # same normal form -> same pre-key
    assert len(seen) > 2000
    assert len(set(prekeys.values())) > len(seen) // 2  # and the pre-key still tells most apart


def test_dedup_keeps_one_per_normal_form() -> None:
    """_dedup (pre-key groups, then the full key inside them, the full key read back from a cached line when the
    example has no messages) against the plain rule: per normal form, an id in keep_first, else the smallest id."""
    rng = random.Random(8)
    texts = ["Hi there", "hi  there", "HI THERE ", "Hi\tthere", "Hithere", "hi there!", "ß", "ss", "SS", "K", "\u212a"]
    for _ in range(3000):
        cands = []
        for i in range(rng.randint(0, 12)):
            msgs = (("user", rng.choice(texts)), ("assistant", rng.choice(texts[:3])))
            cached = rng.random() < 0.5
            cands.append(dataset.Example(
                f"c{i:02d}", () if cached else msgs, "normal", None, 1, "/p", 0, 1,
                examples.encode_line(msgs) if cached else b"", examples.dedup_prekey(msgs) if cached else b""))
        keep = set(rng.sample([e.cid for e in cands], min(len(cands), rng.randint(0, 2))))
        best: dict[str, dataset.Example] = {}
        removed = 0
        for ex in sorted(cands, key=lambda e: (e.cid not in keep, e.cid)):
            norm = _plain_dedup_key(list(ex.messages or examples.line_messages(ex.line)))
            if norm in best:
                removed += 1
            else:
                best[norm] = ex
        sel = dataset.Selection([])
        dataset._dedup(cands, keep, sel)
        assert [e.cid for e in sel.examples] == sorted(e.cid for e in best.values())
        assert sel.duplicates_removed == removed


def test_pii_hint_check_on_bytes_never_skips_a_match() -> None:
    """may_contain(bytes) False -> scrubbing any message of that JSON changes nothing (and it agrees with the text
    form, which also names "xox" without its "-")."""
    rng = random.Random(9)
    jwt = "eyJ" + "a" * 12 + "." + "b" * 12 + "." + "c" * 12
    bits = ["hello ", "a@b.co ", "555-123-4567 ", "10.0.0.1 ", "sk-" + "a" * 24, " Bearer abcdefghijklmnopqr",
            "token=abcdefghij", "AKIA" + "A" * 16, "AIza" + "a" * 35, jwt,
            "xox", "xoxb-1234567890", "glpat-" + "a" * 20, "é", "\n", "_", "=", "-", "K", "z", "J", "B", "٣"]
    all_kinds = sorted(pii.PLACEHOLDER)
    misses = 0
    for _ in range(5000):
        msgs = [{"role": "user", "content": "".join(rng.choices(bits, k=rng.randint(0, 4)))}]
        text = json.dumps(msgs, ensure_ascii=False, separators=(",", ":"))
        kinds = rng.sample(all_kinds, rng.randint(0, 4))
        as_bytes = pii.may_contain(text.encode(), kinds)
        if not as_bytes:
            misses += 1
            counts: Counter[str] = Counter()
            assert pii.scrub(msgs[0]["content"], kinds, counts) == msgs[0]["content"] and not counts, (msgs, kinds)
        if "xox" not in text:
            assert as_bytes == pii.may_contain(text, kinds), (text, kinds)
    assert misses > 200


def test_manifest_byte_ranges_cover_exactly_the_records() -> None:
    rng = random.Random(4)
    for _ in range(3000):
        exs = [dataset.Example("c", (), "m", None, 1, rng.choice(["/a", "/b"]), rng.randint(0, 60), rng.randint(0, 9))
               for _ in range(rng.randint(0, 12))]
        out = manifest._ranges(exs)
        assert [src["path"] for src in out] == sorted({e.src_path for e in exs})
        for src in out:
            mine = [(e.src_offset, e.src_offset + e.src_len) for e in exs if e.src_path == src["path"]]
            ranges = src["byte_ranges"]
            assert src["records"] == len(mine)
            assert all(any(a <= s and e <= b for a, b in ranges) for s, e in mine)  # every record inside a range
            assert all(ranges[i][1] + 1 < ranges[i + 1][0] for i in range(len(ranges) - 1))  # apart by > a newline
            assert all((a, b) in {(s, max(e2 for s2, e2 in mine if a <= s2 <= b)) for s, _ in mine if s == a}
                       for a, b in ranges)  # each range starts at a record and ends where its last record ends


def _plain_lines(data: bytes, start: int, start_line: int, cap: int) -> list[tuple[int, int, bytes | int]]:
    """(number, offset, line, or its length when over ``cap``) of every complete line from ``start``."""
    out: list[tuple[int, int, bytes | int]] = []
    *complete, _partial = data[start:].split(b"\n")
    pos, number = start, start_line
    for line in complete:
        number += 1
        out.append((number, pos, line if len(line) <= cap else len(line)))
        pos += len(line) + 1
    return out


@pytest.mark.parametrize("chunk", [7, 64, 4096, tail.CHUNK])
def test_read_blocks_yields_every_complete_line_once(chunk: int, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    """read_blocks against splitting the whole file: the same numbers, offsets and bytes, lines over the cap as
    their length, the partial last line held back, whatever the chunk boundaries."""
    monkeypatch.setattr(tail, "CHUNK", chunk)
    rng = random.Random(chunk)
    for i in range(150):
        lines = [b"x" * rng.choice([0, 1, 5, 50, 300, 3000, 70000]) for _ in range(rng.randint(0, 30))]
        data = b"\n".join(lines) + rng.choice([b"", b"\n", b"partial"])
        path = tmp_path / f"f{i}"
        path.write_bytes(data)
        start = rng.choice([0, 0, data.find(b"\n") + 1])
        cap = rng.choice([10, 100, 4000, 1 << 20])
        fd = os.open(path, os.O_RDONLY)
        try:
            got: list[tuple[int, int, bytes | int]] = []
            for b in tail.read_blocks(fd, start, 3, cap):
                if isinstance(b, tail.Oversize):
                    got.append(tuple(b))  # type: ignore[arg-type]
                    continue
                off = b.offset
                for j, line in enumerate(b.lines):
                    got.append((b.first + j, off, line))
                    off += len(line) + 1
        finally:
            os.close(fd)
        assert got == _plain_lines(data, start, 3, cap), (chunk, i, start, cap)
