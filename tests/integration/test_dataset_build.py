"""Dataset versions on real files: format, manifest, idempotence, stability, atomicity, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import fb, feedback_file, logs_file, rec, write_lines

from daemon import api, cli
from daemon.dataset import builder as dataset
from daemon.dataset.builder import DatasetError
from daemon.demo.storegen import generate_store
from daemon.state import State


def build(s: Any, st: State) -> dataset.BuildResult:
    return api.build_dataset(s, st)


def read_jsonl(p: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_build_writes_messages_format_manifest_and_private_files(store: Path, make_settings: Any) -> None:
    truth = generate_store(store, 200, days=2, seed=7)
    s = make_settings()
    with State(s.state_dir()) as st:
        r = build(s, st)
    assert r.created and r.version == 1 and r.path == s.state_dir() / "datasets" / "v1"
    train, evals = read_jsonl(r.path / "train.jsonl"), read_jsonl(r.path / "eval.jsonl")
    assert len(train) == r.train_count and len(evals) == r.eval_count
    assert r.train_count + r.eval_count == len(truth.eligible())
    for line in train + evals:
        assert list(line) == ["messages"]
        assert [m["role"] for m in line["messages"]] == ["user", "assistant"]
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in line["messages"])
    man = json.loads((r.path / "manifest.json").read_text())
    assert man["version"] == 1 and man["counts"]["train"] == r.train_count
    assert set(man["counts"]["by_score"]) == {"1"}
    assert sum(man["counts"]["by_mode"].values()) == len(truth.eligible())
    assert man["filters"]["min_score"] == 1 and man["filters"]["pii_scrub"] is True
    assert man["sources"] and all(src["byte_ranges"] for src in man["sources"])
    assert dataset.verify(r.path) == []
    assert (r.path.stat().st_mode & 0o777) == 0o700
    assert all(((r.path / f).stat().st_mode & 0o777) == 0o600 for f in ("train.jsonl", "eval.jsonl", "manifest.json"))


def test_byte_ranges_point_at_the_source_records(store: Path, make_settings: Any) -> None:
    write_lines(logs_file(store), [rec(f"r0000000000{i}", quality="good", answer=f"answer {i}") for i in range(6)])
    s = make_settings()
    with State(s.state_dir()) as st:
        r = build(s, st)
    src = r.manifest["sources"][0]  # type: ignore[index]
    data = Path(src["path"]).read_bytes()
    for a, b in src["byte_ranges"]:
        for line in data[a:b].split(b"\n"):
            assert json.loads(line)["quality"] == "good"


def test_same_eligible_set_gives_no_new_version_then_new_data_does(store: Path, make_settings: Any) -> None:
    generate_store(store, 120, days=2, seed=1)
    s = make_settings()
    with State(s.state_dir()) as st:
        first = build(s, st)
        again = build(s, st)
        assert first.created and not again.created and again.version == 1
        assert "same as v1" in again.message
        write_lines(logs_file(store, "2026-11-25"), [rec("s00000000001", quality="excellent", answer="brand new")])
        second = build(s, st)
        assert second.created and second.version == 2
        v1 = {json.dumps(x) for x in read_jsonl(first.path / "train.jsonl")}  # type: ignore[operator]
        v2 = {json.dumps(x) for x in read_jsonl(second.path / "train.jsonl")}  # type: ignore[operator]
        e1 = {json.dumps(x) for x in read_jsonl(first.path / "eval.jsonl")}  # type: ignore[operator]
        e2 = {json.dumps(x) for x in read_jsonl(second.path / "eval.jsonl")}  # type: ignore[operator]
        assert v1 <= v2 and e1 <= e2 and not (v2 & e2)
        assert st.examples.eligible_counts(["normal", "code"], 1, False)["new_since_dataset"] == 0


def test_feedback_changes_the_eligible_set(store: Path, make_settings: Any) -> None:
    write_lines(logs_file(store), [rec(f"t0000000000{i}", quality="good", answer=f"a{i}") for i in range(8)])
    s = make_settings()
    with State(s.state_dir()) as st:
        assert build(s, st).train_count + build(s, st).eval_count == 8
        write_lines(feedback_file(store), [fb("t00000000003", False)])
        r = build(s, st)
        assert r.created and r.train_count + r.eval_count == 7


def test_deleted_conversation_never_reaches_a_dataset(store: Path, make_settings: Any) -> None:
    p = logs_file(store)
    write_lines(p, [rec(f"u0000000000{i}", quality="good", answer=f"a{i}") for i in range(8)])
    s = make_settings()
    with State(s.state_dir()) as st:
        build(s, st)
        lines = [ln for ln in p.read_text().splitlines(keepends=True) if "u00000000004" not in ln]
        p.write_text("".join(lines))
        r = build(s, st)
        text = (r.path / "train.jsonl").read_text() + (r.path / "eval.jsonl").read_text()  # type: ignore[operator]
        assert r.created and "a4" not in text.split('"') and r.train_count + r.eval_count == 7


def test_too_few_examples_is_a_clear_message_and_no_folder(store: Path, make_settings: Any) -> None:
    write_lines(logs_file(store), [rec("v00000000001", quality="good")])
    s = make_settings()
    with State(s.state_dir()) as st, pytest.raises(DatasetError, match="too few eligible examples: 1"):
        build(s, st)
    assert [p.name for p in (s.state_dir() / "datasets").iterdir() if not p.name.startswith(".lock")] == []


def test_include_unrated_and_min_score(store: Path, make_settings: Any) -> None:
    write_lines(logs_file(store), [rec(f"w0000000000{i}", quality=q, answer=f"a{i}") for i, q in
                                   enumerate(["good", "unrated", "acceptable", "poor", "good", "unrated",
                                              "excellent", "acceptable"])])
    for cfg, expected in [({}, 3), ({"min_score": 0}, 5), ({"min_score": 0, "include_unrated": True}, 7),
                          ({"min_score": -1, "include_unrated": True}, 8)]:
        s = make_settings(dataset={**cfg, "min_train_examples": 1, "min_eval_examples": 0})
        with State(s.state_dir()) as st:
            r = build(s, st)
            assert r.train_count + r.eval_count == expected, cfg


def test_modes_filter(store: Path, make_settings: Any) -> None:
    write_lines(logs_file(store), [rec(f"x0000000000{i}", quality="good", answer=f"a{i}",
                                       mode="code" if i % 2 else "normal") for i in range(8)])
    s = make_settings(dataset={"modes": ["code"], "min_train_examples": 1})
    with State(s.state_dir()) as st:
        r = build(s, st)
    assert r.train_count + r.eval_count == 4 and r.manifest["counts"]["by_mode"] == {"code": 4}  # type: ignore[index]


def test_interrupted_build_leaves_no_visible_version(
    store: Path, make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate_store(store, 120, days=2, seed=2)
    s = make_settings()
    with State(s.state_dir()) as st:
        # dies while writing files: only a temp folder remains
        real = dataset._write_private
        calls = {"n": 0}

        def dying_write(path: Path, chunks: Any) -> str:
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
            return real(path, chunks)

        monkeypatch.setattr(dataset, "_write_private", dying_write)
        with pytest.raises(OSError):
            build(s, st)
        monkeypatch.undo()
        assert st.datasets.all() == []
        # dies after the rename but before the state row commits: the folder exists but is not a version
        rename = os.rename

        def rename_then_die(src: Any, dst: Any) -> None:
            rename(src, dst)
            raise RuntimeError("killed")

        monkeypatch.setattr(dataset.os, "rename", rename_then_die)
        with pytest.raises(RuntimeError):
            build(s, st)
        monkeypatch.undo()
        assert st.datasets.all() == [] and (s.state_dir() / "datasets" / "v1").exists()
        r = build(s, st)
        assert r.created and r.version == 1 and dataset.verify(r.path) == []  # type: ignore[arg-type]
        names = sorted(p.name for p in (s.state_dir() / "datasets").iterdir())
        assert names == [".lock", "v1"]


def test_cli_dataset_build_json(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    generate_store(store, 100, days=2, seed=4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: st\n")
    assert cli.main(["--config", str(cfg), "dataset", "build", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["created"] is True and out["version"] == 1 and Path(out["path"]).is_absolute()
    assert out["train_count"] > 0 and out["eval_count"] >= 2
    assert cli.main(["--config", str(cfg), "dataset", "build", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["created"] is False
    assert cli.main(["--config", str(cfg), "dataset", "list", "--json"]) == 0
    assert [d["version"] for d in json.loads(capsys.readouterr().out)] == [1]
    assert cli.main(["--config", str(cfg), "dataset", "show", "v1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []
    assert cli.main(["--config", str(cfg), "dataset", "show", "7"]) == 3
    assert "no dataset v7" in capsys.readouterr().err


def test_cli_too_few_exits_3_with_one_line(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: st\n")
    assert cli.main(["--config", str(cfg), "dataset", "build"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("chatos-retrain: no dataset built: too few eligible examples")


def test_cli_feedback_appends_one_event_that_ingest_joins(store: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: st\n")
    write_lines(logs_file(store), [rec("y00000000001")])
    assert cli.main(["--config", str(cfg), "feedback", "y00000000001", "--up", "--note", "great"]) == 0
    assert cli.main(["--config", str(cfg), "feedback", "y00000000001", "--quality", "poor"]) == 0
    files = list((store / "feedback").iterdir())
    assert len(files) == 1
    events = read_jsonl(files[0])
    assert events[0]["thumbs_up"] is True and events[0]["feedback"] == "great" and events[1]["quality"] == "poor"
    capsys.readouterr()
    assert cli.main(["--config", str(cfg), "ingest"]) == 0
    assert cli.main(["--config", str(cfg), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out.split("\n", 1)[1])["store"]
    # thumbs up, then a "poor" rating: the thumbs vote decides (a rating never replaces it)
    assert status["last_ingest_at"] and status["feedback_events"] == 2 and status["conversations"]["eligible"] == 1
    assert cli.main(["--config", str(cfg), "feedback", "bad id!", "--up"]) == 2
    assert "not a valid id" in capsys.readouterr().err


def test_concurrent_feedback_appends_never_interleave(store: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: st\n")
    code = ("import sys\nfrom daemon import cli\n"
            "for i in range(40):\n"
            "    cli.main(['--config', sys.argv[1], 'feedback', f'{sys.argv[2]}{i:04d}', '--up',"
            " '--note', 'n' * 3000])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cfg), f"z{k}0000000"[:8]], stdout=subprocess.DEVNULL)
             for k in range(3)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = next((store / "feedback").iterdir()).read_text().splitlines()
    assert len(lines) == 120 and all(json.loads(x)["thumbs_up"] is True for x in lines)


def test_python_dash_m_daemon_is_the_cli(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "daemon", "--help"], capture_output=True, text=True, check=True)
    assert "chatos-retrain" in out.stdout and "dataset" in out.stdout
    env = {**os.environ, "CHATOS_RETRAIN_STATE__DIR": str(tmp_path / "s"),
           "CHATOS_RETRAIN_STORE__ROOT": str(tmp_path / "nostore")}
    out = subprocess.run([sys.executable, "-m", "daemon", "status", "--json"], capture_output=True, text=True,
                         env=env, check=True)
    assert json.loads(out.stdout)["store"]["files_tracked"] == 0


@pytest.mark.slow
def test_demo_command(tmp_path: Path) -> None:
    """The README's run command, one cycle: with the training stack installed it reaches a trained, exported model
    (registration pending: no Ollama answers here); without it, it stops at the dataset and says why."""
    import importlib.util

    out = subprocess.run([sys.executable, "-m", "daemon", "demo", "--dir", str(tmp_path / "demo"), "--records", "120",
                          "--once"], capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "CHATOS_RETRAIN_OLLAMA__HOST": "http://127.0.0.1:9"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "demo" / "state" / "datasets" / "v1" / "train.jsonl").stat().st_size > 0
    if all(importlib.util.find_spec(m) for m in ("torch", "transformers", "trl", "peft")):
        assert ": pending_registration: " in out.stdout and "promoted" in out.stdout, out.stdout
        assert "artifact kept, will retry" in out.stdout
        assert list((tmp_path / "demo" / "state" / "exports").glob("*/*.gguf"))
    else:
        assert "dataset v1 ready; training not configured" in out.stdout


def test_forget_deletes_for_good_rebuilds_and_names_what_saw_it(store: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: st\n"
                   "dataset:\n  min_train_examples: 1\n  min_eval_examples: 1\n")
    write_lines(logs_file(store), [rec(f"k0000000000{i}", quality="good", answer=f"k{i}") for i in range(5)])
    assert cli.main(["--config", str(cfg), "dataset", "build"]) == 0
    capsys.readouterr()
    assert cli.main(["--config", str(cfg), "forget", "k00000000002", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["newly_deleted"] and out["datasets_with_it"] == [1] and out["rebuilt"]["version"] == 2
    v2 = (tmp_path / "st" / "datasets" / "v2")
    assert "k2" not in (v2 / "train.jsonl").read_text() + (v2 / "eval.jsonl").read_text()
    # the same record appearing again (a restore, a re-export) does not bring it back
    write_lines(logs_file(store, "2026-11-27"), [rec("k00000000002", quality="good", answer="k2")])
    assert cli.main(["--config", str(cfg), "dataset", "build", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["created"] is False
    assert cli.main(["--config", str(cfg), "forget", "nosuchid0000"]) == 3


def test_each_training_example_records_the_version_where_it_first_appeared(store: Path, make_settings: Any) -> None:
    """Issue 19: train_ids.tsv (one line per train.jsonl line) and the members' ``since``: carried forward from the
    version before; a chat whose vote was retracted and that comes back with a new vote is new again."""
    s = make_settings(dataset={"eval_fraction": 0.0, "min_eval_examples": 1})
    write_lines(logs_file(store), [rec(f"c{i:03d}", quality="good", answer=f"answer {i}") for i in range(8)])
    with State(s.state_dir()) as st:
        v1 = build(s, st)
        write_lines(logs_file(store), [rec(f"n{i:03d}", quality="good", answer=f"new {i}") for i in range(3)])
        write_lines(feedback_file(store), [fb("c001", thumbs_up=False, ts="2026-11-25T10:00:00")])
        v2 = build(s, st)
        write_lines(feedback_file(store), [fb("c001", thumbs_up=True, ts="2026-11-25T11:00:00")])
        v3 = build(s, st)
        since3 = st.datasets.since(3)
    assert (v1.version, v2.version, v3.version) == (1, 2, 3)
    ids2 = dataset.read_train_ids(v2.path)  # type: ignore[arg-type]
    assert len(ids2) == v2.train_count == len((v2.path / "train.jsonl").read_text().splitlines())  # type: ignore[union-attr]
    assert "c001" not in dict(ids2)  # its vote was retracted
    assert all(v == (2 if cid.startswith("n") else 1) for cid, v in ids2)
    assert dict(dataset.read_train_ids(v3.path))["c001"] == 3 == since3["c001"]  # type: ignore[arg-type]
    assert since3["c000"] == 1 and since3["n000"] == 2
    man = json.loads((v2.path / "manifest.json").read_text())  # type: ignore[union-attr]
    olds = sum(1 for cid, _ in ids2 if cid.startswith("c"))
    assert man["counts"]["train_by_first_version"] == {"1": olds, "2": len(ids2) - olds}
    assert man["files"]["train_ids.tsv"] and dataset.verify(v2.path) == []  # type: ignore[arg-type]
