"""Conversation text travels by file, never on a command line: a secret written into a real store goes through the
real ingest, dataset build, job config and runner to a spawned (fake) trainer, and shows up in no argv, neither the
ones handed to the kernel by the service nor the one the child sees, while it is in the dataset file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import logs_file, rec, write_lines

from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.state import State
from daemon.train import jobspec, runner

FAKE_TRAINER = Path(__file__).resolve().parents[1] / "fakes" / "fake_trainer.py"
SECRET = "my password is hunter2 and my email is a@b.example"


def test_conversation_text_never_reaches_a_command_line(
    tmp_path: Path, make_settings: Any, store: Path, base_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # every process the code under test starts: subprocess.run goes through Popen too (daemon.proc is the only spawner)
    spawned: list[list[str]] = []

    class RecordingPopen(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, args: Any, *a: Any, **kw: Any) -> None:
            spawned.append([str(x) for x in args])
            super().__init__(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", RecordingPopen)
    # the trainer "interpreter" saves the argv the kernel gave it (/proc/$$/cmdline) before becoming the fake trainer
    cmdline_log = tmp_path / "trainer.cmdline"
    python = tmp_path / "bin" / "recording-python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\ncat /proc/$$/cmdline > "{cmdline_log}"\n'
                      f'exec "{sys.executable}" "{FAKE_TRAINER}" "$@"\n')
    python.chmod(0o755)

    write_lines(logs_file(store), [rec(f"s0000000000{i}", user=f"Remember this: {SECRET} ({i})",
                                       answer=f"Noted, {SECRET}.", quality="good") for i in range(4)])
    s = make_settings(
        training={"python": str(python), "base_model": str(base_model), "backend": "transformers", "max_steps": 2,
                  "env": {"FAKE_TRAINER_MODE": "ok"}},
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0, "max_runs_per_day": 10},
        # scrubbing would take the secret out of the dataset and leave this test nothing to find: text that the
        # scrubber misses must still travel by file only
        dataset={"min_train_examples": 1, "min_eval_examples": 1, "pii_scrub": False},
        export={"enabled": False},
    )
    with State(s.state_dir()) as st:
        result = run_cycle(s, st, CycleRequest(None))
        job = st.jobs.get(result.job_id) if result.job_id else None
    assert job is not None, result.reason
    cfg_path = Path(job.config_path)
    cfg = yaml.safe_load(cfg_path.read_text())
    trainer_argv = [a.decode() for a in cmdline_log.read_bytes().split(b"\0")[:-1]]

    # the secret made it into the data the trainer reads, so a leak would have been seen
    dataset = Path(cfg["dataset"]["train_path"]).read_text() + Path(cfg["dataset"]["eval_path"]).read_text()
    assert SECRET in dataset
    # ... and into no command line: not any argv spawned, not the child's own, not the config (it holds paths)
    for argv in [*spawned, trainer_argv]:
        assert not any(word in " ".join(argv) for word in ("hunter2", "a@b.example", "Remember this")), argv
    assert SECRET not in yaml.safe_dump(cfg)
    # the trainer really ran from that argv (so the checks above saw it), and finished
    assert [str(python), str(runner.TRAINER_SCRIPT), "--config", str(cfg_path)] in spawned
    assert trainer_argv[1:] == [str(python), str(runner.TRAINER_SCRIPT), "--config", str(cfg_path)]
    assert result.job_status == "promoted", result.reason


def test_argv_and_config_carry_paths_only(tmp_path: Path) -> None:
    """The pure half: a rendered config and the trainer argv hold paths and settings, no text."""
    cfg = jobspec.render_job_config({}, job_id="j", job_dir=tmp_path / "j", base_model=str(tmp_path),
                                   chat_template="qwen-2.5", backend="auto", train_path=tmp_path / "train.jsonl",
                                   eval_path=tmp_path / "eval.jsonl", max_steps=1, champion_adapter=None)
    argv = jobspec.trainer_argv(Path("/usr/bin/python3"), runner.TRAINER_SCRIPT, tmp_path / "j" / "config.yaml")
    assert all(a.startswith("/") or a == "--config" for a in argv)
    assert SECRET not in repr(cfg) and SECRET not in " ".join(argv)  # data travels by file path only
