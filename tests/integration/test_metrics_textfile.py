"""The metrics textfile after real cycles (the fake trainer), parsed with Prometheus' own text-format parser; the
``metrics`` verb; a textfile that cannot be written leaves the cycle as it was."""

from __future__ import annotations

import json
import stat
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import fb, feedback_file, logs_file, rec, write_lines
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemon import cli, settings
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.state import State

P = "chatos_retrain_"


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict[str, Any], name: str, **labels: str) -> float:
    """The value of the one sample named ``name`` (a counter's ``_total``, a summary's ``_sum``) with ``labels``."""
    found = [s.value for f in fams.values() for s in f.samples
             if s.name == P + name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return float(found[0])


@pytest.fixture
def trained(make_settings: Any, store: Path, fake_python: Path, base_model: Path, tmp_path: Path) -> settings.Settings:
    """Settings with the textfile on, and state after one promoting cycle and one that waits."""
    write_lines(logs_file(store), [rec(f"e0000000000{i}", quality="good", answer=f"answer {i}") for i in range(6)])
    write_lines(feedback_file(store), [fb("e00000000001"), fb("e00000000002", thumbs_up=False)])
    s: settings.Settings = make_settings(
        training={"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                  "max_steps": 3, "timeout": 60, "env": {"FAKE_TRAINER_MODE": "ok"}},
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 3600, "max_runs_per_day": 100},
        dataset={"min_train_examples": 1, "min_eval_examples": 1},
        export={"enabled": False},
        metrics={"textfile": str(tmp_path / "textfile" / "chatos_retrain.prom")},
    )
    assert s.metrics.textfile is not None
    s.metrics.textfile.parent.mkdir()
    with State(s.state_dir()) as st:
        first = run_cycle(s, st, CycleRequest(None))
        assert first.outcome == "promoted", first.reason
        second = run_cycle(s, st, CycleRequest(None))
        assert second.outcome == "skipped", second.reason
    return s


def test_the_textfile_after_real_cycles_parses_and_tells_what_happened(trained: settings.Settings) -> None:
    path = trained.metrics.textfile
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["chatos_retrain.prom"]
    fams = families(path.read_text())
    assert fams[P + "cycles"].type == "counter"
    assert value(fams, "cycles_total", outcome="promoted") == 1 and value(fams, "cycles_total", outcome="skipped") == 1
    assert value(fams, "cycles_total", outcome="error") == 0  # every outcome is there from the start
    assert {s.labels["outcome"] for s in fams[P + "cycles"].samples} >= {"registered", "train_failed", "rejected"}
    with State(trained.state_dir()) as st:
        job = st.jobs.recent()[0]
    promoted_at = fams[P + "last_promotion_timestamp_seconds"].samples[0].value
    assert fams[P + "last_promotion_timestamp_seconds"].type == "gauge"
    assert abs(promoted_at - datetime.now(UTC).timestamp()) < 120
    assert value(fams, "last_cycle_timestamp_seconds") >= promoted_at
    assert job.status == "promoted" and value(fams, "jobs", status="promoted") == 1
    assert job.started_at and job.finished_at  # state keeps them to the second
    took = (datetime.fromisoformat(job.finished_at) - datetime.fromisoformat(job.started_at)).total_seconds()
    assert value(fams, "job_duration_seconds_count") == 1 and value(fams, "job_duration_seconds_sum") == took
    assert value(fams, "last_job_duration_seconds") == pytest.approx(value(fams, "job_duration_seconds_sum"))
    assert value(fams, "tokens_per_second") == 100.0  # the fake trainer's metrics lines
    assert value(fams, "examples", kind="eligible") == 5 and value(fams, "examples", kind="new") == 0
    assert value(fams, "feedback_events_total") == 2 and fams[P + "feedback_events"].type == "counter"
    assert value(fams, "pending_registrations") == 0 and value(fams, "model_version") == 0  # export off
    assert value(fams, "dataset_version") == 1
    for what in ("state", "datasets", "jobs", "exports"):
        assert fams[P + "disk_used_bytes"].type == "gauge"
        assert value(fams, "disk_used_bytes", what=what) >= (1 if what in ("state", "datasets", "jobs") else 0)
    assert value(fams, "build_info", version=__import__("daemon").__version__) == 1


def test_the_metrics_verb(trained: settings.Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(json.dumps(settings.dump(trained)))
    assert cli.main(["--config", str(cfg), "metrics"]) == 0
    fams = families(capsys.readouterr().out)
    assert value(fams, "cycles_total", outcome="promoted") == 1
    assert cli.main(["--config", str(cfg), "metrics", "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["cycles"]["promoted"] == 1 and snap["examples"]["eligible"] == 5 and snap["feedback_events"] == 2
    out = tmp_path / "out" / "x.prom"
    out.parent.mkdir()
    assert cli.main(["--config", str(cfg), "metrics", "--out", str(out)]) == 0
    assert capsys.readouterr().out == "" and value(families(out.read_text()), "examples", kind="eligible") == 5
    assert cli.main(["--config", str(cfg), "metrics", "--out", str(tmp_path / "nowhere" / "x.prom")]) == 1
    assert "cannot write" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        cli.main(["metrics", "--help"])
    assert done.value.code == 0 and "--out FILE" in capsys.readouterr().out


def test_a_textfile_that_cannot_be_written_leaves_the_cycle_alone(make_settings: Any, store: Path,
                                                                  tmp_path: Path) -> None:
    write_lines(logs_file(store), [rec("e00000000001", quality="good")])
    s = make_settings(metrics={"textfile": str(tmp_path / "no-such-dir" / "chatos_retrain.prom")})
    with State(s.state_dir()) as st, capture_logs() as logs:
        result = run_cycle(s, st, CycleRequest(None))
        recorded = st.cycles.last()
    assert result.outcome != "error" and result.error is None
    assert recorded is not None and recorded.outcome == str(result.outcome)
    bad = [e for e in logs if e["event"] == "metrics.not_written"]
    assert len(bad) == 1 and bad[0]["log_level"] == "warning" and "No such file" in bad[0]["reason"]
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == ["metrics.not_written"]


def test_the_service_writes_the_textfile_at_start_and_after_its_cycles(make_settings: Any, store: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.cycle import metrics
    from daemon.ingest import watch
    from daemon.service.lifecycle import Service
    from daemon.service.sdnotify import Notifier

    path = tmp_path / "chatos_retrain.prom"
    s = make_settings(metrics={"textfile": str(path)})
    svc = Service(None, initial=s, watcher_factory=lambda root, **kw: watch.ScriptedWatcher(root=store),
                  notifier=Notifier(None))
    calls: list[bool] = []  # per write: did a cycle run before it?
    real = metrics.publish

    def spy(settings_: settings.Settings, state: State) -> bool:
        calls.append(svc.last_result is not None or svc.worker is not None)
        return real(settings_, state)

    monkeypatch.setattr(metrics, "publish", spy)
    t = threading.Thread(target=svc.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while (svc.last_result is None or len(calls) < 2) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        svc.stop_event.set()
        svc.wake.set()
        t.join(20)
    assert not t.is_alive() and calls[:2] == [False, True]  # at start (before the worker), then after the cycle
    fams = families(path.read_text())
    assert sum(s.value for s in fams[P + "cycles"].samples) == 1
