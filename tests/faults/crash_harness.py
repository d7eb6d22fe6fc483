"""Crash anywhere: the real service, killed at chosen points, restarted, settled, checked against ground truth.

A :class:`World` is one scratch folder with a generated ChatOS store, a config that trains with the fake trainer
(``tests/fakes/fake_trainer.py``, which also plays the merge/convert child) and registers with the Ollama stand-in
running as its own process (so it outlives every kill of the service). Each round (:func:`run_round`):

1. the store changes the way ChatOS changes it (new records, feedback events, and now and then a day file rewritten
   without some conversations: deleted);
2. the service (``python -m daemon --config X run``, JSON logs on stdout) starts, and is killed (``SIGKILL``) or
   stopped (``SIGTERM``) either a random delay after one of its log events or at a named fault point
   (``CHATOS_RETRAIN_FAULT``, see ``daemon/faults.py``); where it died is read from the last log events it wrote;
3. crash-consistency checks run on what it left behind (:func:`check_crash`);
4. it is started again, left to finish what it had (start-up cycle, re-attached jobs, pending registrations), given
   one ``chatos-retrain trigger --wait`` cycle, stopped with SIGTERM (it must exit 0), and the settled state is
   checked against the ground truth computed from the store files themselves (:func:`check_settled`).

Used by ``tests/faults/test_crash_anywhere.py`` (a few rounds) and ``bench/crash_anywhere.py`` (50+ rounds, a table).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from daemon.dataset import builder as dataset
from daemon.demo.storegen import append_records, generate_store, line, training_record

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # the stand-in is a test module; the bench script imports us from outside pytest
    sys.path.insert(0, str(TESTS))

from ollama_standin import StandinProcess  # noqa: E402

FAKE_TRAINER = TESTS / "fakes" / "fake_trainer.py"
MODEL = "chatos"
ENV_DROP = ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# Where a kill lands, named by the last phase marker the service logged before it died.
PHASE_OF_EVENT = {
    "service.starting": "ingest (start-up scan)",
    "service.startup_scan": "cycle start",
    "service.ready": "cycle start",
    "cycle.started": "ingest",
    "cycle.decided": "dataset build",
    "dataset.built": "training (spawn)",
    "job.spawn": "training",
    "job.reattached": "training (re-attached)",
    "job.finished": "gate",
    "gate.decided": "export",
    "export.merge": "export",
    "export.done": "registration",
    "registry.registered": "retention",
    "registry.pending": "registration",
    "cycle.summary": "idle",
}

# Named fault points in daemon code -> the phase they are in.
FAULT_POINTS = {
    "ingest.before_cursor": "ingest",
    "dataset.before_rename": "dataset build",
    "dataset.before_record": "dataset build",
    "job.spawned": "training (spawn)",
    "gate.decided": "export",
    "export.before_record": "export",
    "register.created": "registration",
    "register.copied": "registration",
    "register.committed": "retention",
}

# Timing targets: (log event, phase, max delay in seconds after it).
TIMING_TARGETS: list[tuple[str, str, float]] = [  # delays fitted to where each phase ends (see the bench's table)
    ("watch.started", "ingest (start-up scan)", 0.08),
    ("service.starting", "cycle start", 0.4),
    ("cycle.decided", "dataset build", 0.12),
    ("job.spawn", "training", 1.5),
    ("export.merge", "export", 0.6),
    ("export.done", "registration", 0.3),
    ("ollama.request", "registration", 0.2),
]


# -- the world ---------------------------------------------------------------------------------------------------


@dataclass
class World:
    """One scratch folder: store, config, state dir, the stand-in process, and what we did to the store."""

    root: Path
    store: Path
    config: Path
    state_dir: Path
    standin: StandinProcess
    deleted: set[str] = field(default_factory=set)  # removed from logs/ after the service had read them there
    # removed before the service ever read their logs/ line: their training_data/ copy (which ChatOS keeps) is all
    # it can know of them, so they may stay alive (see the report of issue 6); they are checked only for consistency
    deleted_unseen: set[str] = field(default_factory=set)
    rng: random.Random = field(default_factory=random.Random)
    round_no: int = 0
    services: list[ServiceProc] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.state_dir / "state.sqlite3"

    def close(self) -> None:
        for svc in self.services:
            svc.stop_hard()
        reap_strays(self.root)
        self.standin.stop()


def make_world(root: Path, *, n_records: int = 1500, seed: int = 0, python: str = sys.executable,
               step_s: float = 0.12, max_steps: int = 10) -> World:
    """Generate the store and the config; start the stand-in (the caller closes the world)."""
    root = root.absolute()
    store = root / "ChatOS-Memory"
    generate_store(store, n_records, days=10, seed=seed, extras=False)
    fake_py = root / "bin" / "fake-python"
    fake_py.parent.mkdir(parents=True)
    fake_py.write_text(f'#!/bin/sh\nexec "{python}" "{FAKE_TRAINER}" "$@"\n')
    fake_py.chmod(0o755)
    base = root / "models" / "tiny"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    conv = root / "llama.cpp"  # the fake child never runs it, but the pipeline checks a converter is there
    (conv / "gguf-py" / "gguf").mkdir(parents=True)
    (conv / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (conv / "convert_hf_to_gguf.py").write_text("raise SystemExit('not used by the fake exporter')\n")
    standin = StandinProcess(root / "ollama", python=python).start()
    cfg = {
        "store": {"root": str(store)},
        "state": {"dir": str(root / "state")},
        "watch": {"settle_s": 0.3, "max_wait_s": 2, "reconcile_interval": 3600},
        "dataset": {"min_train_examples": 1, "min_eval_examples": 1},
        "policy": {"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0, "max_runs_per_day": 100000},
        "training": {"python": str(fake_py), "base_model": str(base), "backend": "transformers",
                     "max_steps": max_steps, "timeout": 120, "retry_backoff": 1,
                     "env": {"FAKE_TRAINER_MODE": "slow_ok", "FAKE_STEP_S": str(step_s)}},
        "export": {"llama_cpp_dir": str(conv), "timeout": 60},
        "ollama": {"host": standin.url, "model_name": MODEL, "keep_versions": 3, "timeout_s": 10,
                   "retry_backoff": 1},
        "service": {"stop_timeout_s": 20, "runtime_dir": str(root / "run")},
        "log": {"level": "debug", "format": "json"},
    }
    config = root / "retrain.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return World(root, store, config, root / "state", standin, rng=random.Random(seed))


def service_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATOS_RETRAIN_") and k not in ENV_DROP}
    env["PYTHONUNBUFFERED"] = "1"
    if fault:
        env["CHATOS_RETRAIN_FAULT"] = fault
    return env


# -- the store changes -----------------------------------------------------------------------------------------------


def mutate(world: World, *, new_records: int = 100, delete: bool | None = None) -> dict[str, int]:
    """New records (good or unrated) with their training_data/ copies and feedback for some of them, as ChatOS
    writes them; sometimes a day file rewritten without a few (deleted chats)."""
    rng = world.rng
    world.round_no += 1
    day = f"2026-11-{1 + world.round_no % 28:02d}"
    when = datetime.fromisoformat(f"{day}T12:00:00")
    logs = world.store / "logs" / f"conversations_{day}.jsonl"
    start = logs.stat().st_size if logs.exists() else 0
    ids = append_records(world.store, new_records, seed=1000 + world.round_no, when=when,
                         quality=rng.choice(["good", "good", "unrated"]))
    with logs.open("rb") as f:
        f.seek(start)
        copies = [line(training_record(json.loads(raw))) for raw in f.read().splitlines()]
    with (world.store / "training_data" / f"training_{day}.jsonl").open("a", encoding="ascii") as f:
        f.writelines(copies)
    fb_file = world.store / "feedback" / f"feedback_{day}.jsonl"
    events = [json.dumps({"conversation_id": cid, "thumbs_up": rng.random() < 0.8, "feedback": None,
                          "timestamp": f"{day}T12:30:{i % 60:02d}.000000"}) + "\n"
              for i, cid in enumerate(rng.sample(ids, k=len(ids) // 3))]
    with fb_file.open("a", encoding="ascii") as f:
        f.writelines(events)
    gone = 0
    if delete if delete is not None else rng.random() < 0.3:
        gone = delete_some(world, rng.randint(1, 3))
    return {"appended": len(ids), "feedback": len(events), "deleted": gone}


def delete_some(world: World, n: int) -> int:
    """Rewrite one logs/ day file without ``n`` of its conversations (atomically, as an editor would)."""
    files = sorted((world.store / "logs").glob("conversations_*.jsonl"))
    path = world.rng.choice(files)
    lines = path.read_text(encoding="ascii").splitlines(keepends=True)
    if len(lines) <= n:
        return 0
    drop = set(world.rng.sample(range(len(lines)), k=n))
    cids = {json.loads(lines[i])["conversation_id"] for i in drop}
    seen: set[str] = set()
    if world.db.exists():  # what the service has read from logs/ by now (it is not running)
        with db(world) as conn:
            seen = {r[0] for r in conn.execute("SELECT cid FROM conversations WHERE rank = 2")}
    world.deleted |= cids & seen
    world.deleted_unseen |= cids - seen
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line_ for i, line_ in enumerate(lines) if i not in drop), encoding="ascii")
    os.replace(tmp, path)
    return n


# -- the service as a process ----------------------------------------------------------------------------------------


class ServiceProc:
    """``python -m daemon --config X run`` with its JSON log lines collected as they come."""

    def __init__(self, world: World, *, fault: str | None = None, python: str = sys.executable) -> None:
        self.world = world
        self.events: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.stderr_path = world.root / "logs" / f"service-{world.round_no}-{len(world.services)}.stderr"
        self.stderr_path.parent.mkdir(exist_ok=True)
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen([python, "-m", "daemon", "--config", str(world.config), "run"],
                                         stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
                                         cwd=world.root, env=service_env(fault))
        world.services.append(self)
        self._reader = threading.Thread(target=self._read, name="service-log-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"event": "_unparsed", "text": raw.decode("utf-8", "replace").strip()}
            if not isinstance(ev, dict):
                continue
            ev["_t"] = time.monotonic()
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float, start: int = 0) -> dict[str, Any] | None:
        """The first event (from index ``start``) matching ``pred``; None when the process ended or time ran out."""
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.events):
                    if pred(self.events[i]):
                        return self.events[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return None
                self._cond.wait(min(left, 0.2))

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        return code

    def stop_hard(self) -> None:
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()

    def last_phase(self) -> tuple[str, str]:
        """(phase, last marker event) from what the service logged before it stopped."""
        with self._cond:
            events = list(self.events)
        stopping = next((i for i, e in enumerate(events) if e.get("event") == "service.stopping"), None)
        if stopping is not None:  # a SIGTERM: where it found the service, not where the stop left it
            events = events[:stopping]
        for ev in reversed(events):
            name = marker(ev)
            if name in PHASE_OF_EVENT:
                return PHASE_OF_EVENT[name], name
        return "before start", "-"


def marker(ev: dict[str, Any]) -> str:
    """An event's name, with the export child's ``command.run`` renamed ``export.merge``."""
    name = str(ev.get("event"))
    if name == "command.run" and any(str(a).endswith("merge_export.py") for a in ev.get("argv", [])):
        return "export.merge"
    return name


def cycle_over(svc: ServiceProc, timeout: float) -> dict[str, Any] | None:
    """Wait for the end of the service's start-up cycle: its ``cycle.summary``, or None when the process ended."""
    started = svc.wait_for(lambda e: e.get("event") == "cycle.started" and "startup" in e.get("origins", []),
                           timeout=timeout)
    if started is None:
        return None
    return svc.wait_for(lambda e: e.get("event") == "cycle.summary" and e.get("cycle_id") == started.get("cycle_id"),
                        timeout=timeout)


def trigger_wait(world: World, python: str = sys.executable, timeout: float = 180.0) -> dict[str, Any]:
    """``chatos-retrain trigger --wait --json`` against the running service; its JSON result."""
    out = subprocess.run([python, "-m", "daemon", "--config", str(world.config), "trigger", "--wait", "--json"],
                         capture_output=True, text=True, timeout=timeout, env=service_env(), cwd=world.root)
    try:
        res: dict[str, Any] = json.loads(out.stdout)
    except ValueError:
        res = {"outcome": "cli_error", "reason": (out.stderr or out.stdout).strip()[-300:]}
    res["_exit"] = out.returncode
    return res


def reap_strays(root: Path) -> list[int]:
    """Trainer or export children a SIGKILLed service left running (their cwd is under ``root``): kill them by pid."""
    killed = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd == str(root) or not cwd.startswith(str(root) + os.sep):
            continue
        if "/jobs/" not in cwd and "/exports/" not in cwd:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
    return killed


# -- ground truth and checks -----------------------------------------------------------------------------------------


@dataclass
class Expected:
    """What a correct ingest of the store must hold, computed from the files with a parser of our own."""

    alive: set[str]
    sightings: set[tuple[str, str]]
    feedback: int
    sizes: dict[str, int]


def expected(world: World) -> Expected:
    alive: set[str] = set()
    sightings: set[tuple[str, str]] = set()
    feedback = 0
    sizes: dict[str, int] = {}
    for folder, pattern in (("logs", "*.jsonl"), ("training_data", "*.jsonl"), ("feedback", "*.jsonl")):
        for p in sorted((world.store / folder).glob(pattern)):
            if p.name.startswith("."):
                continue
            sizes[str(p)] = p.stat().st_size
            for raw in p.read_text(encoding="ascii").splitlines():
                obj = json.loads(raw)
                if folder == "feedback":
                    feedback += 1
                    continue
                cid = obj["conversation_id"] if folder == "logs" else obj["metadata"]["conversation_id"]
                sightings.add((str(p), cid))
                if folder == "logs":
                    alive.add(cid)
    return Expected(alive, sightings, feedback, sizes)


def ollama_tags(world: World) -> dict[str, str]:
    with urllib.request.urlopen(world.standin.url + "/api/tags", timeout=10) as resp:
        models = json.loads(resp.read())["models"]
    return {m["name"]: m["digest"] for m in models}


@contextlib.contextmanager
def db(world: World) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(world.db, timeout=30)
    try:
        yield conn
    finally:
        conn.close()


def _service(conn: sqlite3.Connection, column: str) -> str | None:
    """One column of the service's own row (migration 7: champion_job, latest_model, ...), as text."""
    if column not in ("champion_job", "latest_model"):
        raise ValueError(column)
    row = conn.execute(f"SELECT {column} FROM service WHERE id = 1").fetchone()
    return None if row is None or row[0] in (None, "") else str(row[0])


def check_crash(world: World) -> list[str]:
    """What must hold at every instant, even right after a SIGKILL (nothing has recovered yet)."""
    if not world.db.exists():
        return []
    v: list[str] = []
    with db(world) as conn:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if ok != "ok":
            v.append(f"sqlite integrity_check: {ok}")
        v += _dataset_problems(conn)
        dup = conn.execute("SELECT path, line, COUNT(*) FROM feedback GROUP BY path, line HAVING COUNT(*) > 1"
                           ).fetchall()
        if dup:
            v.append(f"feedback counted twice: {dup[:3]}")
        models = {r[0]: (r[1], r[2]) for r in conn.execute("SELECT version, tag, status FROM models")}
        latest = _service(conn, "latest_model")
    tags = ollama_tags(world)
    v_digests = {d for name, d in tags.items() if name.startswith(f"{MODEL}:v")
                 and int(name.rsplit(":v", 1)[1]) in models}
    latest_tag = f"{MODEL}:latest"
    if latest_tag in tags and tags[latest_tag] not in v_digests:
        v.append("Ollama latest points at no model version this state knows")
    if latest is not None:
        tag = models.get(int(latest), ("?", "?"))[0]
        if tag not in tags:
            v.append(f"state latest v{latest} is not in Ollama")
    return v


def _dataset_problems(conn: sqlite3.Connection) -> list[str]:
    v = []
    rows = conn.execute("SELECT version, path, fingerprint, train_count, eval_count FROM datasets").fetchall()
    # versions whose files disk retention removed on purpose (migration 8) are history, not datasets to check
    has_pruned = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'pruned'").fetchone() is not None
    pruned = {int(r[0]) for r in conn.execute("SELECT key FROM pruned WHERE kind = 'dataset'")} if has_pruned else set()
    rows = [r for r in rows if r[0] not in pruned]
    fps = [r[2] for r in rows]
    if len(set(fps)) != len(fps):
        v.append("two dataset versions with the same fingerprint")
    for version, path, _fp, n_train, n_eval in rows:
        problems = dataset.verify(Path(path))
        if problems:
            v.append(f"dataset v{version} incomplete: {problems[0]}")
        members = conn.execute("SELECT COUNT(*) FROM dataset_members WHERE version = ?", (version,)).fetchone()[0]
        if members != n_train + n_eval:
            v.append(f"dataset v{version}: {members} members for {n_train}+{n_eval} examples")
    return v


def check_settled(world: World) -> list[str]:
    """After a restart, a settle cycle and a clean stop: state equals the ground truth, everywhere."""
    v = check_crash(world)
    exp = expected(world)
    with db(world) as conn:
        alive = {r[0] for r in conn.execute("SELECT cid FROM conversations WHERE deleted = 0")}
        dead = {r[0] for r in conn.execute("SELECT cid FROM conversations WHERE deleted = 1")}
        extra = alive - exp.alive - world.deleted_unseen
        if extra or exp.alive - alive:
            v.append(f"conversations: {len(extra)} extra, {len(exp.alive - alive)} missing")
        if alive & world.deleted:  # absent (never ingested) or marked deleted are both right
            v.append(f"{len(alive & world.deleted)} deleted conversation(s) not marked deleted")
        if dead - world.deleted - world.deleted_unseen:
            v.append(f"{len(dead - world.deleted)} conversation(s) marked deleted that are still in the store")
        cols = {r[1] for r in conn.execute("PRAGMA table_info(sightings)")}
        sql = ("SELECT path, cid FROM sightings" if "path" in cols  # schema v4, else files named by id (v5)
               else "SELECT p.path, s.cid FROM sightings s JOIN paths p ON p.id = s.file")
        sightings = set(conn.execute(sql).fetchall())
        if sightings != exp.sightings:
            v.append(f"sightings: {len(sightings - exp.sightings)} extra, {len(exp.sightings - sightings)} missing")
        n_fb = conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
        if n_fb != exp.feedback:
            v.append(f"feedback events: {n_fb} in state, {exp.feedback} in the store")
        cursors = dict(conn.execute("SELECT path, offset FROM files").fetchall())
        behind = [p for p, size in exp.sizes.items() if cursors.get(p) != size]
        if behind:
            v.append(f"{len(behind)} file(s) not fully ingested, e.g. {Path(behind[0]).name}")
        latest_ds = conn.execute("SELECT MAX(version) FROM datasets").fetchone()[0]
        if latest_ds is not None:
            members = {r[0] for r in conn.execute("SELECT cid FROM dataset_members WHERE version = ?", (latest_ds,))}
            if members & world.deleted:
                v.append(f"latest dataset v{latest_ds} holds {len(members & world.deleted)} deleted conversation(s)")
        folder = world.state_dir / "datasets"
        known = {f"v{r[0]}" for r in conn.execute("SELECT version FROM datasets")}
        if folder.is_dir():
            stray = [e.name for e in folder.iterdir() if e.name.startswith("v") and e.name not in known]
            if stray:
                v.append(f"dataset folders state does not know: {stray}")
        stuck = conn.execute("SELECT job_id, status FROM jobs WHERE status IN ('running', 'starting')").fetchall()
        if stuck:
            v.append(f"jobs stuck: {stuck}")
        models = conn.execute("SELECT version, job_id, status, tag, ollama_digest, gguf_path, gguf_sha256"
                              " FROM models ORDER BY version").fetchall()
        by_job: dict[str, int] = {}
        for m in models:
            by_job[m[1]] = by_job.get(m[1], 0) + 1
        twice = [j for j, n in by_job.items() if n > 1]
        if twice:
            v.append(f"job(s) exported/registered twice: {twice}")
        shas = [m[6] for m in models if m[2] == "registered"]
        if len(set(shas)) != len(shas):
            v.append("one GGUF registered as two versions")
        unsettled = [(m[0], m[2]) for m in models if m[2] not in ("registered", "deleted")]
        if unsettled:
            v.append(f"model versions not registered after settling: {unsettled}")
        champion = _service(conn, "champion_job")
        if champion and champion not in by_job:
            v.append(f"champion job {champion} was promoted but never exported")
        latest = _service(conn, "latest_model")
        registered = [m for m in models if m[2] == "registered"]
    tags = ollama_tags(world)
    in_ollama = {n for n in tags if n.startswith(f"{MODEL}:v")}
    want = {m[3] for m in registered}
    if in_ollama != want:
        v.append(f"Ollama tags {sorted(in_ollama - want)} not registered in state, {sorted(want - in_ollama)} missing")
    for m in registered:
        if m[3] in tags and tags[m[3]] != m[4]:
            v.append(f"v{m[0]}: Ollama digest differs from state")
        gguf = Path(m[5])
        if not gguf.is_file() or "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest() != m[6]:
            v.append(f"v{m[0]}: GGUF missing or not the verified one")
    if registered:
        newest = registered[-1]
        if latest != str(newest[0]):
            v.append(f"latest is v{latest}, the newest registered version is v{newest[0]}")
        if tags.get(f"{MODEL}:latest") != newest[4]:
            v.append("Ollama latest does not point at the registered latest version")
    return v


# -- one round -------------------------------------------------------------------------------------------------------


@dataclass
class KillPlan:
    """How to stop the service this round: a signal after a log event (+ delay), or at a fault point."""

    signal: int  # SIGKILL or SIGTERM
    event: str | None = None
    delay: float = 0.0
    fault: str | None = None
    phase: str = ""

    def describe(self) -> str:
        how = "kill -9" if self.signal == signal.SIGKILL else "SIGTERM"
        if self.fault:
            return f"{how} at fault {self.fault}"
        return f"{how} {self.delay:.2f}s after {self.event}"


@dataclass
class RoundResult:
    plan: KillPlan
    landed: str  # phase from the logs
    last_event: str
    exit_code: int | None
    crash_violations: list[str]
    settled_violations: list[str]
    seconds: float
    settle: dict[str, Any] = field(default_factory=dict)

    @property
    def violations(self) -> list[str]:
        return self.crash_violations + self.settled_violations


def random_plan(rng: random.Random, *, sigterm_fraction: float = 0.2, fault_fraction: float = 0.35) -> KillPlan:
    sig = signal.SIGTERM if rng.random() < sigterm_fraction else signal.SIGKILL
    if rng.random() < fault_fraction:
        point = rng.choice(sorted(FAULT_POINTS))
        nth = rng.randint(1, 3) if point == "ingest.before_cursor" else 1  # 3 files change per round
        spec = f"{point}@{nth}" if nth > 1 else point
        if sig == signal.SIGTERM:
            spec += ":term"
        return KillPlan(sig, fault=spec, phase=FAULT_POINTS[point])
    event, phase, max_delay = rng.choice(TIMING_TARGETS)
    return KillPlan(sig, event=event, delay=rng.uniform(0, max_delay), phase=phase)


def run_round(world: World, plan: KillPlan, *, settle: bool = True, python: str = sys.executable) -> RoundResult:
    """Change the store, run the service until the plan stops it, check; restart, settle, stop, check."""
    t0 = time.monotonic()
    mutate(world)
    svc = ServiceProc(world, fault=plan.fault if plan.fault else None, python=python)
    exit_code: int | None
    if plan.fault:
        # it dies at the point, or the start-up cycle ends without reaching it (then it is stopped the plan's way)
        cycle_over(svc, timeout=120)
        stopping = svc.wait_for(lambda e: e.get("event") == "service.stopping", timeout=0.5)
        exit_code = svc.wait(60 if stopping else 0.5)  # a ':term' point already asked it to stop: never twice
        if exit_code is None and not stopping:
            svc.signal(plan.signal)
            exit_code = svc.wait(60)
    else:
        startup: list[str] = []

        def due(e: dict[str, Any]) -> bool:  # the planned event, or the end of the start-up cycle without it
            if marker(e) == plan.event:
                return True
            if e.get("event") == "cycle.started" and "startup" in e.get("origins", []):
                startup.append(str(e.get("cycle_id")))
            return e.get("event") == "cycle.summary" and e.get("cycle_id") in startup

        hit = svc.wait_for(due, timeout=120)
        if hit is not None and marker(hit) == plan.event:
            time.sleep(plan.delay)  # the harness's own timing, not a wait for the service
        svc.signal(plan.signal)
        exit_code = svc.wait(60)
    if exit_code is None:
        svc.stop_hard()
        exit_code = svc.proc.returncode
    landed, last = svc.last_phase()
    crash = check_crash(world)
    if plan.signal == signal.SIGTERM and exit_code != 0:
        crash.append(f"SIGTERM: exit status {exit_code}, not 0")
    settled: list[str] = []
    info: dict[str, Any] = {}
    if settle:
        settled, info = settle_and_check(world, python=python)
    return RoundResult(plan, landed, last, exit_code, crash, settled, time.monotonic() - t0, info)


def settle_and_check(world: World, *, python: str = sys.executable) -> tuple[list[str], dict[str, Any]]:
    """Restart, let the start-up cycle (and re-attached jobs) finish, one triggered cycle, SIGTERM, full check."""
    v: list[str] = []
    svc = ServiceProc(world, python=python)
    summary = cycle_over(svc, timeout=120)
    if summary is None:
        v.append(f"restart: the start-up cycle did not finish (exit {svc.proc.poll()})")
        svc.stop_hard()
        return v, {}
    if summary.get("outcome") == "error":
        v.append(f"restart: the start-up cycle failed: {str(summary.get('reason'))[:200]}")
    # recovered on its own: whatever the kill interrupted is finished (or safely abandoned) without any trigger
    v += [f"after restart: {p}" for p in check_settled(world)]
    res = trigger_wait(world, python=python)
    if res.get("outcome") not in ("registered",):
        v.append(f"settle cycle: {res.get('outcome')}: {str(res.get('reason'))[:200]}")
    svc.signal(signal.SIGTERM)
    code = svc.wait(60)
    if code != 0:
        v.append(f"clean stop after settling: exit status {code}")
        svc.stop_hard()
    strays = reap_strays(world.root)
    if strays:
        v.append(f"trainer/export processes still running after a clean stop: pids {strays}")
    crashed = [e for e in svc.events if e.get("event") in ("cycle.failed", "worker.cycle_crashed")]
    if crashed:
        v.append(f"a cycle failed after restart: {crashed[0].get('exception', '')[-200:]}")
    v += check_settled(world)
    return v, {"outcome": res.get("outcome"), "model_tag": res.get("model_tag")}


def campaign(root: Path, kills: int, *, seed: int = 0, n_records: int = 1500, sigterm_fraction: float = 0.2,
             fault_fraction: float = 0.35, on_round: Callable[[int, RoundResult], None] | None = None,
             plans: list[KillPlan] | None = None) -> list[RoundResult]:
    """``kills`` rounds on one world; returns every round's result."""
    world = make_world(root, n_records=n_records, seed=seed)
    rng = random.Random(seed)
    results = []
    try:
        for i in range(kills):
            plan = plans[i] if plans is not None else random_plan(rng, sigterm_fraction=sigterm_fraction,
                                                                   fault_fraction=fault_fraction)
            r = run_round(world, plan)
            results.append(r)
            if on_round:
                on_round(i, r)
    finally:
        world.close()
    return results

