"""The suite's skip helper: a missing dependency skips on a developer's machine and fails under ``CI=true``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import need, need_module

TESTS = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("ci", [None, "false", "1", "TRUE"])
def test_missing_dependency_skips_outside_ci(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match="no frobnicator: run setup"):
        need(False, "no frobnicator: run setup")
    with pytest.raises(pytest.skip.Exception, match="no_such_module_xyz"):
        need_module("no_such_module_xyz", "the frob extra")


def test_missing_dependency_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"CI=true and a dependency is missing.*no frobnicator"):
        need(None, "no frobnicator: run setup")
    with pytest.raises(pytest.fail.Exception, match="the frob extra"):
        need_module("no_such_module_xyz", "the frob extra")


@pytest.mark.parametrize("ci", [None, "true"])
def test_a_present_dependency_passes_either_way(monkeypatch: pytest.MonkeyPatch, ci: str | None) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    need(True, "unused")
    need("/usr/bin/go", "a truthy path counts as present")
    assert need_module("json", "stdlib").dumps([]) == "[]"


@pytest.mark.parametrize(("ci", "rc", "summary"), [("", 0, "1 skipped"), ("true", 1, "1 failed")])
def test_a_real_pytest_run_goes_red_under_ci(tmp_path: Path, ci: str, rc: int, summary: str) -> None:
    """End to end: the same missing dependency is exit 0 (skipped) locally and exit 1 (failed) under CI=true."""
    (tmp_path / "test_dep.py").write_text(
        "from helpers import need\n\ndef test_it():\n    need(False, 'the frobnicator is missing')\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rsf", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert summary in proc.stdout and "the frobnicator is missing" in proc.stdout
