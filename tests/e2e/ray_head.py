"""A real local Ray head for the Ray executor's tests and bench (``ray start --head`` through subprocess, stopped
with ``ray stop --force``): a private temp dir and free ports, ready once its Jobs API answers.

``ray stop --force`` stops every Ray process of this user on the machine, not only this head's: one head at a time
(the tests share one per session; the bench starts its own and is not run beside them)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")
START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Head:
    address: str  # the dashboard / Jobs API
    gcs: str  # the GCS address (ray start --address= for a worker node)
    temp_dir: Path
    port: int
    dashboard_port: int

    def start(self) -> Head:
        argv = [str(RAY), "start", "--head", "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                "--disable-usage-stats", f"--port={self.port}", f"--dashboard-port={self.dashboard_port}",
                f"--temp-dir={self.temp_dir}"]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed: {proc.stderr[-2000:]}")
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the Ray dashboard at {self.address} did not answer in {START_TIMEOUT_S:g}s")

    def stop(self) -> None:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, text=True, timeout=120, check=False)


def new_head() -> Head:
    """A head not started yet, on free ports, with a short temp dir (Ray's socket paths must stay short)."""
    port, dash = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    return Head(f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}", tmp, port, dash)


def remove(head: Head) -> None:
    shutil.rmtree(head.temp_dir, ignore_errors=True)
