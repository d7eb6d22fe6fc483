"""Preference data in every dataset version (issue 12), on real files and a real state database: the KTO and DPO
files and their formats, corrections through the real CLI, the bad inputs, deletion, one split for every kind, and
the first version of each example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, fb, feedback_file, logs_file, rec, write_lines

from daemon import api, cli
from daemon.dataset import builder as dataset
from daemon.dataset.examples import split_bucket
from daemon.demo.storegen import generate_store
from daemon.state import State

PREF_FILES = ("prefs_train.jsonl", "prefs_eval.jsonl", "pairs_train.jsonl", "pairs_eval.jsonl",
              "prefs_train_ids.tsv", "pairs_train_ids.tsv")
SMALL = {"min_train_examples": 1, "min_eval_examples": 1}


def lines(p: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines()]


def compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def ids(path: Path, name: str) -> list[tuple[str, int]]:
    return dataset.read_train_ids(path, name)


def cfg_file(tmp_path: Path, store: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: {tmp_path / 'st'}\n"
                   "dataset:\n  min_train_examples: 1\n  min_eval_examples: 1\n")
    return cfg


def run_cli(cfg: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), *argv], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def test_formats_and_counts_match_a_generated_store(store: Path, make_settings: Any) -> None:
    truth = generate_store(store, 240, days=2, seed=7)
    s = make_settings()
    with State(s.state_dir()) as st:
        r = api.build_dataset(s, st)
    assert r.created and r.path is not None and dataset.verify(r.path) == []
    up = {c for c, v in truth.conversations.items() if v > 0}
    down = {c for c, v in truth.conversations.items() if v < 0}
    assert up and down
    prefs: dict[str, dict[str, Any]] = {}
    for name in ("prefs_train.jsonl", "prefs_eval.jsonl"):
        raw = (r.path / name).read_text(encoding="utf-8").splitlines()
        for text in raw:
            obj = json.loads(text)
            assert text == compact(obj)  # compact, like the SFT lines
            assert list(obj) == ["prompt", "completion", "label"] and type(obj["label"]) is bool
            assert [m["role"] for m in obj["prompt"]] == ["user"]
            assert len(obj["completion"]) == 1 and list(obj["completion"][0]) == ["role", "content"]
            assert obj["completion"][0]["role"] == "assistant"
        prefs.update({str(i): obj for i, obj in enumerate(map(json.loads, raw), start=len(prefs))})
    train_ids = [cid for cid, _ in ids(r.path, "prefs_train_ids.tsv")]
    eval_n = len(lines(r.path / "prefs_eval.jsonl"))
    assert len(train_ids) == len(lines(r.path / "prefs_train.jsonl")) and len(prefs) == len(train_ids) + eval_n
    assert sum(o["label"] for o in prefs.values()) == len(up) == r.desirable
    assert sum(not o["label"] for o in prefs.values()) == len(down) == r.undesirable
    assert r.pairs == 0 and (r.path / "pairs_train.jsonl").read_bytes() == b""
    # a desirable example is its SFT example, cut before the last assistant turn
    sft = {compact(x["messages"]) for x in lines(r.path / "train.jsonl") + lines(r.path / "eval.jsonl")}
    assert {compact(o["prompt"] + o["completion"]) for o in prefs.values() if o["label"]} == sft
    man = json.loads((r.path / "manifest.json").read_text())
    pc = man["counts"]["preference"]
    assert pc["train"]["desirable"] + pc["eval"]["desirable"] == len(up)
    assert pc["train"]["undesirable"] + pc["eval"]["undesirable"] == len(down)
    assert pc["train"]["pairs"] == pc["eval"]["pairs"] == 0
    assert man["rejections"] == [] and man["counts"]["rejections_by_reason"] == {}
    assert all(man["files"][name] for name in PREF_FILES)
    assert all(((r.path / f).stat().st_mode & 0o777) == 0o600 for f in PREF_FILES)


def test_a_correction_through_the_real_cli_makes_a_pair(store: Path, tmp_path: Path) -> None:
    cfg = cfg_file(tmp_path, store)
    write_lines(logs_file(store), [rec(f"g{i:04d}", quality="good", answer=f"fine answer {i}") for i in range(6)]
                + [rec("d0001", user="How do I reverse a list?", answer="Use xs.sort().")])
    better = 'Use xs[::-1] for a copy or xs.reverse() in place — "é😀"\nthat is all.'
    done = run_cli(cfg, "feedback", "d0001", "--down", "--better", better)
    assert done.returncode == 0, done.stderr
    event = lines(next((store / "feedback").iterdir()))[0]
    assert event["thumbs_up"] is False and event["better"] == better
    out = run_cli(cfg, "dataset", "build", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["desirable"], result["undesirable"], result["pairs"]) == (6, 1, 1)
    path = Path(result["path"])
    pairs = lines(path / "pairs_train.jsonl") + lines(path / "pairs_eval.jsonl")
    assert pairs == [{"prompt": [{"role": "user", "content": "How do I reverse a list?"}],
                      "chosen": [{"role": "assistant", "content": better}],
                      "rejected": [{"role": "assistant", "content": "Use xs.sort()."}]}]
    kto = [o for o in lines(path / "prefs_train.jsonl") + lines(path / "prefs_eval.jsonl") if not o["label"]]
    assert kto == [{"prompt": [{"role": "user", "content": "How do I reverse a list?"}],
                    "completion": [{"role": "assistant", "content": "Use xs.sort()."}], "label": False}]
    in_train = "d0001" in {cid for cid, _ in ids(path, "pairs_train_ids.tsv")}
    assert in_train == bool(lines(path / "pairs_train.jsonl"))
    text = run_cli(cfg, "dataset", "build")
    assert text.returncode == 0 and "6 desirable, 1 undesirable, 1 pairs" in text.stdout
    # --better-file, read as UTF-8: a new correction is a new version
    (tmp_path / "answer.md").write_text("Use reversed(xs) — lazily.\n", encoding="utf-8")
    assert run_cli(cfg, "feedback", "d0001", "--down", "--better-file", str(tmp_path / "answer.md")).returncode == 0
    again = json.loads(run_cli(cfg, "dataset", "build", "--json").stdout)
    assert again["created"] and again["version"] == 2
    pairs = lines(Path(again["path"]) / "pairs_train.jsonl") + lines(Path(again["path"]) / "pairs_eval.jsonl")
    assert [p["chosen"][0]["content"] for p in pairs] == ["Use reversed(xs) — lazily.\n"]


def test_bad_corrections_are_refused_by_the_cli_with_one_line(store: Path, tmp_path: Path) -> None:
    cfg = cfg_file(tmp_path, store)
    cfg.write_text(cfg.read_text().replace("store:\n", "store:\n  max_line_bytes: 2000\n", 1))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        (("--up", "--better", "x"), "goes with a thumbs-down (--down) only"),
        (("--quality", "poor", "--better", "x"), "goes with a thumbs-down (--down) only"),
        (("--down", "--better", "  \n "), "the correction (--better) is empty"),
        (("--down", "--better", "é" * 400), "over store.max_line_bytes (2000)"),
        (("--down", "--better-file", str(tmp_path / "latin1.txt")), "is not UTF-8"),
        (("--down", "--better-file", str(tmp_path / "missing.txt")), "cannot read"),
    ]
    for argv, reason in cases:
        done = run_cli(cfg, "feedback", "a1b2c3d4e5f6", *argv)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1 and reason in err[0], (argv, done.stderr)
        assert err[0].startswith("chatos-retrain: feedback not recorded: ")
    assert not list((store / "feedback").iterdir())  # nothing was written
    assert run_cli(cfg, "feedback", "a1b2c3d4e5f6", "--down", "--better", "é" * 300).returncode == 0  # it fits


def test_bad_corrections_in_the_sidecar_reach_the_manifest_rejections(store: Path, make_settings: Any) -> None:
    s = make_settings(dataset=SMALL)
    write_lines(logs_file(store), [rec(f"r{i:04d}", answer=f"answer {i}") for i in range(6)]
                + [rec("gone0001", answer="gone")])
    events = [
        {**fb("r0000", thumbs_up=True), "better": "up-voted, so not a correction"},
        {**fb("r0001", thumbs_up=None, quality="poor"), "better": "a rating is no thumbs-down"},
        {**fb("r0002", thumbs_up=False), "better": "  ANSWER   2 "},
        {**fb("r0003", thumbs_up=False), "better": " \t "},
        {**fb("r0004", thumbs_up=False), "better": "a real correction"},
        fb("r0005", thumbs_up=True),
        {**fb("gone0001", thumbs_up=True), "better": "deleted: never listed"},
    ]
    write_lines(feedback_file(store), events)
    with State(s.state_dir()) as st:
        api.ingest(s, st)
        with st.transaction():
            st.conversations.mark_deleted("gone0001")
        r = api.build_dataset(s, st, ingest_first=False)
    man = r.manifest or {}
    assert man["rejections"] == [
        {"conversation_id": "r0000", "reason": "correction without a thumbs-down"},
        {"conversation_id": "r0001", "reason": "correction without a thumbs-down"},
        {"conversation_id": "r0002", "reason": "chosen and rejected are identical after normalisation"},
        {"conversation_id": "r0003", "reason": "the correction is empty"},
    ]
    assert man["counts"]["rejections_by_reason"] == {
        "chosen and rejected are identical after normalisation": 1, "correction without a thumbs-down": 2,
        "the correction is empty": 1}
    assert (r.desirable, r.undesirable, r.pairs) == (2, 4, 1)  # the feedback itself still counts
    assert r.path is not None and dataset.verify(r.path) == []
    # a line over store.max_line_bytes never gets in: ingest rejects it as it does any long line
    s2 = make_settings(dataset=SMALL, store={"max_line_bytes": 300})
    write_lines(feedback_file(store, "2026-11-26"), [{**fb("r0005", thumbs_up=False), "better": "x" * 400}])
    with State(s2.state_dir()) as st:
        report = api.ingest(s2, st)
        assert report.rejected >= 1 and st.feedback.corrections().get("r0005") is None


def test_latest_thumbs_vote_decides_the_correction_and_since_follows(store: Path, make_settings: Any) -> None:
    s = make_settings(dataset={**SMALL, "eval_fraction": 0.0})
    write_lines(logs_file(store), [rec(f"u{i:04d}", quality="good", answer=f"answer {i}") for i in range(4)]
                + [rec("d0001", answer="wrong"), rec("d0002", answer="also wrong")])
    fbf = feedback_file(store)

    def vote(cid: str, thumbs: bool | None, hour: int, better: str | None = None, quality: str | None = None) -> None:
        ev = fb(cid, thumbs_up=thumbs, quality=quality, ts=f"2026-11-25T{hour:02d}:00:00")
        write_lines(fbf, [ev if better is None else {**ev, "better": better}])

    def pairs(path: Path) -> dict[str, str]:
        got = [cid for cid, _ in ids(path, "pairs_train_ids.tsv")]
        return dict(zip(got, [p["chosen"][0]["content"] for p in lines(path / "pairs_train.jsonl")], strict=True))

    with State(s.state_dir()) as st:
        vote("d0001", False, 1, "right one")
        vote("d0002", False, 1, "right two")
        v1 = api.build_dataset(s, st)
        assert v1.path and pairs(v1.path) == {"d0001": "right one", "d0002": "right two"}
        assert api.build_dataset(s, st).created is False  # nothing changed
        vote("d0001", None, 2, quality="good")  # a rating leaves the thumbs vote and its correction
        vote("d0002", True, 2)  # a later thumbs-up clears it
        v2 = api.build_dataset(s, st)
        assert v2.version == 2 and v2.path and pairs(v2.path) == {"d0001": "right one"}
        assert dict(ids(v2.path, "pairs_train_ids.tsv")) == {"d0001": 1}  # carried forward
        prefs2 = dict(ids(v2.path, "prefs_train_ids.tsv"))
        assert prefs2["d0002"] == 2 and prefs2["d0001"] == 1  # d0002's label flipped: new again
        assert all(v == 1 for cid, v in prefs2.items() if cid.startswith("u"))
        vote("d0001", False, 3)  # a thumbs-down without a correction leaves none
        v3 = api.build_dataset(s, st)
        assert v3.version == 3 and v3.path and pairs(v3.path) == {}
        assert dict(ids(v3.path, "prefs_train_ids.tsv"))["d0001"] == 1  # still undesirable, as in v1
        vote("d0001", False, 4, "right again")
        v4 = api.build_dataset(s, st)
        assert v4.path and dict(ids(v4.path, "pairs_train_ids.tsv")) == {"d0001": 4}
        assert (v4.desirable, v4.undesirable, v4.pairs) == (5, 1, 1)
        for v in (v1, v2, v3, v4):
            assert v.path and dataset.verify(v.path) == []
            assert len(ids(v.path, "prefs_train_ids.tsv")) == len(lines(v.path / "prefs_train.jsonl"))


def test_a_new_thumbs_down_alone_makes_a_new_version(store: Path, make_settings: Any) -> None:
    s = make_settings(dataset=SMALL)
    write_lines(logs_file(store), [rec(f"u{i:04d}", quality="good", answer=f"answer {i}") for i in range(4)]
                + [rec("n0001", answer="meh")])
    with State(s.state_dir()) as st:
        v1 = api.build_dataset(s, st)
        write_lines(feedback_file(store), [fb("n0001", thumbs_up=False)])
        v2 = api.build_dataset(s, st)
        assert v2.created and v2.version == 2 and (v2.undesirable, v1.undesirable) == (1, 0)
        assert v2.train_count == v1.train_count and v2.manifest and v1.manifest
        assert v2.manifest["content_hash"] == v1.manifest["content_hash"]  # the SFT files are the same
        again = api.build_dataset(s, st)
        assert not again.created and (again.desirable, again.undesirable) == (v2.desirable, 1)


def test_a_deleted_conversation_leaves_the_preference_files(store: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    cfg = cfg_file(tmp_path, store)
    write_lines(logs_file(store), [rec(f"k{i:04d}", quality="good", answer=f"k{i}") for i in range(5)]
                + [rec("bad00001", answer="hushhush wrong answer")])
    write_lines(feedback_file(store), [{**fb("bad00001", thumbs_up=False), "better": "hushhush right answer"}])
    assert cli.main(["--config", str(cfg), "dataset", "build"]) == 0
    v1 = tmp_path / "st" / "datasets" / "v1"
    assert "hushhush" in "".join((v1 / n).read_text() for n in PREF_FILES)
    capsys.readouterr()
    assert cli.main(["--config", str(cfg), "forget", "bad00001", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["datasets_with_it"] == [1] and out["rebuilt"]["version"] == 2 and out["rebuilt"]["pairs"] == 0
    v2 = tmp_path / "st" / "datasets" / "v2"
    text = "".join((v2 / n).read_text() for n in (*PREF_FILES, "train.jsonl", "eval.jsonl", "manifest.json"))
    assert "hushhush" not in text and "bad00001" not in text
    assert dataset.verify(v2) == []


def test_a_conversation_in_eval_is_in_eval_for_every_kind(store: Path, make_settings: Any) -> None:
    # min_eval_examples larger than the bucket rule gives: the SFT split pins more, and every kind follows the pins
    s = make_settings(dataset={"min_train_examples": 1, "min_eval_examples": 8, "eval_fraction": 0.05})
    recs = [rec(f"e{i:04d}", quality="good", answer=f"good {i}") for i in range(20)]
    recs += [rec(f"f{i:04d}", answer=f"bad {i}") for i in range(20)]
    write_lines(logs_file(store), recs)
    write_lines(feedback_file(store), [{**fb(f"f{i:04d}", thumbs_up=False), "better": f"fixed {i}"}
                                       for i in range(20)] + [fb(f"e{i:04d}", thumbs_up=True) for i in range(10)])
    with State(s.state_dir()) as st:
        r = api.build_dataset(s, st)
        pins = st.datasets.eval_pins()
        members = {row[0]: row[1] for row in st.conn.execute(
            "SELECT cid, split FROM dataset_members WHERE version = 1")}
        pref_members = list(st.conn.execute("SELECT split, cid FROM preference_members WHERE version = 1"))
    assert r.path is not None and r.eval_count >= 8 and pins
    eval_ids = {cid for cid, split in members.items() if split == "eval"}
    train_ids = {cid for cid, split in members.items() if split == "train"}
    assert pins <= eval_ids
    bucket_eval = {c for c in [x["conversation_id"] for x in recs]
                   if c in pins or split_bucket(c) < 0.05}
    for split, cid in pref_members:
        assert split.endswith("_eval") == (cid in bucket_eval), (split, cid)
        if cid in eval_ids:
            assert split.endswith("_eval")
        if cid in train_ids:
            assert split.endswith("_train")
    assert len(pref_members) == 20 + 20 + 20  # 20 desirable, 20 undesirable, 20 pairs
    assert len(lines(r.path / "pairs_eval.jsonl")) == sum(1 for sp, _ in pref_members if sp == "pairs_eval")
    assert len(lines(r.path / "prefs_eval.jsonl")) == sum(1 for sp, _ in pref_members if sp == "prefs_eval")


def test_filters_apply_to_preference_data(store: Path, make_settings: Any) -> None:
    s = make_settings(dataset={**SMALL, "modes": ["normal"]})
    sys_rec = rec("s0001", answer="with a system prompt", quality="poor")
    sys_rec["messages"].insert(0, {"role": "system", "content": "You are terse."})
    write_lines(logs_file(store), [rec(f"u{i:04d}", quality="good", answer=f"u{i}") for i in range(4)]
                + [sys_rec, rec("c0001", answer="code mode", quality="poor", mode="code"),
                   rec("z0001", answer="mail me at someone@example.com", quality="failed")])
    with State(s.state_dir()) as st:
        r = api.build_dataset(s, st)
    assert r.path is not None and (r.desirable, r.undesirable) == (4, 2)
    kto = {o["completion"][0]["content"]: o for o in
           lines(r.path / "prefs_train.jsonl") + lines(r.path / "prefs_eval.jsonl")}
    assert "code mode" not in kto  # modes filter
    assert [m["role"] for m in kto["with a system prompt"]["prompt"]] == ["user"]  # include_system: false
    assert not any("someone@example.com" in c for c in kto)  # PII scrubbed
