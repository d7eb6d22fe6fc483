"""The service as a real subprocess (``python -m daemon run``) with its JSON log lines and sd_notify datagrams, for the
tests that start, kill and restart it (tests/integration/test_service.py, tests/e2e/test_ray_cpu.py)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEADLINE = 60.0


class Proc:
    """A running ``chatos-retrain run`` with its JSON log lines and sd_notify datagrams collected."""

    def __init__(self, tmp: Path, cfg: Path, extra_env: dict[str, str] | None = None) -> None:
        self.notify_path = tmp / f"notify-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.sock.settimeout(0.2)
        self.notices: list[str] = []
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), "WATCHDOG_USEC": "2000000",
               **(extra_env or {})}
        env.pop("WATCHDOG_PID", None)
        self.p = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(cfg), "run"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=env)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_notify, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.raw.append(line)
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(line))

    def _read_notify(self) -> None:
        while not self._stop.is_set():
            try:
                self.notices.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def wait_for(self, pred: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            v = pred()
            if v:
                return v
            if self.p.poll() is not None:
                raise AssertionError(f"service exited ({self.p.returncode}) while waiting for {what}:\n"
                                     + "".join(self.raw[-30:]))
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n" + "".join(self.raw[-30:]))

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in list(self.lines) if e.get("event") == name]

    def notice(self, key: str) -> list[str]:
        return [n for n in list(self.notices) for part in n.split("\n") if part.startswith(key)]

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)
        self._stop.set()
        for t in self._threads:
            t.join(5)
        assert self.p.stdout is not None
        self.p.stdout.close()
        self.sock.close()
