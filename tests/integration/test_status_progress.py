"""``status`` as a person reads it (issue 16): a running job's step N/M, %, tokens/s and ETA from its metrics file,
and a waiting service's one reason and when it expects to train."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from daemon import api
from daemon.state import JobRow, State

T0 = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def running_job(state: State, job_dir: Path, steps: int, max_steps: int) -> None:
    job_dir.mkdir(parents=True)
    lines = [{"event": "job_started", "timestamp": T0.isoformat()}]
    lines += [{"step": i, "train_loss": 2.0 - i / 10, "tokens_per_s": 500.0,
               "timestamp": (T0 + timedelta(seconds=3 * i)).isoformat()} for i in range(1, steps + 1)]
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    with state.transaction():
        state.jobs.add(JobRow(job_id="j-run", dataset_version=1, status="running", job_dir=str(job_dir),
                              config_path=str(job_dir / "config.yaml"), log_path=str(job_dir / "job.log"),
                              metrics_path=str(job_dir / "metrics.jsonl"), result_path=str(job_dir / "result.json"),
                              params={"training": {"max_steps": max_steps}}, created_at=T0.isoformat()))


def test_status_shows_step_percent_tokens_and_eta_of_a_running_job(make_settings: Any, state: State,
                                                                  tmp_path: Path) -> None:
    s = make_settings()
    running_job(state, tmp_path / "state" / "jobs" / "j-run", steps=5, max_steps=20)
    status = api.store_status(s, state, now=T0 + timedelta(seconds=15))
    assert status.job is not None
    assert status.job["step"] == 5 and status.job["percent"] == 25.0 and status.job["eta_s"] == 45.0
    assert status.job["line"] == "step 5/20 (25%), 500 tokens/s, loss 1.5000, ETA 45s"


def test_status_cli_says_what_training_waits_for_and_when(tmp_path: Path, store: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: st\npolicy:\n  min_new_examples: 5\n"
                   "  min_total_examples: 5\n")
    out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "status"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    waits = lines.index("training:  waits: 0/5 new rated examples (no model trained yet)")
    assert lines[waits + 1] == "           expected when 5 more new rated example(s) and 5 more rated example(s) in " \
                               "total and more positive feedback arrive"
    assert out.stderr == ""  # no log records at the default verbosity
