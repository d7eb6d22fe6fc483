"""The control socket over a real Unix socket in tmp_path: round trips, streaming, errors, permissions, takeover."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.service import control
from daemon.service.control import ControlError, ControlInUse, ControlUnavailable, RequestError
from daemon.service.control_server import ControlServer

WAIT = 5.0


def status_handler(req: dict[str, Any], emit: control.Emit) -> dict[str, Any]:
    if req["cmd"] == "status":
        return {"phase": "idle", "watcher": "inotify"}
    if req["cmd"] == "boom":
        raise RuntimeError("database is locked\nsecond line")
    raise RequestError(f"unknown command {req['cmd']!r}")


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "control.sock"


@pytest.fixture
def serve(sock_path: Path) -> Iterator[Callable[..., ControlServer]]:
    servers: list[ControlServer] = []

    def start(handler: control.Handler = status_handler, path: Path | None = None, **kw: Any) -> ControlServer:
        srv = ControlServer(path or sock_path, handler, **kw)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("chatos-retrain-control")]


def raw_exchange(path: Path, data: bytes, *, half_close: bool = False) -> list[dict[str, Any]]:
    """Send bytes as they are (no client framing) and read every reply line until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(str(path))
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return [json.loads(line) for line in buf.splitlines() if line.strip()]


def test_status_round_trip(serve: Callable[..., ControlServer], sock_path: Path) -> None:
    serve()
    assert control.request(sock_path, {"cmd": "status"}, timeout=WAIT) == {"phase": "idle", "watcher": "inotify"}
    # the wire format, as a non-Python client sees it
    assert raw_exchange(sock_path, b'{"cmd": "status"}\n') == [
        {"ok": True, "result": {"phase": "idle", "watcher": "inotify"}}
    ]


def test_progress_is_streamed_before_the_result(serve: Callable[..., ControlServer], sock_path: Path) -> None:
    def trigger(req: dict[str, Any], emit: control.Emit) -> dict[str, Any]:
        assert req == {"cmd": "trigger", "wait": True}
        for phase in ("ingest", "decide", "dataset"):
            emit({"phase": phase})
        return {"cycle_id": "c-1", "decision": "training not configured"}

    serve(trigger)
    seen: list[dict[str, Any]] = []
    result = control.request(sock_path, {"cmd": "trigger", "wait": True}, timeout=WAIT, on_progress=seen.append)
    assert seen == [{"phase": "ingest"}, {"phase": "decide"}, {"phase": "dataset"}]
    assert result == {"cycle_id": "c-1", "decision": "training not configured"}
    lines = raw_exchange(sock_path, b'{"cmd": "trigger", "wait": true}\n')
    assert [next(iter(line)) for line in lines] == ["progress", "progress", "progress", "ok"]


def test_handler_errors_become_ok_false_and_the_server_keeps_running(
    serve: Callable[..., ControlServer], sock_path: Path
) -> None:
    serve()
    with capture_logs() as logs:
        with pytest.raises(ControlError, match=r"^boom failed: database is locked second line$"):
            control.request(sock_path, {"cmd": "boom"}, timeout=WAIT)
        with pytest.raises(ControlError, match=r"^unknown command 'nope'$"):
            control.request(sock_path, {"cmd": "nope"}, timeout=WAIT)
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["control.handler_failed"]
    assert control.request(sock_path, {"cmd": "status"}, timeout=WAIT)["phase"] == "idle"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{nope\n", "malformed request: Expecting property name"),
        (b"[1, 2]\n", "malformed request: expected a JSON object, got list"),
        (b'{"verb": "status"}\n', 'malformed request: "cmd" must be a non-empty string'),
        (b"\xff\xfe\n", "malformed request: invalid UTF-8 at byte 0"),
        (b"\n", "malformed request: "),
    ],
)
def test_malformed_requests_are_answered(
    serve: Callable[..., ControlServer], sock_path: Path, data: bytes, message: str
) -> None:
    serve()
    (reply,) = raw_exchange(sock_path, data)
    assert reply["ok"] is False
    assert reply["error"].startswith(message)
    assert control.request(sock_path, {"cmd": "status"}, timeout=WAIT)["phase"] == "idle"


def test_a_request_without_newline_then_half_close_is_accepted(
    serve: Callable[..., ControlServer], sock_path: Path
) -> None:
    serve()
    (reply,) = raw_exchange(sock_path, b'{"cmd": "status"}', half_close=True)
    assert reply["ok"] is True


def test_oversize_request_is_refused(serve: Callable[..., ControlServer], sock_path: Path) -> None:
    serve()
    big = b'{"cmd": "status", "pad": "' + b"x" * (70 * 1024) + b'"}\n'
    (reply,) = raw_exchange(sock_path, big)
    assert reply == {"ok": False, "error": "request too large (limit 65536 bytes)"}
    # exactly at the limit is fine
    pad = control.MAX_REQUEST_BYTES - len(b'{"cmd":"status","pad":""}')
    assert control.request(sock_path, {"cmd": "status", "pad": "y" * pad}, timeout=WAIT)["phase"] == "idle"


def test_a_silent_client_times_out(serve: Callable[..., ControlServer], sock_path: Path) -> None:
    serve(timeout_s=0.2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(str(sock_path))
        reply = json.loads(s.recv(65536))
    assert reply == {"ok": False, "error": "no complete request within 0.2s"}


def test_socket_is_owner_only_and_its_new_dir_private(serve: Callable[..., ControlServer], sock_path: Path) -> None:
    assert not sock_path.parent.exists()
    srv = serve()
    st = os.lstat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
    assert [p.name for p in sock_path.parent.iterdir()] == ["control.sock"]  # no temp name left behind
    srv.stop()
    assert not sock_path.exists()


def test_an_existing_dir_keeps_its_mode(serve: Callable[..., ControlServer], tmp_path: Path) -> None:
    run = tmp_path / "state"
    run.mkdir(mode=0o750)
    run.chmod(0o750)
    serve(path=run / "control.sock")
    assert stat.S_IMODE(os.stat(run).st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(run / "control.sock").st_mode) == 0o600


def test_other_users_are_refused(serve: Callable[..., ControlServer], sock_path: Path) -> None:
    # SO_PEERCRED reports our uid; a server that only admits someone else must refuse us
    with capture_logs() as logs:
        serve(allowed_uids={os.getuid() + 4242})
        # repeated: the refusal may arrive and the server close before the request is sent; the client must still
        # report the refusal, not "closed without an answer"
        for _ in range(100):
            with pytest.raises(ControlError, match="permission denied"):
                control.request(sock_path, {"cmd": "status"}, timeout=WAIT)
    refused = [e for e in logs if e["event"] == "control.refused"]
    assert refused and refused[0]["peer_uid"] == os.getuid() and refused[0]["peer_pid"] == os.getpid()


def test_stale_socket_from_a_dead_process_is_replaced(serve: Callable[..., ControlServer], sock_path: Path) -> None:
    sock_path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # the file stays, nobody listens: what a crashed service leaves
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    with pytest.raises(ControlUnavailable):
        control.request(sock_path, {"cmd": "status"}, timeout=WAIT)
    with capture_logs() as logs:
        serve()
    assert any(e["event"] == "control.stale_socket_replaced" for e in logs)
    assert control.request(sock_path, {"cmd": "status"}, timeout=WAIT)["phase"] == "idle"


def test_a_second_server_on_a_live_socket_is_refused(serve: Callable[..., ControlServer], sock_path: Path) -> None:
    serve()
    second = ControlServer(sock_path, status_handler)
    with pytest.raises(ControlInUse, match="another chatos-retrain service is running"):
        second.start()
    assert control.request(sock_path, {"cmd": "status"}, timeout=WAIT)["phase"] == "idle"


def test_a_regular_file_in_the_way_is_not_clobbered(serve: Callable[..., ControlServer], sock_path: Path) -> None:
    sock_path.parent.mkdir()
    sock_path.write_text("precious")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        ControlServer(sock_path, status_handler).start()
    assert sock_path.read_text() == "precious"


def test_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / ("d" * 120) / "control.sock"
    with pytest.raises(ControlError, match="control socket path too long"):
        ControlServer(path, status_handler).start()


def test_client_without_a_service_gets_control_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ControlUnavailable, match="the service is not running") as exc_info:
        control.request(tmp_path / "run" / "control.sock", {"cmd": "status"}, timeout=WAIT)
    assert "\n" not in str(exc_info.value)


def test_client_timeout_and_a_long_request_not_blocking_status(
    serve: Callable[..., ControlServer], sock_path: Path
) -> None:
    release = threading.Event()
    entered = threading.Event()

    def handler(req: dict[str, Any], emit: control.Emit) -> dict[str, Any]:
        if req["cmd"] == "trigger":
            entered.set()
            release.wait(WAIT)
            return {"done": True}
        return {"phase": "training"}

    serve(handler)
    with pytest.raises(ControlError, match=r"no answer from the service within 0.2s"):
        control.request(sock_path, {"cmd": "trigger"}, timeout=0.2)
    assert entered.wait(WAIT)
    # while that trigger still runs, status answers
    assert control.request(sock_path, {"cmd": "status"}, timeout=WAIT) == {"phase": "training"}
    release.set()


def test_progress_to_a_vanished_client_does_not_break_the_handler(
    serve: Callable[..., ControlServer], sock_path: Path
) -> None:
    gone = threading.Event()
    finished = threading.Event()
    emitted: list[int] = []

    def handler(req: dict[str, Any], emit: control.Emit) -> dict[str, Any]:
        emit({"step": 0})
        gone.wait(WAIT)
        for i in range(1, 200):
            emit({"step": i, "pad": "z" * 4096})  # enough to fill the socket buffer of a reader that left
            emitted.append(i)
        finished.set()
        return {"ok": "finished anyway"}

    serve(handler)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(str(sock_path))
        s.sendall(b'{"cmd": "trigger", "wait": true}\n')
        assert json.loads(s.recv(65536).splitlines()[0]) == {"progress": {"step": 0}}
    gone.set()
    assert finished.wait(WAIT)
    assert len(emitted) == 199
    assert control.request(sock_path, {"cmd": "status"}, timeout=WAIT) == {"ok": "finished anyway"}


def test_stop_is_prompt_and_leaves_no_socket(sock_path: Path) -> None:
    srv = ControlServer(sock_path, status_handler)
    srv.start()
    srv.stop()
    assert not sock_path.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("chatos-retrain-control")]
    with pytest.raises(ControlUnavailable):
        control.request(sock_path, {"cmd": "status"}, timeout=WAIT)


def test_parse_request_and_framing_are_pure() -> None:
    assert control.parse_request(b'{"cmd": "reload"}') == {"cmd": "reload"}
    with pytest.raises(RequestError, match='"cmd" must be a non-empty string'):
        control.parse_request(b'{"cmd": ""}')
    line = control.encode({"progress": {"at": Path("/x")}})
    assert line.endswith(b"\n") and json.loads(line) == {"progress": {"at": "/x"}}
    assert control.one_line("a\n  b\tc") == "a b c"
