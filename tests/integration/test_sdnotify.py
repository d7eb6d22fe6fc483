"""sd_notify against real AF_UNIX datagram sockets created by the test (path and abstract), exact datagrams."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.service.sdnotify import Notifier

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class Receiver:
    """A bound SOCK_DGRAM socket standing in for systemd's notify socket; records the sender's pid like systemd."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    @property
    def env_value(self) -> str:
        return "@" + self.address[1:] if self.address.startswith("\0") else self.address

    def recv(self) -> bytes:
        return self.recv_with_pid()[0]

    def recv_with_pid(self) -> tuple[bytes, int | None]:
        data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        pid = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        return data, pid

    def assert_empty(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(4096)
        finally:
            self.sock.settimeout(5.0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer."""
    d = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest, short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    abstract = "\0chatos-retrain-test-" + os.urandom(6).hex()
    address = str(short_dir / "notify") if request.param == "path" else abstract
    r = Receiver(address)
    monkeypatch.setenv("NOTIFY_SOCKET", r.env_value)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield r
    r.close()


def test_each_message_is_one_exact_datagram(receiver: Receiver) -> None:
    n = Notifier.from_env()
    assert n.enabled
    try:
        assert n.ready()
        assert receiver.recv() == b"READY=1"
        assert n.ready("idle; last decision: 37/50 new rated examples since v3")
        assert receiver.recv() == b"READY=1\nSTATUS=idle; last decision: 37/50 new rated examples since v3"
        assert n.status("phase: ingest")
        assert receiver.recv() == b"STATUS=phase: ingest"
        assert n.watchdog()
        assert receiver.recv() == b"WATCHDOG=1"
        assert n.extend_timeout(30_000_000)
        assert receiver.recv() == b"EXTEND_TIMEOUT_USEC=30000000"
        assert n.stopping()
        assert receiver.recv() == b"STOPPING=1"
        assert n.stopping("stopping: finishing dataset build")
        assert receiver.recv() == b"STOPPING=1\nSTATUS=stopping: finishing dataset build"
        assert n.send(STATUS="a", ERRNO=0)
        assert receiver.recv() == b"STATUS=a\nERRNO=0"
        receiver.assert_empty()
    finally:
        n.close()


def test_reloading_carries_the_monotonic_clock(receiver: Receiver) -> None:
    n = Notifier.from_env()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.close()
    lines = receiver.recv().decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_line_breaks_in_a_status_cannot_inject_fields(receiver: Receiver) -> None:
    n = Notifier.from_env()
    n.status("bad config\nREADY=1\r\nSTOPPING=1")
    n.close()
    assert receiver.recv() == b"STATUS=bad config READY=1  STOPPING=1"


def test_status_is_sent_as_utf8(receiver: Receiver) -> None:
    n = Notifier.from_env()
    n.status("next window 02:00 UTC — in 5h12m")
    n.close()
    assert receiver.recv() == "STATUS=next window 02:00 UTC — in 5h12m".encode()


def test_without_notify_socket_everything_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    n = Notifier.from_env()
    assert not n.enabled
    assert n.watchdog_interval() is None
    with capture_logs() as logs:
        results = [n.ready(), n.status("x"), n.watchdog(), n.reloading(), n.stopping(), n.extend_timeout(1)]
    assert results == [False] * 6
    assert logs == []


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", "self", 15.0),
        ("30000000", None, 15.0),
        ("30000000", "other", None),
        ("0", "self", None),
        ("soon", "self", None),
        ("30000000", "not-a-pid", None),
        (None, "self", None),
    ],
)
def test_watchdog_is_honoured_only_for_our_pid(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid))
    assert Notifier.from_env().watchdog_interval() == expected


def test_from_env_takes_an_explicit_mapping_and_pid() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "8000000", "WATCHDOG_PID": "4242"}
    n = Notifier.from_env(env, pid=4242)
    assert n.address == "\0x"
    assert n.watchdog_interval() == 4.0
    assert Notifier.from_env(env, pid=4243).watchdog_interval() is None


def test_unsupported_socket_kind_is_logged_and_ignored() -> None:
    with capture_logs() as logs:
        n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234", "WATCHDOG_USEC": "1000000"})
    assert not n.enabled and n.watchdog_interval() is None
    assert [e["event"] for e in logs] == ["sd_notify_unsupported_socket"]
    assert logs[0]["notify_socket"] == "vsock:2:1234"


def test_send_failure_never_raises_and_warns_once(short_dir: Path) -> None:
    path = short_dir / "gone"
    n = Notifier.from_env({"NOTIFY_SOCKET": str(path)})
    with capture_logs() as logs:
        assert n.ready() is False
        assert n.status("still here") is False
        assert n.watchdog() is False
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    assert warnings[0]["event"] == "sd_notify_failed"
    assert warnings[0]["socket"] == str(path)
    assert warnings[0]["fields"] == ["READY"]
    assert [e["log_level"] for e in logs] == ["warning", "debug", "debug"]
    # Once the manager's socket exists again, notifications flow.
    r = Receiver(str(path))
    try:
        assert n.status("back") is True
        assert r.recv() == b"STATUS=back"
    finally:
        n.close()
        r.close()


def test_abstract_failure_is_reported_with_an_at_sign() -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": "@chatos-retrain-nobody-" + os.urandom(6).hex()})
    with capture_logs() as logs:
        assert n.watchdog() is False
    n.close()
    assert logs[0]["socket"].startswith("@chatos-retrain-nobody-")


def test_a_real_process_notifies_from_its_own_pid(receiver: Receiver) -> None:
    """What systemd checks for NotifyAccess=main: the datagram comes from the service's own pid."""
    code = (
        "import os\n"
        "from daemon.service.sdnotify import Notifier\n"
        "n = Notifier.from_env()\n"
        "assert n.watchdog_interval() == 0.5, n.watchdog_interval()\n"
        "n.ready(f'pid {os.getpid()}')\n"
        "n.watchdog()\n"
    )
    env = {**os.environ, "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        # WATCHDOG_PID cannot name a pid before it exists; leaving it unset is what systemd does for the main process.
        first, pid = receiver.recv_with_pid()
        second, pid2 = receiver.recv_with_pid()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first == f"READY=1\nSTATUS=pid {proc.pid}".encode()
    assert second == b"WATCHDOG=1"
    assert pid == pid2 == proc.pid
