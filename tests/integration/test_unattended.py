"""Defects that only show over weeks of unattended running (issue 11), each pinned through the real cycle with the
fake trainer (tests/fakes/fake_trainer.py: the real trainer is too slow for the number of runs these need)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import fb, feedback_file, logs_file, rec, write_lines

from daemon import cli, disk, settings
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.dataset import builder
from daemon.ingest import ingestor
from daemon.ingest import records as record_parser
from daemon.ingest.ingestor import Ingestor
from daemon.state import JobRow, State
from daemon.state import feedback as feedback_repo
from daemon.train import runner

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)  # a Monday


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.t = start

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@pytest.fixture
def records(store: Path) -> Path:
    write_lines(logs_file(store), [rec(f"e0000000000{i}", quality="good", answer=f"answer {i}") for i in range(6)])
    return store


def make(make_settings: Any, fake_python: Path, base_model: Path, env: dict[str, str] | None = None,
         **policy: Any) -> settings.Settings:
    s: settings.Settings = make_settings(
        training={"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                  "max_steps": 3, "timeout": 60, "env": {"FAKE_TRAINER_MODE": "ok", **(env or {})}},
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 3600, "max_runs_per_day": 100,
                **policy},
        dataset={"min_train_examples": 1, "min_eval_examples": 1},
        export={"enabled": False},
    )
    return s


def test_a_rejected_candidate_is_not_retrained_on_the_same_data(make_settings: Any, records: Path,
                                                                 fake_python: Path, base_model: Path) -> None:
    """Candidates whose eval loss (2.5) is worse than the base model's (2.0) are rejected; after the cooldown the
    same eligible set must not count as new again: only new feedback starts the next run."""
    s = make(make_settings, fake_python, base_model, env={"FAKE_EVAL_AFTER": "2.5"})
    clock = Clock()
    with State(s.state_dir()) as st:
        first = run_cycle(s, st, CycleRequest(None), now=clock)
        assert first.outcome == "rejected", first.reason
        for _ in range(3):  # three cooldowns later, nothing new: it waits and says why
            clock.advance(3601)
            again = run_cycle(s, st, CycleRequest(None), now=clock)
            assert again.outcome == "skipped" and again.job_id is None, again.reason
            assert "0/1 new rated examples since v1" in again.reason, again.reason
        assert len(st.jobs.recent()) == 1
        write_lines(logs_file(records, "2025-12-06"), [rec("e00000000099", quality="good", answer="new")])
        clock.advance(3601)
        fresh = run_cycle(s, st, CycleRequest(None), now=clock)
        assert fresh.job_id is not None and fresh.dataset_version == 2, fresh.reason


def test_a_live_trainer_no_cycle_supervises_blocks_training(make_settings: Any, records: Path, fake_python: Path,
                                                            base_model: Path, tmp_path: Path) -> None:
    """The policy's job_running rule is real: a trainer left running (its row says running, its pid lives) blocks
    a scheduled run and an operator's trigger alike; once it is gone, training proceeds."""
    s = make(make_settings, fake_python, base_model, cooldown=0)
    job_dir = tmp_path / "state" / "jobs" / "j-orphan"
    job_dir.mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        with State(s.state_dir()) as st:
            with st.transaction():
                st.jobs.add(JobRow(job_id="j-orphan", dataset_version=1, status="running", pid=orphan.pid,
                                   job_dir=str(job_dir), config_path=str(job_dir / "config.yaml"),
                                   log_path=str(job_dir / "job.log"), metrics_path=str(job_dir / "metrics.jsonl"),
                                   result_path=str(job_dir / "result.json"), params={},
                                   created_at="2026-11-30T11:00:00+00:00"))
            waits = run_cycle(s, st, CycleRequest(None), now=Clock())
            assert not waits.decision and waits.job_id is None and "a training job is running" in waits.reason
            forced = run_cycle(s, st, CycleRequest(None, forced=True), now=Clock())
            assert not forced.decision and forced.job_id is None
            assert "triggered by an operator, but a training job is running" in forced.reason
            orphan.kill()
            orphan.wait()
            trains = run_cycle(s, st, CycleRequest(None), now=Clock())
            assert trains.job_id is not None, trains.reason
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_a_later_rating_does_not_replace_an_earlier_thumbs_vote(make_settings: Any, store: Path) -> None:
    """Thumbs and quality are kept separately (each its latest event); a thumbs vote is the user's own word, so it
    decides; the quality decides only where there is no thumbs vote. Both the state's labels and the dataset agree."""
    write_lines(logs_file(store), [rec(f"f0000000000{i}", answer=f"answer {i}") for i in range(4)])
    write_lines(feedback_file(store), [
        fb("f00000000000", thumbs_up=False, ts="2026-11-25T10:00:00"),  # down, then rated good later
        fb("f00000000000", thumbs_up=None, quality="good", ts="2026-11-25T11:00:00"),
        fb("f00000000001", thumbs_up=True, ts="2026-11-25T10:00:00"),  # up, then rated poor later
        fb("f00000000001", thumbs_up=None, quality="poor", ts="2026-11-25T11:00:00"),
        fb("f00000000002", thumbs_up=None, quality="poor", ts="2026-11-25T10:00:00"),  # quality only: latest wins
        fb("f00000000002", thumbs_up=None, quality="excellent", ts="2026-11-25T11:00:00"),
        fb("f00000000003", thumbs_up=True, ts="2026-11-25T10:00:00"),  # the user changes their vote
        fb("f00000000003", thumbs_up=False, ts="2026-11-25T12:00:00"),
    ])
    s = make_settings(dataset={"min_train_examples": 1, "min_eval_examples": 1})
    with State(s.state_dir()) as st:
        ingestor.ingest(s, st)
        ids = [f"f0000000000{i}" for i in range(4)]
        scores = {cid: (st.conversations.get(cid) or {}).get("label_score") for cid in ids}
        assert scores == {"f00000000000": -1, "f00000000001": 1, "f00000000002": 1, "f00000000003": -1}
        built = builder.build(st, s.dataset, str(store))
        assert built.path is not None
        lines = (built.path / "train.jsonl").read_text() + (built.path / "eval.jsonl").read_text()
        assert "answer 1" in lines and "answer 2" in lines
        assert "answer 0" not in lines and "answer 3" not in lines


def test_the_quality_table_of_the_labels_is_chatos_own() -> None:
    assert feedback_repo.QUALITY_SCORE == record_parser.QUALITY_SCORE


def test_a_re_attached_job_is_one_run_against_the_daily_limit(make_settings: Any, records: Path,
                                                               fake_python: Path, base_model: Path) -> None:
    """A job followed by two cycles (the one that started it, and the one that re-attached it after a restart) is
    one training run: runs per day count jobs, dated by the cycle's clock."""
    s = make(make_settings, fake_python, base_model, cooldown=0, max_runs_per_day=2)
    clock = Clock()
    with State(s.state_dir()) as st:
        first = run_cycle(s, st, CycleRequest(None), now=clock)
        assert first.job_id is not None, first.reason
        row = st.jobs.get(first.job_id)
        assert row is not None and row.created_at == clock().isoformat()
        # the service restarts and re-attaches the job (its result.json is there): the cycle that follows it
        clock.advance(60)
        again = run_cycle(s, st, CycleRequest(None), now=clock, resume_job=runner.Job(row.as_dict()))
        assert again.job_id == first.job_id and again.decision, again.reason
        assert st.jobs.started_since(clock().replace(hour=0, minute=0).isoformat()) == 1
        # new data: one run so far today, so a second is allowed (the limit is 2)
        write_lines(logs_file(records, "2025-12-06"), [rec("e00000000099", quality="good", answer="new")])
        clock.advance(60)
        second = run_cycle(s, st, CycleRequest(None), now=clock)
        assert second.job_id is not None and second.job_id != first.job_id, second.reason
        # and a third is not
        write_lines(logs_file(records, "2025-12-07"), [rec("e00000000098", quality="good", answer="newer")])
        clock.advance(60)
        third = run_cycle(s, st, CycleRequest(None), now=clock)
        assert third.job_id is None and "daily limit reached: 2/2 runs today" in third.reason, third.reason


@pytest.fixture
def converter(tmp_path: Path) -> Path:
    """A llama.cpp checkout as far as the export checks one (the fake exporter never runs the converter)."""
    d = tmp_path / "llama.cpp"
    (d / "gguf-py" / "gguf").mkdir(parents=True)
    (d / "gguf-py" / "gguf" / "__init__.py").write_text("")
    (d / "convert_hf_to_gguf.py").write_text("raise SystemExit('not used')\n")
    return d


def exporting_settings(make_settings: Any, fake_python: Path, base_model: Path, converter: Path, url: str,
                       **retention: Any) -> settings.Settings:
    s: settings.Settings = make_settings(
        training={"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                  "max_steps": 3, "timeout": 60, "env": {"FAKE_TRAINER_MODE": "ok", "FAKE_CHAMPION": "9"}},
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0, "max_runs_per_day": 100},
        dataset={"min_train_examples": 1, "min_eval_examples": 1},
        export={"llama_cpp_dir": str(converter), "timeout": 60},
        ollama={"host": url, "model_name": "chatos", "timeout_s": 5, "keep_versions": 1},
        retention={"job_artifacts_age": 0, "keep_datasets": 1, **retention},
    )
    return s


def test_retention_keeps_the_disk_bounded(make_settings: Any, records: Path, fake_python: Path, base_model: Path,
                                          converter: Path, ollama_standin: Any) -> None:
    """Five versions trained, exported and registered with keep_versions 1 and keep_datasets 1: on disk stay the
    GGUFs of latest and the previous latest, the champion's job and the newest datasets; every job keeps its
    record; what went is in state.pruned."""
    s = exporting_settings(make_settings, fake_python, base_model, converter, ollama_standin.url)
    clock = Clock(datetime.now(UTC))  # jobs record when they finished by the real clock: keep the cycle's after it
    state_dir = Path(s.state_dir())
    with State(state_dir) as st:
        for day in range(5):
            write_lines(logs_file(records, f"2025-12-1{day}"), [rec(f"d0000000000{day}", quality="good",
                                                                    answer=f"day {day}")])
            r = run_cycle(s, st, CycleRequest(None), now=clock)
            assert r.outcome == "registered", r.reason
            clock.advance(86400)
        final = run_cycle(s, st, CycleRequest(None), now=clock)  # nothing new: it only prunes
        assert final.job_id is None
        ggufs = sorted(p.name for p in state_dir.glob("exports/*/*.gguf"))
        assert ggufs == ["chatos-v4.q8_0.gguf", "chatos-v5.q8_0.gguf"], ggufs
        modelfiles = sorted(p.read_text().splitlines()[1] for p in state_dir.glob("exports/*/Modelfile"))
        assert modelfiles == ["FROM ./chatos-v4.q8_0.gguf", "FROM ./chatos-v5.q8_0.gguf"]  # went with their GGUFs
        datasets = sorted(p.name for p in (state_dir / "datasets").iterdir() if p.name.startswith("v"))
        champion = st.service.get().champion_job
        assert champion is not None
        # the datasets of the kept versions (latest v5 and previous latest v4) and of the champion's job
        kept_ds = {f"v{m.dataset_version}" for m in st.models.all() if m.version in (4, 5)}
        kept_ds.add(f"v{st.jobs.get(champion).dataset_version}")  # type: ignore[union-attr]
        assert set(datasets) == kept_ds == {"v4", "v5"}, datasets
        for job in st.jobs.recent():
            left = {p.name for p in Path(job.job_dir).iterdir()}
            assert {"metrics.jsonl", "result.json", "config.yaml"} <= left, (job.job_id, left)
            if job.job_id not in (champion,) and job.job_id not in {m.job_id for m in st.models.all()[-2:]}:
                assert left <= {"metrics.jsonl", "result.json", "job.log", "config.yaml"}, (job.job_id, left)
        assert len(st.pruned.keys("gguf")) == 3 and st.pruned.freed() > 0
        # the registry still lists every version: history stays, only the files went
        assert [m.version for m in st.models.all()] == [1, 2, 3, 4, 5]


def test_no_room_for_a_job_is_one_line_and_nothing_starts(make_settings: Any, records: Path, fake_python: Path,
                                                          base_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk too full for the job's estimate refuses the run before the trainer starts (a fake free-space reading:
    the one seam, since this machine's disk is not full); with room again, it trains."""
    s = make(make_settings, fake_python, base_model, cooldown=0)
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10 * disk.MIB)
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None), now=Clock())
        assert r.outcome == "no_space" and r.job_id is None and st.jobs.recent() == []
        assert "not enough disk for training job" in r.reason and "\n" not in r.reason, r.reason
        monkeypatch.undo()
        again = run_cycle(s, st, CycleRequest(None), now=Clock())
        assert again.job_id is not None and again.outcome == "promoted", again.reason


def test_offline_status_says_why_it_waits(make_settings: Any, records: Path, fake_python: Path, base_model: Path,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With no service running, ``status`` still shows the last cycle and its reason (and the disk it uses)."""
    s = make(make_settings, fake_python, base_model, min_new_examples=50)
    with State(s.state_dir()) as st:
        waited = run_cycle(s, st, CycleRequest(None), now=Clock())
    assert not waited.decision and "6/50 new rated examples" in waited.reason, waited.reason
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(yaml.safe_dump(s.model_dump(mode="json")))
    capsys.readouterr()
    assert cli.main(["--config", str(cfg), "status"]) == 0
    out = capsys.readouterr().out
    assert "service:   not running (state only)" in out
    assert f"last cycle: {waited.cycle_id} -> skipped: {waited.reason}" in out, out
    assert "disk:      state " in out and " free" in out


def test_a_missing_converter_is_one_line_and_the_export_waits(make_settings: Any, records: Path, fake_python: Path,
                                                              base_model: Path, tmp_path: Path,
                                                              ollama_standin: Any) -> None:
    """No converter in export.cache_dir and no export.auto_setup: nothing is downloaded, the reason is one line that
    says what to run, and the promoted model's export resumes once setup has put the converter there."""
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    base: dict[str, Any] = {
        "training": {"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                     "max_steps": 3, "timeout": 60, "env": {"FAKE_TRAINER_MODE": "ok"}},
        "policy": {"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0},
        "dataset": {"min_train_examples": 1, "min_eval_examples": 1},
        "ollama": {"host": ollama_standin.url, "model_name": "chatos", "timeout_s": 5},
    }
    s = make_settings(**base, export={"cache_dir": str(empty), "timeout": 60})
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None), now=Clock())
        assert r.outcome == "export_failed" and "\n" not in r.reason, r.reason
        assert f"the GGUF converter is not set up in {empty}: run `chatos-retrain setup export`" in r.reason
        assert list(empty.iterdir()) == []  # nothing fetched behind the operator's back
        assert st.service.pending_export() is not None and st.models.all() == []
        # the operator sets it up where the config says (here: a converter checkout standing in for the cache)
        llama = tmp_path / "llama.cpp"
        (llama / "gguf-py" / "gguf").mkdir(parents=True)
        (llama / "gguf-py" / "gguf" / "__init__.py").write_text("")
        (llama / "convert_hf_to_gguf.py").write_text("raise SystemExit('not used')\n")
        fixed = make_settings(**base, export={"llama_cpp_dir": str(llama), "timeout": 60})
        nxt = run_cycle(fixed, st, CycleRequest(set()), now=Clock())
        assert nxt.counts["export_resumed"]["outcome"] == "registered", nxt.counts
        assert st.service.pending_export() is None and [m.status for m in st.models.all()] == ["registered"]


def test_setup_and_service_agree_on_the_converter_cache(tmp_path: Path) -> None:
    """`setup export` and the export read one setting: export.cache_dir, else the service's own cache."""
    from daemon.publish import converter

    assert converter.cache_dir_for(tmp_path / "c") == tmp_path / "c"
    env = {"CACHE_DIRECTORY": "/var/cache/chatos-retrain"}
    assert converter.cache_dir_for(None, env) == Path("/var/cache/chatos-retrain")
    with pytest.raises(converter.NotSetUp, match="run `chatos-retrain setup export`"):
        converter.require_installed(tmp_path)


def training_copy(cid: str, answer: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
            "metadata": {"source": "chatos_interaction", "conversation_id": cid, "mode": "normal",
                         "quality": "good", "model": "qwen2.5:7b", "timestamp": "2025-12-04T10:00:00"}}


def test_a_chat_deleted_before_the_first_read_is_not_trainable(store: Path, state: State) -> None:
    """A first install over an old store: ChatOS had already deleted g...2 (its day's logs/ file was rewritten
    without it) but kept its training_data copy. Absent from the logs of its day, it counts as deleted; a copy from
    today (its day not over) and one whose logs were never kept are left alone."""
    write_lines(logs_file(store, "2025-12-04"), [rec("g00000000001", quality="good", answer="kept")])
    write_lines(logs_file(store, "2025-12-05"), [rec("g00000000003", quality="good", answer="today")])
    write_lines(store / "training_data" / "training_2025-12-04.jsonl",
                [training_copy("g00000000001", "kept"), training_copy("g00000000002", "deleted in ChatOS")])
    write_lines(store / "training_data" / "training_2025-12-05.jsonl", [training_copy("g00000000004", "not yet")])
    report = Ingestor(state, store).scan()
    assert report.deleted == 1
    live = {e.cid for e in state.examples.eligible(["normal", "code"], 1, False)}
    assert live == {"g00000000001", "g00000000003", "g00000000004"}
    assert (state.conversations.get("g00000000002") or {}).get("deleted") == 1


def test_a_training_only_store_proves_nothing(store: Path, state: State) -> None:
    write_lines(store / "training_data" / "training_2025-12-04.jsonl", [training_copy("h00000000001", "a")])
    write_lines(store / "training_data" / "training_2025-12-05.jsonl", [training_copy("h00000000002", "b")])
    assert Ingestor(state, store).scan().deleted == 0
    assert {e.cid for e in state.examples.eligible(["normal", "code"], 1, False)} == {"h00000000001", "h00000000002"}
