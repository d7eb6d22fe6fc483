"""``chatos-retrain doctor``: each failed pre-flight check is one line saying how to fix it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon.train import doctor, jobspec


def bare_python(tmp_path: Path) -> Path:
    """A real interpreter with none of the training stack (a fresh venv without pip)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    return tmp_path / "bare" / "bin" / "python"


def test_missing_stack_base_model_and_bad_template_are_reported(make_settings: Any, tmp_path: Path) -> None:
    s = make_settings(training={"python": str(bare_python(tmp_path)), "backend": "transformers",
                                "chat_template": "vicuna", "base_model": str(tmp_path / "nomodel")})
    checks = {c.name: c for c in doctor.run(s)}
    assert not checks["chat template"].ok and "known:" in checks["chat template"].detail
    assert not checks["base model"].ok and "config.json" in checks["base model"].line()
    assert checks["trainer interpreter"].ok
    for mod in ("torch", "transformers", "trl", "peft"):
        c = checks[f"import {mod}"]
        assert not c.ok and "ModuleNotFoundError" in c.detail and "pip install torch==2.13.0" in c.line()
    assert checks["disk space"].ok
    assert all("\n" not in c.line() for c in checks.values())


def test_missing_interpreter(make_settings: Any, tmp_path: Path) -> None:
    s = make_settings(training={"python": str(tmp_path / "nope" / "python")})
    checks = {c.name: c for c in doctor.run(s)}
    assert not checks["trainer interpreter"].ok and "does not exist" in checks["trainer interpreter"].detail
    assert not checks["base model"].ok  # empty base_model


def test_cli_exit_code(tmp_path: Path, store: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: st\ntraining:\n  python: {tmp_path / 'missing'}\n")
    out = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "doctor"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1
    assert "[FAIL] trainer interpreter" in out.stdout and "set training.python" in out.stdout


def _json_lines(text: str) -> list[dict[str, Any]]:
    """The lines of ``text`` that are JSON objects (log records), parsed as the runner parses metrics lines."""
    return jobspec.parse_metrics(text.encode() + b"\n")[0]


def test_a_verb_prints_its_answer_and_logs_only_with_verbose(tmp_path: Path, store: Path) -> None:
    """Issue 16: on its own a verb prints its answer, not its log records (doctor's probe script was one); with -v
    (before or after the verb) the info records come back on stderr, as JSON lines off a terminal."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"store:\n  root: {store}\nstate:\n  dir: st\n")

    def doctor(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), *flags], capture_output=True,
                              text=True, timeout=120)

    quiet = doctor("doctor")
    assert "[ok  ] trainer interpreter" in quiet.stdout
    assert _json_lines(quiet.stdout) == [] and _json_lines(quiet.stderr) == []
    for flags in (("-v", "doctor"), ("doctor", "--verbose")):
        loud = doctor(*flags)
        events = [e.get("event") for e in _json_lines(loud.stderr)]
        assert "command.run" in events, (flags, loud.stderr[-2000:])
        assert _json_lines(loud.stdout) == []  # stdout stays the answer
