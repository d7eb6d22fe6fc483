"""Check that ingest + dataset builds give the same results as another version of the code (e.g. HEAD).

Runs one scenario twice, each time in child processes importing ``daemon`` from a given tree: a generated store
plus hand-made hazards (PII, system messages, duplicates, escapes, bad and partial lines, training-only records),
then appends, a ChatOS delete rewrite, a training copy upgraded by its logs/ record, feedback flips, settings
changes (PII kinds, system messages, dedup) and back, a deleted file, and builds with nothing new. After every step
it records the build result, every dataset file's bytes (the manifest's ``created_at`` aside) and the state tables
(timestamps aside; stored messages compared as JSON values, since their encoding may differ). ``--migrate`` also
runs the first half with the reference tree and the rest with the tree under test, on the same state.

    git archive HEAD daemon | tar -x -C /tmp/head      # a reference tree
    .venv/bin/python bench/equivalence.py --reference /tmp/head [--records 1500] [--migrate]

Exit status 0 when everything matches; otherwise the first differences are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = 12


# -- the scenario (runs in a child, with the tree under test first on sys.path) ----------------------------------


def _rec(cid: str, user: str, answer: str, *, system: str | None = None, quality: str | None = "good",
         thumbs: bool | None = None, mode: str = "normal", day: str = "2026-12-01") -> dict[str, Any]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user, "timestamp": f"{day}T10:00:00"},
        {"role": "assistant", "content": answer, "model": "qwen2.5:7b"},
    ]
    return {"conversation_id": cid, "messages": msgs, "mode": mode, "chosen_model": None, "quality": quality,
            "thumbs_up": thumbs, "started_at": f"{day}T10:00:00"}


def _training(cid: str, user: str, answer: str, quality: str = "excellent") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "metadata": {"conversation_id": cid, "mode": "code", "quality": quality, "model": "llama3:8b"}}


HAZARDS = [
    _rec("h00000000001", "mail me at jane.doe@example.com", "call +1 415-555-0100 or (415) 555-0199"),
    _rec("h00000000002", "key sk-abcdefghijklmnopqrstuvwx1234 and ghp_abcdefghijklmnopqrstuvwxyz0123456789AB",
         "server 192.168.1.20, token=abcd1234efgh5678 url?api_key=zzzzyyyyxxxx"),
    _rec("h00000000003", "How  do I\nsort?", "Use sorted().", system="You are terse."),
    _rec("h00000000004", "how do i sort?", "use   SORTED().", system="Contact admin@corp.example for 10.0.0.1"),
    _rec("h00000000005", "version 1.2.3.4.5 and python 3.11.7", "range(10, 20, 2) arr[2024] = 12"),
    _rec("h00000000006", "unicode: é ü 中文 ٣ digits", "tab\there \"quoted\" back\\slash \u0001 ctl"),
    _rec("h00000000007", "Authorization: Bearer abcdefghijklmnop.qrstuvwx",
         "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIx.abcdefghijk"),
    _rec("h00000000008", "same text", "same answer", quality="excellent"),
    _rec("h00000000009", "Same  Text", "same   ANSWER", quality="good"),
    _rec("h0000000000a", "blank answer", "   ", quality="excellent"),
    _rec("h0000000000b", "unrated", "no label yet", quality=None),
    _rec("h0000000000c", "poor one", "bad", quality="poor"),
    _rec("h0000000000d", "-----BEGIN RSA PRIVATE KEY-----\nMIIabc\n-----END RSA PRIVATE KEY-----", "ok", mode="code"),
    _rec("h0000000000e", "fullwidth １２３ and arabic ٤٥٦-٧٨٩-٠١٢٣", "x@y.co", thumbs=True, quality=None),
    _rec("h0000000000f", "surrogate pair 😀 emoji", "AKIAABCDEFGHIJKLMNOP is a key", mode="other"),
]
BAD_LINES = ["{oops", "[1, 2]", '{"conversation_id": "x", "messages": []}', "", '{"messages": "no"}']


def _lines(objs: list[dict[str, Any]]) -> bytes:
    return b"".join((json.dumps(o, ensure_ascii=False) + "\n").encode() for o in objs)


def _append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(data)


def _settings(root: Path, state: Path, **dataset: Any) -> Any:
    from daemon.settings import Settings

    ds = {"min_train_examples": 1, "min_eval_examples": 1, **dataset}
    return Settings.model_validate({"store": {"root": str(root)}, "state": {"dir": str(state)}, "dataset": ds})


def step(i: int, root: Path, state: Path) -> dict[str, Any]:
    """Change the store (or the settings) as step ``i`` says, then ingest and build."""
    from daemon import api
    from daemon.dataset import builder as dataset
    from daemon.demo.storegen import append_records, generate_store

    logs = root / "logs" / "conversations_2026-12-01.jsonl"
    train = root / "training_data" / "training_2026-12-01.jsonl"
    fb = root / "feedback" / "feedback_2026-12-01.jsonl"
    knobs: dict[str, Any] = {}
    if i == 0:
        generate_store(root, int(os.environ["EQ_RECORDS"]), days=4, seed=11)
        _append(fb, _lines([{"conversation_id": "t00000000002", "thumbs_up": True,
                             "timestamp": "2026-12-01T09:00:00"}]))  # before its conversation
        _append(logs, _lines(HAZARDS) + "\n".join(BAD_LINES).encode() + b"\n")
        _append(train, _lines([_training("t00000000001", "training only", "from training_data"),
                               _training("t00000000002", "training only 2", "waits for feedback", "acceptable"),
                               _training("h00000000001", "copy of a logs record", "training copy")]))
        _append(logs, b'{"conversation_id": "p0000000000')  # a partial line: waits for its newline
    elif i == 1:
        append_records(root, 40, seed=5)
        line = json.dumps(_rec("p00000000001", "finished later", "ok 42"))
        _append(logs, b'1"' + line[line.index("p00000000001") + 13:].encode() + b"\n")
    elif i == 2:  # ChatOS deletes a chat: the day file is rewritten in place without it
        data = logs.read_bytes().split(b"\n")
        logs.write_bytes(b"\n".join(x for x in data if b'"h00000000002"' not in x and b'"h00000000008"' not in x))
    elif i == 3:  # a training-only conversation gets its logs/ record (new content); feedback flips two
        _append(logs, _lines([_rec("t00000000001", "training only", "from logs, longer and different"),
                              _rec("h00000000004", "how do i sort? mail bob@mail.example.org", "use sorted(xs)",
                                   system="Contact admin@corp.example for 10.0.0.1")]))
        _append(fb, _lines([{"conversation_id": "h00000000003", "thumbs_up": False, "timestamp": "2026-12-01T11:00:00"},
                            {"conversation_id": "h0000000000b", "quality": "excellent",
                             "timestamp": "2026-12-01T11:00:01"}]))
    elif i == 4:
        pass  # nothing new: no new version
    elif i == 5:
        knobs = {"include_system": True}
    elif i == 6:
        knobs = {"pii_kinds": ["email", "secret"]}
    elif i == 7:
        pass  # back to the defaults
    elif i == 8:  # a whole day file deleted
        days = sorted((root / "logs").glob("conversations_2026-*.jsonl"))
        days[0].unlink()
    elif i == 9:
        knobs = {"dedup": False}
    elif i == 10:
        knobs = {"pii_scrub": False}
    elif i == 11:
        append_records(root, 25, seed=6)
    s = _settings(root, state, **knobs)
    with api.open_state(s) as st:
        report = api.ingest(s, st).as_dict()
        try:
            built = dataset.build(st, s.dataset, str(root)).as_json()
        except dataset.DatasetError as exc:
            built = {"error": str(exc)}
    report.pop("seconds")
    return {"report": report, "build": built}


VALUES = bool(os.environ.get("EQ_VALUES"))  # compare dataset lines as JSON values (across an encoding change)


def dump(root: Path, state: Path) -> dict[str, Any]:
    """Everything observable, normalised: timestamps dropped, paths relative, messages as JSON values."""
    out: dict[str, Any] = {"folders": {}}
    for d in sorted((state / "datasets").glob("v*")):
        files = {}
        for f in sorted(d.iterdir()):
            data = f.read_bytes()
            if f.name == "manifest.json":
                man = json.loads(data)
                man.pop("created_at")
                files[f.name] = man
                if VALUES:  # what hashes the files' bytes
                    for key in ("fingerprint", "content_hash", "files"):
                        man.pop(key, None)
                    continue
                raw = re.sub(rb'"created_at": "[^"]*"', b"", data).replace(str(root).encode(), b"<ROOT>")
                files["manifest bytes"] = hashlib.sha256(raw).hexdigest()
            elif VALUES:  # each line as a JSON value: the same examples, whatever the encoding
                canon = [json.dumps(json.loads(line), sort_keys=True) for line in data.splitlines()]
                files[f.name] = hashlib.sha256("\n".join(canon).encode()).hexdigest()
            else:
                files[f.name] = hashlib.sha256(data).hexdigest()
        out["folders"][d.name] = files
    db = sqlite3.connect(state / "state.sqlite3")
    cols = {r[1] for r in db.execute("PRAGMA table_info(sightings)")}
    sight = ("SELECT p.path, s.cid, s.rank FROM sightings s JOIN paths p ON p.id = s.file" if "file" in cols
             else "SELECT path, cid, rank FROM sightings")
    queries = {
        "conversations": "SELECT cid, rank, messages, mode, model, quality, thumbs_up, inline_score, inline_rated,"
                         " usable, started_at, src_path, src_offset, src_len, deleted FROM conversations ORDER BY cid",
        "sightings": sight + " ORDER BY 1, 2",
        "feedback": "SELECT path, line, cid, thumbs_up, quality, note, ts, score FROM feedback ORDER BY path, line",
        "labels": "SELECT cid, score, thumbs_up, quality, ts FROM labels ORDER BY cid",
        "rejects": "SELECT path, line, reason, line_hash FROM rejects ORDER BY path, line",
        "files": "SELECT path, kind, size, offset, lines, head_len, head_hash, tail_len, tail_hash FROM files"
                 " ORDER BY path",
        "datasets": "SELECT version, path, train_count, eval_count" + ("" if VALUES else ", fingerprint, content_hash")
                    + " FROM datasets",
        "members": "SELECT version, cid, split FROM dataset_members ORDER BY version, cid",
        "pins": "SELECT cid FROM eval_pins ORDER BY cid",
    }
    for name, sql in queries.items():
        rows = [list(r) for r in db.execute(sql)]
        if name == "conversations":
            for r in rows:
                r[2] = json.loads(r[2])
        out[name] = rows
    db.close()
    normalised: dict[str, Any] = json.loads(json.dumps(out).replace(str(root), "<ROOT>").replace(str(state), "<STATE>"))
    return normalised


def child(first: int, last: int, root: Path, state: Path) -> dict[str, Any]:
    from daemon import log

    log.configure("error", "json", sys.stderr)
    if os.environ.get("EQ_PARSE_WORKER"):  # parse every new file in the worker process, however small
        from daemon.ingest import ingestor as ingest

        ingest.PARALLEL_BYTES = 1
    results = []
    for i in range(first, last):
        r = step(i, root, state)
        r["dump"] = dump(root, state)
        results.append(json.loads(json.dumps(r).replace(str(root), "<ROOT>").replace(str(state), "<STATE>")))
    return {"steps": results}


# -- differential checks of the fast paths against the plain ones (in this tree) -------------------------------


def _mutant(rng: Any, kind: str) -> bytes:
    """A valid record of ``kind``, usually with a little damage: a wrong type, a missing or odd field, an escape."""
    odd: list[Any] = [None, True, False, 0, 1.5, "", " ", "x", "GOOD ", "Excellent", [], {}, ["a"], {"a": 1},
                      "\ud800", "é😀", "a\u0000b", 10**20, "  \n", "unrated"]
    msgs: list[Any] = [{"role": r, "content": rng.choice(["hi", "line\nnext", "😀 \u2028 é", "x" * 50])}
                       for r in rng.choice([["user", "assistant"], ["system", "user", "assistant"], ["user"],
                                            ["assistant", "user", "assistant"]])]
    if rng.random() < 0.5:
        msgs[-1]["model"] = rng.choice(["qwen2.5:7b", None, 3, "m\udfff"])
    cid = rng.choice(["a1b2c3d4e5f6", "id:with.ok_chars-1", "Z" * 128])
    base = {"mode": rng.choice(["normal", "code", None, ""]), "quality": rng.choice(["good", " Poor ", None, "odd"]),
            "thumbs_up": rng.choice([True, False, None])}
    if kind == "logs":
        obj: Any = {"conversation_id": cid, "messages": msgs, "chosen_model": rng.choice(["llama3:8b", None]),
                    "started_at": rng.choice(["2026-01-01T10:00:00", None]), "extra": {"n": [1, 2]}, **base}
        where = [obj, obj, obj]
    else:
        meta = {"conversation_id": cid, "model": rng.choice(["llama3:8b", None]),
                "timestamp": rng.choice(["2026-01-01T10:00:00", None]), **base}
        obj = {"messages": msgs, "metadata": meta}
        where = [meta, meta, obj]
    for _ in range(rng.choice([0, 0, 1, 1, 2])):  # damage
        target = rng.choice([*where, rng.choice(msgs)])
        key = rng.choice([*target, "messages", "metadata", "role", "content"])
        if rng.random() < 0.15:
            target.pop(key, None)
        else:
            target[key] = rng.choice(odd)
    if rng.random() < 0.02:
        obj = rng.choice(odd)
    text = json.dumps(obj, ensure_ascii=rng.random() < 0.5)
    if rng.random() < 0.05:
        text = rng.choice(["", " ", "\ufeff"]) + text + rng.choice(["", " ", "\t", " x"])
    raw = text.encode("utf-8", "surrogatepass")
    return raw[: rng.randint(0, len(raw))] if rng.random() < 0.02 else raw


def check_fast_paths(cases: int = 20000) -> list[str]:
    """parse_fields == parse_conversation, manifest_bytes == json.dumps(indent=1), and the dataset's model counter
    == its plain loop (read_blocks and dedup: tests/unit/test_fast_paths.py)."""
    import random

    from daemon.dataset import manifest, selection
    from daemon.ingest import fast_paths, records

    rng = random.Random(7)
    problems = []
    for i in range(cases):
        kind = rng.choice(["logs", "training"])
        raw = _mutant(rng, kind)
        slow = records.parse_conversation(raw, kind)  # type: ignore[arg-type]
        want = slow if isinstance(slow, records.Rejection) else records.fields_of(slow)
        got = fast_paths.parse_fields(raw, kind)  # type: ignore[arg-type]
        if got != want:
            problems.append(f"parse_fields case {i}: {raw[:120]!r}: {got} != {want}")
    for i in range(2000):
        paths = ["/a/b", "/ü/x\"y", "p\\q", "", "\0sources\0"]
        srcs = [{"path": rng.choice(paths) + str(j), "records": rng.randint(0, 9),
                 "byte_ranges": [[rng.randint(0, 10**12), rng.randint(0, 10**6)] for _ in range(rng.randint(0, 4))]}
                for j in range(rng.randint(0, 4))]
        man: dict[str, Any] = {"version": i, "counts": {"by_model": {rng.choice(["m", "\0sources\0"]): 1}},
                               "sources": srcs, "after": rng.choice(["\0sources\0", "x", 1.5, None])}
        if rng.random() < 0.1 and srcs:
            srcs[0]["extra"] = 1
        if manifest.manifest_bytes(man) != json.dumps(man, indent=1).encode():
            problems.append(f"manifest_bytes case {i} differs from json.dumps(indent=1)")
    for i in range(20000):  # the model counter against its plain definition (dedup: tests/unit/test_fast_paths.py)
        cands = [selection.Example(rng.choice("abcdefgh"), (), "m", rng.choice([None, "", "a", "unknown"]), 1, "/p", 0,
                                 1, b"x", b"k") for _ in range(rng.randint(0, 10))]
        if sorted(manifest._models(cands).items()) != sorted(Counter(e.model or "unknown" for e in cands).items()):
            problems.append(f"_models case {i} differs from Counter(model or 'unknown')")
    return problems[:20]


# -- parent ----------------------------------------------------------------------------------------------------


def run(tree: Path, first: int, last: int, work: Path, records: int, worker: bool) -> list[dict[str, Any]]:
    store, state = str(work / "store"), str(work / "state")
    code = (f"import sys; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(HERE)!r});"
            "import json, equivalence as e; from pathlib import Path;"
            f"print(json.dumps(e.child({first}, {last}, Path({store!r}), Path({state!r}))))")
    env = {**os.environ, "EQ_RECORDS": str(records), "PYTHONDONTWRITEBYTECODE": "1", "EQ_PARSE_WORKER": "1" * worker}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"scenario failed under {tree}")
    steps: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])["steps"]
    return steps


def diff(a: Any, b: Any, where: str = "", out: list[str] | None = None) -> list[str]:
    out = [] if out is None else out
    if len(out) >= 20:
        return out
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {str(a)[:200]} != {str(b)[:200]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", type=Path, required=True, help="a tree holding the reference 'daemon' package")
    ap.add_argument("--records", type=int, default=1500)
    ap.add_argument("--migrate", action="store_true", help="also: reference for steps 0-4, then this tree")
    ap.add_argument("--work", type=Path, default=Path("/tmp/chatos-equivalence"))
    ap.add_argument("--values", action="store_true",
                    help="compare dataset lines as JSON values, not bytes (for a reference with another encoding)")
    args = ap.parse_args(argv)
    if args.values:
        os.environ["EQ_VALUES"] = "1"  # read by the children's dump()
    shutil.rmtree(args.work, ignore_errors=True)
    sys.path.insert(0, str(REPO))
    fast = check_fast_paths()
    print(f"fast paths vs plain ones (parser, manifest, models): {'SAME' if not fast else 'DIFFERENT'}")
    for p in fast:
        print("  ", p)
    runs = {
        "reference": [(args.reference, 0, STEPS, False)],
        "this tree": [(REPO, 0, STEPS, False)],
        "this tree, parse worker": [(REPO, 0, STEPS, True)],
    }
    if args.migrate:
        runs["reference, then this tree"] = [(args.reference, 0, 5, False), (REPO, 5, STEPS, True)]
    results = {}
    for name, parts in runs.items():
        work = args.work / name.replace(" ", "-").replace(",", "")
        results[name] = [s for tree, a, b, w in parts for s in run(tree, a, b, work, args.records, w)]
    ref = results.pop("reference")
    failed = bool(fast)
    for name, steps in results.items():
        problems = diff(ref, steps)
        built = [s["build"].get("version") if s["build"].get("created") else "-" for s in steps]
        print(f"{name}: {'SAME' if not problems else 'DIFFERENT'} over {len(steps)} steps"
              f" (versions built per step: {built}; dataset folders compared: {len(steps[-1]['dump']['folders'])})")
        for p in problems:
            print("  ", p)
        failed |= bool(problems)
    shutil.rmtree(args.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
