"""The runner with a fake trainer interpreter (a real subprocess checking its argv): paths, outcomes, timeout,
cancel, re-attach, and the whole cycle through train -> gate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import logs_file, rec, write_lines
from structlog.testing import capture_logs

from daemon import api, proc, settings
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.state import JobRow, State
from daemon.train import gate, jobspec, runner

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "fake_trainer.py"


def make_job(state: State, tmp_path: Path, fake_python: Path, base_model: Path, mode: str = "ok",
             steps: int = 5, champion: Path | None = None) -> runner.Job:
    ds = tmp_path / "ds"
    ds.mkdir(exist_ok=True)
    for n in ("train.jsonl", "eval.jsonl"):
        (ds / n).write_text('{"messages": []}\n')
    job_id = jobspec.new_job_id()
    cfg = jobspec.render_job_config({}, job_id=job_id, job_dir=state.dir / "jobs" / job_id, base_model=str(base_model),
                                    chat_template="qwen-2.5", backend="transformers", train_path=ds / "train.jsonl",
                                    eval_path=ds / "eval.jsonl", max_steps=steps, champion_adapter=champion)
    return runner.start_job(state, python=fake_python, config=cfg, dataset_version=1, cycle_id="c-test",
                            env={"FAKE_TRAINER_MODE": mode})


def supervise(state: State, job: runner.Job, timeout: float = 30.0, cancel: threading.Event | None = None,
              **kw: Any) -> runner.JobOutcome:
    return runner.supervise(state, job, timeout_s=timeout, cancel=cancel or threading.Event(),
                            stop=threading.Event(), grace_s=kw.pop("grace_s", 2.0), tick_s=0.05, **kw)


# -- pure --------------------------------------------------------------------------------------------------------


def test_every_path_in_the_rendered_config_is_absolute_even_from_relative_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed issue 1: relative paths in the config + another cwd used to reach the trainer as relative paths."""
    etc = tmp_path / "etc"
    (etc / "models" / "tiny").mkdir(parents=True)
    (etc / "retrain.yaml").write_text("state:\n  dir: state\ntraining:\n  base_model: ./models/tiny\n"
                                      "  python: ../bin/python\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s, _ = settings.load(etc / "retrain.yaml")
    assert s.training.python == etc.parent / "bin" / "python"
    assert s.training.base_model == str(etc / "models" / "tiny")
    cfg = jobspec.render_job_config({}, job_id="j-1", job_dir=Path("jobs/j-1"), base_model=s.training.base_model,
                                    chat_template="qwen-2.5", backend="auto", train_path=Path("ds/train.jsonl"),
                                    eval_path=Path("ds/eval.jsonl"), max_steps=3, champion_adapter=Path("champ"),
                                    base_dir=etc)
    paths = [cfg["model"]["name"], cfg["dataset"]["train_path"], cfg["dataset"]["eval_path"],
             cfg["training"]["output_dir"], cfg["metrics"]["output_path"], cfg["result"]["output_path"],
             cfg["gate"]["champion_adapter"]]
    assert all(Path(p).is_absolute() for p in paths), paths
    assert cfg["model"]["name"] == str(etc / "models" / "tiny")
    assert cfg["template"]["name"] == "qwen-2.5" and "<|im_start|>assistant" in cfg["template"]["response_part"]
    hub = jobspec.render_job_config({}, job_id="j-2", job_dir=tmp_path / "j", base_model="Qwen/Qwen2.5-0.5B",
                                    chat_template="llama-3.1", backend="auto", train_path=tmp_path / "t",
                                    eval_path=tmp_path / "e", max_steps=3, champion_adapter=None)
    assert hub["model"]["name"] == "Qwen/Qwen2.5-0.5B" and hub["gate"]["champion_adapter"] is None


def test_template_overrides_merge_but_paths_stay_ours(tmp_path: Path) -> None:
    cfg = jobspec.render_job_config({"training": {"learning_rate": 1e-5, "output_dir": "rel"}, "lora": {"r": 4}},
                                    job_id="j", job_dir=tmp_path / "j", base_model=str(tmp_path),
                                    chat_template="chatml", backend="auto", train_path=tmp_path / "t",
                                    eval_path=tmp_path / "e", max_steps=9, champion_adapter=None)
    assert cfg["training"]["learning_rate"] == 1e-5 and cfg["lora"]["r"] == 4 and cfg["lora"]["lora_alpha"] == 16
    assert cfg["training"]["output_dir"] == str(tmp_path / "j" / "output") and cfg["training"]["max_steps"] == 9


def test_unknown_template_lists_the_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"known: .*qwen-2\.5"):
        jobspec.render_job_config({}, job_id="j", job_dir=tmp_path, base_model="x", chat_template="vicuna",
                                  backend="auto", train_path=tmp_path, eval_path=tmp_path, max_steps=1,
                                  champion_adapter=None)


@pytest.mark.parametrize(("code", "status", "words"), [(0, "succeeded", "ok"), (2, "failed", "bad training config"),
                                                       (3, "failed", "data problem"), (4, "failed", "out of memory"),
                                                       (1, "failed", "trainer error"), (7, "failed", "status 7"),
                                                       (-9, "failed", "SIGKILL"), (143, "cancelled", "SIGTERM"),
                                                       (None, "failed", "no exit status")])
def test_interpret_exit(code: int | None, status: str, words: str) -> None:
    s, reason = jobspec.interpret_exit(code)
    assert s == status and words in reason


def test_argv_needs_absolute_paths(tmp_path: Path) -> None:
    assert jobspec.trainer_argv(Path("/usr/bin/python3"), Path("/a/train_qlora.py"), Path("/j/c.yaml")) == [
        "/usr/bin/python3", "/a/train_qlora.py", "--config", "/j/c.yaml"]
    with pytest.raises(ValueError):
        jobspec.trainer_argv(Path("python3"), Path("/a/t.py"), Path("/c.yaml"))


def test_parse_metrics_keeps_partial_lines_and_skips_garbage() -> None:
    lines, rest = jobspec.parse_metrics(b'{"step": 1}\nnot json\n[1]\n{"step": 2}\n{"ste')
    assert lines == [{"step": 1}, {"step": 2}] and rest == b'{"ste'


def test_template_file_matches_the_built_in_template() -> None:
    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "chatos_qlora.yaml").read_text())
    for section in ("training", "lora"):
        assert doc[section] | {k: None for k in ("output_dir",)} == jobspec.DEFAULT_TEMPLATE[section] | {
            k: None for k in ("output_dir",)}, section
    assert {k: v for k, v in doc["model"].items() if k != "name"} == {
        k: v for k, v in jobspec.DEFAULT_TEMPLATE["model"].items() if k != "name"}


# -- processes ---------------------------------------------------------------------------------------------------


def test_ok_job_writes_metrics_result_and_records_state(state: State, tmp_path: Path, fake_python: Path,
                                                        base_model: Path) -> None:
    job = make_job(state, tmp_path, fake_python, base_model, steps=5)
    seen: list[dict[str, Any]] = []
    out = supervise(state, job, on_progress=seen.append)
    assert out.status == "succeeded" and out.exit_code == 0, out.reason
    assert [m["step"] for m in seen] == [1, 2, 3, 4, 5]
    row = state.jobs.get(job.id)
    assert row is not None and row.status == "succeeded"
    assert row.result is not None and row.result["eval_loss_after"] == 1.5
    assert row.latest_metrics is not None and row.latest_metrics["step"] == 5 and row.pid == job.pid and row.pid_start
    assert (job.dir.stat().st_mode & 0o777) == 0o700
    assert ((job.dir / "config.yaml").stat().st_mode & 0o777) == 0o600
    assert Path(row.log_path).exists()


@pytest.mark.parametrize(("mode", "status", "words"), [
    ("crash", "failed", "RuntimeError: boom"), ("oom", "failed", "out of memory"),
    ("badconfig", "failed", "bad training config: unknown chat template"),
    ("noresult", "failed", "no result.json"),
])
def test_failing_trainers_become_one_line_reasons(state: State, tmp_path: Path, fake_python: Path,
                                                  base_model: Path, mode: str, status: str, words: str) -> None:
    job = make_job(state, tmp_path, fake_python, base_model, mode=mode)
    out = supervise(state, job)
    assert out.status == status and words in out.reason and "\n" not in out.reason
    assert state.jobs.get(job.id).error == out.reason  # type: ignore[union-attr]


def test_partial_and_garbage_metric_lines(state: State, tmp_path: Path, fake_python: Path, base_model: Path) -> None:
    for mode in ("partial", "garbage"):
        job = make_job(state, tmp_path, fake_python, base_model, mode=mode, steps=3)
        seen: list[dict[str, Any]] = []
        out = supervise(state, job, on_progress=seen.append)
        assert out.status == "succeeded"
        steps = [m["step"] for m in seen]
        assert steps == ([1, 1, 2, 3] if mode == "partial" else [1, 2, 3])
        assert all(isinstance(m["train_loss"], float) for m in seen)


def test_timeout_sends_sigterm_to_the_group(state: State, tmp_path: Path, fake_python: Path,
                                            base_model: Path) -> None:
    job = make_job(state, tmp_path, fake_python, base_model, mode="hang")
    with capture_logs() as logs:
        out = supervise(state, job, timeout=1.0)
    assert out.status == "timeout" and "training.timeout" in out.reason
    assert [e["event"] for e in logs if e["event"].startswith("job.sig")] == ["job.sigterm"]
    assert not proc.alive(job.pid, job.pid_start)


def ignores_sigterm(pid: int) -> bool:
    """Whether ``pid`` has set SIGTERM to ignored (the SigIgn mask in /proc/<pid>/status, bit signum - 1)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    raise AssertionError(f"no SigIgn line for pid {pid}")


def wait_until_ignoring_sigterm(pid: int, deadline_s: float = 10.0) -> None:
    """Block until the child has installed its SIGTERM disposition, failing after ``deadline_s``."""
    deadline = time.monotonic() + deadline_s
    while not ignores_sigterm(pid):
        assert time.monotonic() < deadline, f"pid {pid} did not ignore SIGTERM within {deadline_s} s"
        time.sleep(0.01)


def test_sigkill_after_grace_when_sigterm_is_ignored(state: State, tmp_path: Path, fake_python: Path,
                                                     base_model: Path) -> None:
    job = make_job(state, tmp_path, fake_python, base_model, mode="hang_hard")
    wait_until_ignoring_sigterm(job.pid)  # the ready signal: its SIGTERM disposition, read from the kernel
    with capture_logs() as logs:
        out = supervise(state, job, timeout=0.5, grace_s=1.0)
    assert out.status == "timeout"
    assert [e["event"] for e in logs if e["event"].startswith("job.sig")] == ["job.sigterm", "job.sigkill"]


def test_cancel(state: State, tmp_path: Path, fake_python: Path, base_model: Path) -> None:
    job = make_job(state, tmp_path, fake_python, base_model, mode="hang")
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    out = supervise(state, job, cancel=cancel)
    assert out.status == "cancelled" and state.jobs.get(job.id).status == "cancelled"  # type: ignore[union-attr]


def test_missing_interpreter_is_a_clear_failure(state: State, tmp_path: Path, base_model: Path) -> None:
    with pytest.raises(OSError):
        make_job(state, tmp_path, tmp_path / "no" / "python", base_model)
    row = state.jobs.recent()[0]
    assert row.status == "failed" and "cannot start the trainer" in (row.error or "")


def test_reattach_live_job_after_restart_and_interrupt_dead_one(state: State, tmp_path: Path, fake_python: Path,
                                                               base_model: Path) -> None:
    job = make_job(state, tmp_path, fake_python, base_model, mode="slow_ok", steps=10)
    # a second "running" row whose process is long gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with state.transaction():
        state.jobs.add(JobRow(**{**job.row, "job_id": "j-dead", "pid": dead.pid, "pid_start": 1, "status": "running"}))
    live, lost = runner.reattach(state)  # what a restarted service does
    assert [j.id for j in live] == [job.id] and lost == ["j-dead"]
    out = supervise(state, live[0])
    assert out.status == "succeeded" and out.result is not None
    assert state.jobs.get("j-dead").status == "interrupted"  # type: ignore[union-attr]
    job.proc.wait()  # type: ignore[union-attr]


def test_cancel_detached_kills_the_group(state: State, tmp_path: Path, fake_python: Path, base_model: Path) -> None:
    job = make_job(state, tmp_path, fake_python, base_model, mode="hang")
    assert runner.cancel_detached(state, job.id, grace_s=2.0)
    job.proc.wait(10)  # type: ignore[union-attr]
    assert state.jobs.get(job.id).status == "cancelled"  # type: ignore[union-attr]
    assert not runner.cancel_detached(state, job.id)


# -- the cycle: dataset -> train -> gate ---------------------------------------------------------------------------


def cycle_settings(make_settings: Any, fake_python: Path, base_model: Path, **env: str) -> settings.Settings:
    return make_settings(
        training={"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                  "max_steps": 3, "env": {"FAKE_TRAINER_MODE": "ok", **env}, "retry_backoff": 60},
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0, "max_runs_per_day": 10},
        dataset={"min_train_examples": 1, "min_eval_examples": 1},
        export={"enabled": False},
    )


def test_cycle_trains_gates_and_promotes_then_compares_with_the_champion(
    make_settings: Any, store: Path, fake_python: Path, base_model: Path
) -> None:
    write_lines(logs_file(store), [rec(f"a0000000000{i}", quality="good", answer=f"a{i}") for i in range(4)])
    s = cycle_settings(make_settings, fake_python, base_model)
    with State(s.state_dir()) as st:
        r1 = run_cycle(s, st, CycleRequest(None))
        assert r1.outcome == "promoted" and r1.job_status == "promoted" and r1.dataset_version == 1, r1.reason
        assert "the base model" in r1.reason and st.service.get().champion_job == r1.job_id
        assert st.service.get().last_trained_dataset == 1
        cfg = yaml.safe_load(Path(st.jobs.get(r1.job_id).config_path).read_text())  # type: ignore[union-attr]
        assert cfg["gate"]["champion_adapter"] is None
        # more data; the next candidate is worse than the champion -> rejected, champion unchanged
        write_lines(logs_file(store, "2026-11-26"), [rec(f"b0000000000{i}", quality="good", answer=f"b{i}")
                                                     for i in range(2)])
        s2 = cycle_settings(make_settings, fake_python, base_model, FAKE_EVAL_AFTER="2.5", FAKE_CHAMPION="1.8")
        r2 = run_cycle(s2, st, CycleRequest(None))
        assert r2.outcome == "rejected" and r2.dataset_version == 2, r2.reason
        cfg2 = yaml.safe_load(Path(st.jobs.get(r2.job_id).config_path).read_text())  # type: ignore[union-attr]
        assert cfg2["gate"]["champion_adapter"] == st.jobs.get(r1.job_id).result["adapter_dir"]  # type: ignore[union-attr,index]
        assert "2.5000 > champion" in r2.reason and st.service.get().champion_job == r1.job_id
        assert st.jobs.get(r2.job_id).status == "rejected"  # type: ignore[union-attr]
        assert st.cycles.runs_since("2000-01-01") == 2


def test_the_gate_checks_reach_the_summary_the_job_row_and_status(
    make_settings: Any, store: Path, fake_python: Path, base_model: Path, tmp_path: Path
) -> None:
    write_lines(logs_file(store), [rec(f"g0000000000{i}", quality="good", answer=f"g{i}") for i in range(4)])
    cases = tmp_path / "regressions.yaml"
    cases.write_text("- {id: two, prompt: '2+2?', expect: {contains: '4'}}\n")
    s = cycle_settings(make_settings, fake_python, base_model)
    s.gate.regressions_file = cases
    with State(s.state_dir()) as st:
        r1 = run_cycle(s, st, CycleRequest(None))
        assert r1.outcome == "promoted", r1.reason
        cfg = yaml.safe_load(Path(st.jobs.get(r1.job_id).config_path).read_text())  # type: ignore[union-attr]
        assert cfg["dataset"]["canary_path"] == str(gate.CANARY_PATH)
        checks = {c["name"]: c for c in r1.counts["gate"]["checks"]}
        assert list(checks) == list(gate.CHECKS) and r1.counts["gate"]["failed"] == []
        assert checks["canary"]["passed"] and checks["canary"]["candidate_loss"] == 2.5
        assert checks["learned_new"]["skipped"] and checks["preference"]["skipped"]
        assert checks["regressions"]["pending"] and checks["regressions"]["cases"] == 1
        assert st.jobs.get(r1.job_id).gate == r1.counts["gate"]  # type: ignore[union-attr]

        # the candidate forgets general text: canary perplexity e^3 vs the champion's e^2.5 (+65%)
        write_lines(logs_file(store, "2026-11-26"), [rec(f"h0000000000{i}", quality="good", answer=f"h{i}")
                                                     for i in range(2)])
        cases.write_text("- {id: two, prompt: '2+2?'}\n")  # and the regressions file went bad
        s2 = cycle_settings(make_settings, fake_python, base_model, FAKE_CANARY_AFTER="3.0", FAKE_EVAL_AFTER="1.0")
        s2.gate.regressions_file = cases
        r2 = run_cycle(s2, st, CycleRequest(None))
        assert r2.outcome == "rejected" and r2.counts["gate"]["failed"] == ["canary", "regressions"], r2.reason
        assert "canary: perplexity 20.09 is +64.9% over champion" in r2.reason
        assert f"regressions: cannot run: {cases}: entry 1 (id 'two'): needs 'expect'" in r2.reason
        status = api.store_status(s2, st).gate
        assert status is not None and status["champion"]["job_id"] == r1.job_id
        assert status["last_candidate"]["job_id"] == r2.job_id and status["last_candidate"]["status"] == "rejected"
        assert status["last_candidate"]["failed"] == ["canary", "regressions"]
        assert any(line.startswith("canary       FAILED") for line in status["last_candidate"]["lines"])

        # not required, a failing canary only reports
        s3 = cycle_settings(make_settings, fake_python, base_model, FAKE_CANARY_AFTER="3.0", FAKE_EVAL_AFTER="1.0")
        s3.gate.checks, s3.gate.required = ["loss", "canary"], ["loss"]
        r3 = run_cycle(s3, st, CycleRequest(None, forced=True))
        assert r3.outcome == "promoted", r3.reason
        assert [(c["name"], c["passed"], c["required"]) for c in r3.counts["gate"]["checks"]] == [
            ("loss", True, True), ("canary", False, False)]


def test_failed_job_backs_off_and_keeps_the_service_alive(
    make_settings: Any, store: Path, fake_python: Path, base_model: Path
) -> None:
    write_lines(logs_file(store), [rec(f"c0000000000{i}", quality="good", answer=f"c{i}") for i in range(4)])
    s = cycle_settings(make_settings, fake_python, base_model, FAKE_TRAINER_MODE="crash")
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "train_failed" and "RuntimeError: boom" in r.reason
        again = run_cycle(s, st, CycleRequest(None))
        assert again.outcome == "skipped" and "backing off after a failed job" in again.reason
        forced = run_cycle(s, st, CycleRequest(None, forced=True))
        assert forced.job_id is not None and st.service.get().train_failures == 2


def test_trigger_wait_json_runs_the_full_cycle_from_the_cli(tmp_path: Path, store: Path, fake_python: Path,
                                                            base_model: Path) -> None:
    write_lines(logs_file(store), [rec(f"d0000000000{i}", quality="good", answer=f"d{i}") for i in range(4)])
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: st\ntraining:\n  python: {fake_python}\n"
                   f"  base_model: {base_model}\n  max_steps: 2\n"
                   "dataset:\n  min_train_examples: 1\n  min_eval_examples: 1\nexport:\n  enabled: false\n")
    out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "trigger", "--wait", "--json"],
                         capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                            "FAKE_TRAINER_MODE": "ok"})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    for key in ("cycle_id", "decision", "reason", "dataset_version", "job_id", "job_status"):
        assert key in res
    assert res["decision"] == "train" and res["job_status"] == "promoted" and res["dataset_version"] == 1
    jobs = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "jobs", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert json.loads(jobs.stdout)[0]["job_id"] == res["job_id"]
    show = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "job", "show", res["job_id"]],
                          capture_output=True, text=True, timeout=60)
    assert show.returncode == 0 and res["job_id"] in show.stdout and "promoted" in show.stdout


def test_sigterm_to_the_group_reaches_grandchildren(state: State, tmp_path: Path) -> None:
    """The group kill is what makes a trainer's data-loader workers die with it."""
    script = tmp_path / "spawner.py"
    pidfile = tmp_path / "child.pid"
    script.write_text("import subprocess, sys, time\n"
                      f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                      f"open({str(pidfile)!r}, 'w').write(str(c.pid))\ntime.sleep(60)\n")
    spawner = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    assert proc.signal_group(spawner.pid, signal.SIGTERM)
    spawner.wait(10)
    deadline = time.monotonic() + 10
    while proc.alive(child, None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proc.alive(child, None)
