"""The metrics' renderer (pure), escaping, the atomic textfile write and its failure: one warning, never a raise."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from daemon import __version__, settings
from daemon.cycle import metrics
from daemon.cycle.metrics import Snapshot


def parse(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def full() -> Snapshot:
    return Snapshot(
        generated_at=1_767_225_600.25, cycles={"promoted": 2, "skipped": 5, "error": 0}, last_cycle_at=1_767_225_500.5,
        last_promotion_at=1_767_225_000.0, model_version=3, dataset_version=4, jobs={"promoted": 2, "failed": 1},
        job_seconds_sum=90.5, job_seconds_count=3, last_job_seconds=30.25, last_job_tokens_per_second=171.5,
        examples={"eligible": 120, "positive": 100, "new": 7}, conversations=130, feedback_events=42,
        pending_registrations=1, train_failures=0, disk_used={"state": 4096, "datasets": 10, "jobs": 0, "exports": 5},
        disk_free=1 << 40,
    )


def test_the_exposition_parses_with_names_types_and_values() -> None:
    fams = parse(metrics.render(full()))
    p = "chatos_retrain_"
    assert fams[p + "cycles"].type == "counter"
    cycles = {s.labels["outcome"]: s.value for s in fams[p + "cycles"].samples}
    assert cycles == {"promoted": 2, "skipped": 5, "error": 0}
    assert all(s.name == p + "cycles_total" for s in fams[p + "cycles"].samples)
    assert fams[p + "feedback_events"].type == "counter"
    assert fams[p + "feedback_events"].samples[0].name == p + "feedback_events_total"
    assert fams[p + "feedback_events"].samples[0].value == 42
    summary = {s.name: s.value for s in fams[p + "job_duration_seconds"].samples}
    assert fams[p + "job_duration_seconds"].type == "summary"
    assert summary == {p + "job_duration_seconds_sum": 90.5, p + "job_duration_seconds_count": 3}
    gauges = {n: f.samples[0].value for n, f in fams.items() if f.type == "gauge" and len(f.samples) == 1}
    assert gauges[p + "last_promotion_timestamp_seconds"] == 1_767_225_000.0
    assert gauges[p + "last_cycle_timestamp_seconds"] == 1_767_225_500.5
    assert gauges[p + "model_version"] == 3 and gauges[p + "dataset_version"] == 4
    assert gauges[p + "tokens_per_second"] == 171.5 and gauges[p + "last_job_duration_seconds"] == 30.25
    assert gauges[p + "pending_registrations"] == 1 and gauges[p + "disk_free_bytes"] == 1 << 40
    assert gauges[p + "metrics_timestamp_seconds"] == 1_767_225_600.25
    assert fams[p + "build_info"].samples[0].labels == {"version": __version__}
    assert {s.labels["kind"]: s.value for s in fams[p + "examples"].samples} == {"eligible": 120, "positive": 100,
                                                                                "new": 7}
    assert {s.labels["what"]: s.value for s in fams[p + "disk_used_bytes"].samples} == {
        "state": 4096, "datasets": 10, "jobs": 0, "exports": 5}
    for name, fam in fams.items():  # conventions: the prefix, base units, counters end in _total
        assert name.startswith(p) and fam.documentation
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples)


def test_unknown_values_are_left_out_not_zeroed() -> None:
    text = metrics.render(Snapshot(generated_at=1.0))
    fams = parse(text)
    for gone in ("last_promotion_timestamp_seconds", "last_cycle_timestamp_seconds", "tokens_per_second",
                 "last_job_duration_seconds", "cycles", "disk_free_bytes"):
        assert f"chatos_retrain_{gone}" not in fams and f"chatos_retrain_{gone} " not in text
    assert fams["chatos_retrain_model_version"].samples[0].value == 0  # none yet: 0, documented
    assert text.endswith("\n") and "\n\n" not in text


def test_label_values_and_help_are_escaped() -> None:
    assert metrics.escape_label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    assert metrics.escape_help('a\\b"c\nd') == 'a\\\\b"c\\nd'
    tricky = 'we"ird\\out\ncome'
    text = metrics.exposition([metrics.Family("x_total", "counter", 'help "q" \\ and\nmore',
                                              [("", {"outcome": tricky}, 1)])])
    fam = parse(text)["chatos_retrain_x"]
    assert fam.samples[0].labels == {"outcome": tricky} and len(text.splitlines()) == 3
    assert fam.documentation == 'help "q" \\ and\nmore'


@pytest.mark.parametrize(("value", "text"), [(3, "3"), (0.1, "0.1"), (1e-07, "1e-07"), (float("nan"), "NaN"),
                                             (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (True, "1")])
def test_numbers(value: float, text: str) -> None:
    assert metrics.number(value) == text


def test_the_write_is_atomic_and_readable_by_another_user(tmp_path: Path) -> None:
    path = tmp_path / "chatos_retrain.prom"
    path.write_text("old 1\n")
    old = os.umask(0o077)  # the unit's UMask
    try:
        metrics.write_textfile(path, "new 2\n")
    finally:
        os.umask(old)
    assert path.read_text() == "new 2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chatos_retrain.prom"]  # no temporary left
    tmp = metrics.temp_name(path)
    assert tmp.parent == path.parent and tmp.name.startswith(".") and not tmp.name.endswith(".prom")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "chatos_retrain.prom"
    path.write_text("old 1\n")
    seen: list[str] = []

    def fail(src: Any, dst: Any) -> None:
        seen.append(Path(src).read_text())  # complete, synced, not yet visible under the real name
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        metrics.write_textfile(path, "new 2\n")
    assert seen == ["new 2\n"] and path.read_text() == "old 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chatos_retrain.prom"]


@pytest.mark.parametrize("where", ["missing/chatos_retrain.prom", "a-file/chatos_retrain.prom"])
def test_publish_failure_is_one_warning_never_a_raise(tmp_path: Path, state: Any, where: str) -> None:
    (tmp_path / "a-file").write_text("")
    s = settings.Settings(state={"dir": str(tmp_path / "state")}, metrics={"textfile": str(tmp_path / where)})
    with capture_logs() as logs:
        assert metrics.publish(s, state) is False
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in logs] == ["metrics.not_written"] and len(warnings) == 1
    assert str(tmp_path / where) in warnings[0]["path"] and warnings[0]["reason"]


def test_publish_is_off_by_default(state: Any, tmp_path: Path) -> None:
    s = settings.Settings(state={"dir": str(tmp_path / "state")})
    assert s.metrics.textfile is None and metrics.publish(s, state) is False


def test_the_textfile_setting(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("metrics:\n  textfile: prom/chatos_retrain.prom\n")
    s, _ = settings.load(p)
    assert s.metrics.textfile == tmp_path / "prom" / "chatos_retrain.prom"  # relative to the config file
    p.write_text("metrics:\n  textfile: /var/lib/node_exporter/chatos_retrain.txt\n")
    with pytest.raises(settings.ConfigError) as err:
        settings.load(p)
    assert any(e.startswith("At 'metrics.textfile'") and ".prom" in e for e in err.value.errors), err.value.errors


def test_the_state_queries_behind_the_counters(state: Any) -> None:
    from daemon.state import CycleRow, JobRow

    with state.transaction():
        for i, (outcome, at) in enumerate([("skipped", "2026-01-01T00:00:00+00:00"),
                                           ("promoted", "2026-01-02T00:00:00+00:00"),
                                           ("registered", "2026-01-03T00:00:00+00:00"),
                                           ("skipped", "2026-01-04T00:00:00+00:00")]):
            state.cycles.record(CycleRow(f"c{i}", at, outcome, "", {"timings": {"total": 2.5}}))
        state.jobs.add(JobRow(job_id="j1", dataset_version=1, status="promoted", job_dir="d", config_path="c",
                              log_path="l", metrics_path="m", result_path="r", params={}, created_at="2026-01-02",
                              started_at="2026-01-02T00:00:00Z", finished_at="2026-01-02T00:01:30Z",
                              result={"tokens_per_s": 171.5}))
        state.jobs.add(JobRow(job_id="j2", dataset_version=1, status="running", job_dir="d", config_path="c",
                              log_path="l", metrics_path="m", result_path="r", params={}, created_at="2026-01-03",
                              started_at="2026-01-03T00:00:00Z"))
    assert state.cycles.outcome_counts() == {"skipped": 2, "promoted": 1, "registered": 1}
    last = state.cycles.last_with(["promoted", "registered"])
    assert last is not None and last.cycle_id == "c2" and state.cycles.last_with([]) is None
    assert state.jobs.status_counts() == {"promoted": 1, "running": 1}
    assert state.jobs.spans() == [("j1", "2026-01-02T00:00:00Z", "2026-01-02T00:01:30Z")]
    s = settings.Settings(state={"dir": str(state.dir)})
    snap = metrics.gather(s, state, now=5.0)
    assert snap.generated_at == 5.0 and snap.cycles["promoted"] == 1 and snap.cycles["error"] == 0
    assert snap.last_promotion_at == 1_767_398_400 + 2.5  # 2026-01-03 00:00 UTC + the cycle's total
    assert (snap.job_seconds_sum, snap.job_seconds_count, snap.last_job_seconds) == (90.0, 1, 90.0)
    assert snap.last_job_tokens_per_second == 171.5  # the running job has not ended: the last one that did
