"""Processes: the only module that spawns them, signals them or reads their start times.

Every child gets an argv list (never a shell), no inherited descriptors, and is logged before it runs. Long children
(trainers, merge + convert) run in their own session with output to a log file, so that stopping them reaches their
whole group (:func:`stop_group`); short helpers either run to completion (:func:`run_command`) or talk over pipes
(:func:`spawn_piped`, the cold-ingest parse worker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from daemon import log

_log = log.get("daemon.proc")

TimeoutExpired = subprocess.TimeoutExpired  # for callers that run commands through us and must not import subprocess
Popen = subprocess.Popen  # the type of what the spawners return, for callers that must not import subprocess


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22), or None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int, start: int | None) -> bool:
    """The same process is still running (pid reuse is caught by the start time; zombies count as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    if state[state.rfind(b")") + 2 :].split()[:1] == [b"Z"]:
        return False
    return start is None or process_start_time(pid) == start


def signal_group(pid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        _log.warning("job.signal_denied", pid=pid, signal=sig.name)
        return False


def run_command(argv: Sequence[str], *, timeout: float, cwd: Path | None = None,
                env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A short helper command (argv list, never a shell), logged before it runs."""
    _log.info("command.run", argv=[str(a) for a in argv])
    return subprocess.run(list(argv), cwd=cwd, env=dict(env) if env is not None else None, capture_output=True,
                          text=True, timeout=timeout, check=False)


def run_in_group(argv: Sequence[str], *, timeout: float, stdin: str = "",
                 env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """A short command given ``stdin`` (argv list, never a shell), logged before it runs, in its own session: after
    ``timeout`` seconds its whole group is killed (what it started too) and :data:`TimeoutExpired` raised."""
    _log.info("command.run", argv=[str(a) for a in argv])
    child = subprocess.Popen(list(argv), env=dict(env) if env is not None else None, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             close_fds=True)
    try:
        out, err = child.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(child.pid, signal.SIGKILL)
        child.communicate()
        raise
    except BaseException:
        signal_group(child.pid, signal.SIGKILL)
        child.wait()
        raise
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def spawn_piped(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    """A short-lived helper process of the service's own code (the cold-ingest parse worker) on stdin/stdout pipes:
    argv list, never a shell, no inherited descriptors, stderr discarded (the helper reports on stdout). It stays in
    the service's session and cgroup, so stopping the service stops it; it exits by itself when the pipes close."""
    return subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            close_fds=True)


def spawn_in_session(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], log_path: Path
                     ) -> subprocess.Popen[bytes]:
    """A long child in its own session (its group is signalled as one), stdin closed, stdout and stderr appended
    to ``log_path`` (created 0600)."""
    logf = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        return subprocess.Popen(list(argv), cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    finally:
        os.close(logf)


def stop_group(pid: int, running: Callable[[], bool], name: str, why: str, grace: float,
               wake: threading.Event) -> None:
    """The escalation ladder for a child in its own session: SIGTERM to its group, ``grace`` seconds, SIGKILL, each
    logged. ``running`` says whether it still runs (a Popen's poll, or a pid + start-time check)."""
    _log.warning("job.sigterm", job_id=name, pid=pid, reason=why)
    signal_group(pid, signal.SIGTERM)
    end = time.monotonic() + grace
    while running() and time.monotonic() < end:
        wake.wait(0.1)
    if running():
        _log.warning("job.sigkill", job_id=name, pid=pid, reason=f"still running {grace:g}s after SIGTERM")
        signal_group(pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while running() and time.monotonic() < end:
            wake.wait(0.05)
