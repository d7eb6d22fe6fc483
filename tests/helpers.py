"""Small helpers shared by tests (importable as ``helpers``: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def in_ci() -> bool:
    """True under ``CI=true`` (how .ci/run is started): there a missing dependency is a failure, never a skip."""
    return os.environ.get("CI") == "true"


def need(condition: object, reason: str) -> None:
    """Go on when ``condition`` holds; otherwise skip the test locally but fail it under ``CI=true``.

    For tests of a real dependency (the training stack, the Unsloth venv, the converter, the container rootfs and
    nspawn, Go, systemd-analyze): a developer without it gets a skip that names the setup step, while CI, whose
    setup installs all of them, must not go green by skipping what it claims to test. Only GPU-only tests may call
    ``pytest.skip`` directly.
    """
    __tracebackhide__ = True  # report the skip or failure at the test's line, not here
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true and a dependency is missing (a skip would hide it): {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)  # also from a module's top level (need_module)


def need_module(name: str, reason: str) -> ModuleType:
    """``pytest.importorskip`` for a module the CI setup installs: under ``CI=true`` a failed import fails."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        need(False, f"{reason} ({exc})")
        raise  # unreachable: need() raised; keeps the type checker sure a module comes back


def write_lines(path: Path, objs: list[dict[str, Any]], mode: str = "a") -> None:
    """Append (or write) records the way ChatOS does: json.dumps + newline, one line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open(mode, encoding="ascii") as f:
        for o in objs:
            f.write(json.dumps(o) + "\n")


def rec(cid: str, user: str = "How do I reverse a list?", answer: str = "Use xs[::-1].", **kw: Any) -> dict[str, Any]:
    """A minimal but complete ChatOS full record."""
    base: dict[str, Any] = {
        "session_id": "3f2a9c0d1e4b5a67",
        "conversation_id": cid,
        "started_at": "2025-12-05T14:03:11.123456",
        "ended_at": "2025-12-05T14:03:15.654321",
        "messages": [
            {"role": "user", "content": user, "timestamp": "2025-12-05T14:03:11.123500", "model": None,
             "tokens": None, "latency_ms": None},
            {"role": "assistant", "content": answer, "timestamp": "2025-12-05T14:03:15.654000",
             "model": "qwen2.5:7b", "tokens": None, "latency_ms": 4530.2},
        ],
        "mode": "normal",
        "rag_enabled": True,
        "rag_context": None,
        "project_id": None,
        "project_name": None,
        "models_used": ["qwen2.5:7b"],
        "chosen_model": "qwen2.5:7b",
        "council_votes": {"qwen2.5:7b": 13},
        "quality": "unrated",
        "user_feedback": None,
        "thumbs_up": None,
        "total_tokens": 0,
        "total_latency_ms": 4530.2,
        "error": None,
    }
    base.update(kw)
    return base


def fb(cid: str, thumbs_up: bool | None = True, quality: str | None = None, ts: str | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"conversation_id": cid}
    if thumbs_up is not None:
        ev["thumbs_up"] = thumbs_up
    if quality is not None:
        ev["quality"] = quality
    ev["timestamp"] = ts or datetime(2026, 11, 25, 10, 0, 0).isoformat()
    return ev


def logs_file(root: Path, day: str = "2025-12-05") -> Path:
    return root / "logs" / f"conversations_{day}.jsonl"


def feedback_file(root: Path, day: str = "2026-11-25") -> Path:
    return root / "feedback" / f"feedback_{day}.jsonl"


# -- running as an unprivileged user ---------------------------------------------------------------------------------

NOBODY = 65534  # uid and gid of nobody/nogroup on Debian
REPO = Path(__file__).resolve().parents[1]


def unprivileged(argv: Sequence[str]) -> list[str]:
    """``argv`` run as a user that file permissions apply to: as root, dropped to nobody with ``setpriv`` (util-linux),
    because root reads and writes past permission bits; otherwise unchanged (the caller is already unprivileged)."""
    if os.geteuid() != 0:
        return list(argv)
    need(shutil.which("setpriv"), "setpriv (util-linux) is missing: root cannot drop privileges for this test")
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


@contextmanager
def unprivileged_dir(prefix: str = "unpriv-") -> Iterator[Path]:
    """A fresh folder that the user of :func:`unprivileged` owns: outside pytest's tmp_path, whose parent is 0700 to
    everyone but root. Give files inside it to that user with :func:`give_away` after creating them."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        base.chmod(0o755)
        give_away(base)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def give_away(path: Path) -> None:
    """Hand ``path`` (recursively) to the unprivileged user when we are root; a no-op otherwise (we own it)."""
    if os.geteuid() != 0:
        return
    for p in [path, *path.rglob("*")]:
        os.chown(p, NOBODY, NOBODY, follow_symlinks=False)


def run_python_unprivileged(code: str, *args: str, timeout: float = 120) -> Any:
    """Run ``code`` in this interpreter as the unprivileged user, importing this tree; return its last stdout line
    decoded as JSON (the child prints its findings there)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1", "HOME": tempfile.gettempdir()}
    out = subprocess.run(unprivileged([sys.executable, "-c", code, *args]), capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=tempfile.gettempdir(), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.splitlines()[-1])
