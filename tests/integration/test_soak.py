"""120 simulated days through the real pipeline with a fake clock (issue 11's soak): feedback arriving daily, training
windows on weekdays only, some candidates rejected, the service stopped mid-job, chats deleted, a disk that fills
up for a few days, retention pruning all along. The trainer and the exporter are the fakes of tests/fakes (the real
ones would take hours for 120 days); everything else is real: the store, ingest, state, datasets, the policy, the
gate, the registry against the Ollama stand-in, retention. Figures: ``pytest tests/integration/test_soak.py -s``."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import logs_file, rec, write_lines

from daemon import disk, settings
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.state import State

DAYS = 120
WINDOW = (8, 18)  # "0 8 * * 1-5" open for 10 h: Monday-Friday, 08:00-18:00 UTC


def first_monday_after(t: datetime) -> datetime:
    day = (t + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return day + timedelta(days=(7 - day.weekday()) % 7)


def soak_settings(make_settings: Any, fake_python: Path, base_model: Path, converter: Path, url: str,
                  env: dict[str, str]) -> settings.Settings:
    s: settings.Settings = make_settings(
        training={"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                  "max_steps": 3, "timeout": 60, "env": {"FAKE_TRAINER_MODE": "ok", "FAKE_STEP_S": "0.01", **env}},
        policy={"min_new_examples": 3, "min_total_examples": 1, "cooldown": 0, "max_runs_per_day": 1,
                "windows": [{"cron": "0 8 * * 1-5", "duration": "10h"}]},
        dataset={"min_train_examples": 1, "min_eval_examples": 1},
        export={"llama_cpp_dir": str(converter), "timeout": 60},
        ollama={"host": url, "model_name": "chatos", "timeout_s": 5, "keep_versions": 2},
        retention={"job_artifacts_age": "2d", "keep_datasets": 2},
    )
    return s


@pytest.fixture
def converter(tmp_path: Path) -> Path:
    """A llama.cpp checkout as far as the export checks one (the fake exporter never runs the converter)."""
    d = tmp_path / "llama.cpp"
    (d / "gguf-py" / "gguf").mkdir(parents=True)
    (d / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (d / "convert_hf_to_gguf.py").write_text("raise SystemExit('not used')\n")
    return d


class Soak:
    def __init__(self, store: Path, state_dir: Path) -> None:
        self.store = store
        self.state_dir = state_dir
        self.next_id = 0
        self.by_day: dict[str, list[str]] = {}
        self.deleted: list[tuple[str, int]] = []  # (cid, the newest dataset version when it was deleted)
        self.peak = 0
        self.outcomes: list[str] = []

    def add_chats(self, when: datetime, n: int) -> None:
        day = f"{when:%Y-%m-%d}"
        new = []
        for _ in range(n):
            cid = f"s{self.next_id:011d}"
            self.next_id += 1
            new.append(cid)
            write_lines(logs_file(self.store, day), [rec(cid, quality="good", answer=f"answer {cid}")])
        self.by_day.setdefault(day, []).extend(new)

    def delete_chat(self, st: State) -> None:
        """ChatOS deletes a chat: the day file is rewritten without its line (the training copy, if any, stays)."""
        for day, cids in sorted(self.by_day.items()):
            if cids:
                gone = cids.pop(0)
                path = logs_file(self.store, day)
                path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                                        if gone not in line))
                self.deleted.append((gone, st.datasets.latest_version() or 0))
                return

    def measure(self) -> None:
        self.peak = max(self.peak, disk.tree_bytes(self.state_dir))


def run_at(s: settings.Settings, st: State, t: datetime, soak: Soak, stop: threading.Event | None = None) -> Any:
    r = run_cycle(s, st, CycleRequest(None), now=lambda: t, stop=stop)
    soak.outcomes.append(str(r.outcome))
    return r


def test_120_days_unattended(make_settings: Any, store: Path, fake_python: Path, base_model: Path,
                             converter: Path, ollama_standin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    start = first_monday_after(datetime.now(UTC))  # after the real clock: jobs finish by it (retention ages)
    ok = soak_settings(make_settings, fake_python, base_model, converter, ollama_standin.url,
                       {"FAKE_EVAL_AFTER": "1.5"})
    worse = soak_settings(make_settings, fake_python, base_model, converter, ollama_standin.url,
                          {"FAKE_EVAL_AFTER": "9.5"})
    slow = soak_settings(make_settings, fake_python, base_model, converter, ollama_standin.url,
                         {"FAKE_TRAINER_MODE": "slow_ok", "FAKE_STEP_S": "2"})
    soak = Soak(store, Path(ok.state_dir()))
    real_free = disk.free_bytes
    with State(ok.state_dir()) as st:
        soak.add_chats(start, 12)
        for day in range(DAYS):
            morning = start + timedelta(days=day, hours=7)
            soak.add_chats(morning, 2)
            run_at(ok, st, morning, soak)  # before the window: never trains
            full = 50 <= day < 53
            monkeypatch.setattr(disk, "free_bytes", (lambda path: 1 << 20) if full else real_free)
            noon = morning + timedelta(hours=5)
            if day % 15 == 7:  # the service is stopped in the middle of a job
                stop = threading.Event()
                threading.Timer(0.7, stop.set).start()
                run_at(slow, st, noon, soak, stop)
            else:
                run_at(worse if day % 5 == 2 else ok, st, noon, soak)
            if day % 10 == 9:
                soak.delete_chat(st)
            run_at(ok, st, noon + timedelta(hours=8), soak)  # evening: window closed
            soak.measure()
            check_disk(st, soak)
        jobs = st.jobs.recent(limit=10_000)
        check_windows_and_limits(jobs)
        check_no_retraining(jobs)
        check_deleted_chats(st, soak)
        rejected = sum(1 for j in jobs if j.status == "rejected")
        registered = len(st.models.all(status="registered")) + len(st.models.all(status="deleted"))
    assert soak.outcomes.count("no_space") >= 1 and rejected >= 3 and registered >= 10
    assert any(j.status == "interrupted" for j in jobs), [j.status for j in jobs]
    print(f"\nsoak: {DAYS} days, {len(soak.outcomes)} cycles, {len(jobs)} runs ({rejected} rejected, "
          f"{sum(1 for j in jobs if j.status == 'interrupted')} interrupted), {registered} versions registered, "
          f"{soak.outcomes.count('no_space')} refused for disk, {len(soak.deleted)} chats deleted; "
          f"peak state folder {disk.human(soak.peak)}")


def check_windows_and_limits(jobs: list[Any]) -> None:
    days: dict[str, int] = {}
    for j in jobs:
        t = datetime.fromisoformat(j.created_at)
        assert t.weekday() < 5 and WINDOW[0] <= t.hour < WINDOW[1], (j.job_id, j.created_at)
        days[t.date().isoformat()] = days.get(t.date().isoformat(), 0) + 1
    assert max(days.values()) <= 1, days


def check_no_retraining(jobs: list[Any]) -> None:
    """A judged job (promoted or rejected) on a dataset version means that set is never trained again."""
    judged = [j.dataset_version for j in jobs if j.status in ("promoted", "rejected")]
    assert len(judged) == len(set(judged)), sorted(judged)


def check_disk(st: State, soak: Soak) -> None:
    root = soak.state_dir
    ggufs = list(root.glob("exports/*/*.gguf"))
    unregistered = len(st.models.all(status="pending")) + len(st.models.all(status="exported"))
    assert len(ggufs) <= 2 + 2 + unregistered, ggufs  # keep_versions, latest and previous latest, pending
    datasets = [p for p in (root / "datasets").glob("v*") if p.is_dir()]
    assert len(datasets) <= 2 + 4 + 1, datasets  # keep_datasets, kept versions and the champion's, a running job
    bulky = [p for p in root.glob("jobs/*/*") if p.name not in ("metrics.jsonl", "result.json", "job.log",
                                                                 "config.yaml")]
    assert len(bulky) <= 4 * 3, bulky  # jobs younger than 2 days (at most 3) and the kept versions' and champion's


def check_deleted_chats(st: State, soak: Soak) -> None:
    for cid, newest_then in soak.deleted:
        for ds in st.datasets.all(manifest=False):
            if ds.version <= newest_then or not Path(ds.path).is_dir():
                continue
            text = (Path(ds.path) / "train.jsonl").read_text() + (Path(ds.path) / "eval.jsonl").read_text()
            assert f"answer {cid}" not in text, (cid, ds.version)
