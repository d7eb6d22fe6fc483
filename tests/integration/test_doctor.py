"""``chatos-retrain doctor``: each failed pre-flight check is one line saying how to fix it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon.train import doctor


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
