"""The control socket: an owner-only Unix stream socket between the CLI and the running service.

Protocol, one connection per request, UTF-8 JSON lines::

    client -> {"cmd": "status" | "trigger" | "reload", ...}
    server -> {"progress": {...}}            zero or more, while the handler runs (``trigger --wait``)
    server -> {"ok": true, "result": {...}}  or {"ok": false, "error": "one line"}; then the server closes

Access: the socket file is 0600 (created under a temporary name, chmod-ed, then renamed into place, so it is never
reachable with looser permissions), a directory we create for it is 0700, and the peer's uid (``SO_PEERCRED``)
must be ours or root's. A socket file left by a dead process is replaced; one that answers means another instance
is running, which is an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import selectors
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from daemon import log

_log = log.get("daemon.service.control")

Emit = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Emit], dict[str, Any]]

MAX_REQUEST_BYTES = 64 * 1024
MAX_RESPONSE_LINE_BYTES = 16 * 1024 * 1024
MAX_CONNECTIONS = 16
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class ControlError(Exception):
    """A control request that did not succeed; the message is one line meant for the operator."""


class ControlUnavailable(ControlError):
    """No service answers on the control socket (not running, or not reachable by this user)."""


class ControlInUse(ControlError):
    """The control socket belongs to a live service: another instance is running."""


class RequestError(Exception):
    """Raised by a handler for an expected refusal ("unknown command"); answered as ok:false, logged without a
    traceback."""


# -- framing (pure) ----------------------------------------------------------------------------------------------


def encode(obj: dict[str, Any]) -> bytes:
    """One protocol line. Values JSON cannot represent are sent as their str()."""
    return json.dumps(obj, default=str, separators=(",", ":")).encode("utf-8") + b"\n"


def parse_request(raw: bytes) -> dict[str, Any]:
    """The request object in ``raw`` (one line, newline optional), or :class:`RequestError` saying what is wrong."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(f"malformed request: invalid UTF-8 at byte {exc.start}") from None
    except ValueError as exc:
        raise RequestError(f"malformed request: {exc}") from None
    if not isinstance(value, dict):
        raise RequestError(f"malformed request: expected a JSON object, got {type(value).__name__}")
    cmd = value.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise RequestError('malformed request: "cmd" must be a non-empty string')
    return value


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "error"


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected Unix socket (Linux ``SO_PEERCRED``)."""
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


# -- server ------------------------------------------------------------------------------------------------------


class ControlServer:
    """Accepts control connections in its own thread; each connection is served in a short-lived thread so a
    long ``trigger --wait`` does not block ``status``.

    ``handler(request, emit)`` runs in the connection's thread and returns the result dict; ``emit(progress)``
    streams a progress line and never raises (a vanished client only stops the stream). A :class:`RequestError`
    or any other exception becomes ``{"ok": false, "error": ...}``; the server keeps running.
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        timeout_s: float = 10.0,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        allowed_uids: Iterable[int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.handler = handler
        self.timeout_s = timeout_s
        self.max_request_bytes = max_request_bytes
        self.max_connections = max_connections
        self.allowed_uids = frozenset(allowed_uids) if allowed_uids is not None else frozenset({os.getuid(), 0})
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._stopping = False

    # lifecycle ---------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and listen, then serve in a thread. Raises :class:`ControlInUse` when another instance answers on
        the socket, :class:`ControlError` for a path we cannot use."""
        if self._thread is not None:
            raise RuntimeError("control server already started")
        self._listener = self._bind()
        self._wake = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="chatos-retrain-control", daemon=True)
        self._thread.start()
        _log.info("control.listening", path=str(self.path))

    def stop(self) -> None:
        """Stop accepting, close open connections, remove the socket file (if it is still ours)."""
        self._stopping = True
        if self._wake is not None:
            with contextlib.suppress(OSError):
                self._wake[1].send(b"x")
        if self._thread is not None:
            self._thread.join(self.timeout_s)
        with self._lock:
            conns = list(self._conns.items())
        for _, conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread, _ in conns:
            thread.join(1.0)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._remove_if_ours()
        if self._wake is not None:
            for s in self._wake:
                s.close()
            self._wake = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _bind(self) -> socket.socket:
        path = self.path
        size = len(os.fsencode(path))
        if size > SUN_PATH_MAX:
            raise ControlError(f"control socket path too long ({size} > {SUN_PATH_MAX} bytes): {path}")
        parent = path.parent
        if not parent.exists():
            try:
                parent.mkdir(mode=0o700, parents=True)
            except OSError as exc:
                raise ControlError(f"cannot create {parent}: {exc.strerror or exc}") from None
        self._check_existing(path)
        tmp = parent / f".{path.name}.{secrets.token_hex(4)}"
        if len(os.fsencode(tmp)) > SUN_PATH_MAX:
            tmp = parent / f".c{secrets.token_hex(4)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(tmp))
            os.chmod(tmp, 0o600)
            listener.listen(self.max_connections)
            os.replace(tmp, path)  # atomic: replaces a stale socket, never exposes a looser mode
            st = os.stat(path)
            self._inode = (st.st_dev, st.st_ino)
        except OSError as exc:
            listener.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ControlError(f"cannot listen on {path}: {exc.strerror or exc}") from None
        listener.setblocking(False)
        return listener

    def _check_existing(self, path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{path} exists and is not a socket; remove it or choose another runtime dir")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            _log.info("control.stale_socket_replaced", path=str(path))
            return
        except TimeoutError:
            pass  # alive but its backlog is full: still another instance
        except OSError as exc:
            raise ControlError(f"cannot check the existing control socket {path}: {exc.strerror or exc}") from None
        finally:
            probe.close()
        raise ControlInUse(f"another chatos-retrain service is running (its control socket {path} answers)")

    def _remove_if_ours(self) -> None:
        if self._inode is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.warning("control.cleanup_failed", path=str(self.path), error=exc.strerror or str(exc))
        self._inode = None

    # serving ----------------------------------------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None and self._wake is not None
        wake = self._wake[0]
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(wake, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is wake or self._stopping:
                        return
                    try:
                        conn, _addr = self._listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        _log.warning("control.accept_failed", error=exc.strerror or str(exc))
                        continue
                    self._spawn(conn)
        finally:
            sel.close()

    def _spawn(self, conn: socket.socket) -> None:
        conn.setblocking(True)
        conn.settimeout(self.timeout_s)
        with self._lock:
            self._conns = {t: c for t, c in self._conns.items() if t.is_alive()}
            busy = len(self._conns) >= self.max_connections
            if not busy:
                thread = threading.Thread(
                    target=self._handle, args=(conn,), name="chatos-retrain-control-conn", daemon=True
                )
                self._conns[thread] = conn
        if busy:
            _send_quietly(conn, encode({"ok": False, "error": "service busy: too many control connections"}))
            conn.close()
            return
        thread.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            with conn:
                pid, uid = peer_uid(conn)
                if uid not in self.allowed_uids:
                    _log.warning("control.refused", peer_pid=pid, peer_uid=uid, reason="other user")
                    _send_quietly(
                        conn,
                        encode(
                            {
                                "ok": False,
                                "error": f"permission denied: the service runs as another user (uid {os.getuid()})",
                            }
                        ),
                    )
                    return
                response = self._respond(conn, pid)
                _send_quietly(conn, encode(response))
        finally:
            with self._lock:
                self._conns.pop(threading.current_thread(), None)

    def _respond(self, conn: socket.socket, pid: int) -> dict[str, Any]:
        try:
            raw = self._read_request(conn)
            request = parse_request(raw)
        except RequestError as exc:
            _log.warning("control.bad_request", peer_pid=pid, error=str(exc))
            return {"ok": False, "error": str(exc)}
        cmd = request["cmd"]
        _log.debug("control.request", cmd=cmd, peer_pid=pid)
        stream = _Stream(conn)
        try:
            result = self.handler(request, stream.emit)
        except RequestError as exc:
            _log.info("control.request_refused", cmd=cmd, error=str(exc))
            return {"ok": False, "error": one_line(str(exc))}
        except Exception as exc:
            _log.exception("control.handler_failed", cmd=cmd)
            return {"ok": False, "error": one_line(f"{cmd} failed: {exc}")}
        return {"ok": True, "result": result if result is not None else {}}

    def _read_request(self, conn: socket.socket) -> bytes:
        buf = bytearray()
        while True:
            try:
                chunk = conn.recv(min(65536, self.max_request_bytes + 1))
            except TimeoutError:
                raise RequestError(f"no complete request within {self.timeout_s:g}s") from None
            except OSError as exc:
                raise RequestError(f"connection failed: {exc.strerror or exc}") from None
            if not chunk:
                if not buf.strip():
                    raise RequestError("malformed request: empty")
                return bytes(buf)  # a client that half-closes without a newline
            nl = chunk.find(b"\n")
            if nl >= 0:
                buf += chunk[:nl]
                if len(buf) > self.max_request_bytes:
                    break
                return bytes(buf)
            buf += chunk
            if len(buf) > self.max_request_bytes:
                break
        raise RequestError(f"request too large (limit {self.max_request_bytes} bytes)")


class _Stream:
    """The ``emit`` given to a handler: progress lines until the client goes away, then silence."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.broken = False

    def emit(self, progress: dict[str, Any]) -> None:
        with self._lock:
            if self.broken:
                return
            if not _send_quietly(self._conn, encode({"progress": progress})):
                self.broken = True
                _log.info("control.client_gone")


def _send_quietly(conn: socket.socket, data: bytes) -> bool:
    try:
        conn.sendall(data)
        return True
    except OSError:  # the client hung up or stopped reading (timeout): nothing to tell it any more
        return False


# -- client ------------------------------------------------------------------------------------------------------


def request(
    path: Path,
    payload: dict[str, Any],
    *,
    timeout: float | None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Send one request and return its ``result``.

    ``timeout`` bounds connecting and each wait for the next line (None: wait as long as the service works, for
    ``trigger --wait``). Raises :class:`ControlUnavailable` when no service listens, :class:`ControlError` for an
    ``ok: false`` answer, a timeout or a broken reply; every message is one line.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            raise ControlUnavailable(f"the service is not running (no control socket answers at {path})") from None
        except PermissionError:
            raise ControlUnavailable(f"cannot reach the service at {path}: permission denied") from None
        except TimeoutError:
            raise ControlUnavailable(f"the service at {path} did not accept within {timeout:g}s") from None
        except OSError as exc:
            raise ControlUnavailable(f"cannot reach the service at {path}: {exc.strerror or exc}") from None
        try:
            # The service may answer (a refusal) and close before reading all of the request: read that answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode(payload))
            for line in _lines(sock):
                msg = _decode_reply(line)
                if "progress" in msg and "ok" not in msg:
                    if on_progress is not None:
                        on_progress(msg["progress"])
                    continue
                if msg.get("ok") is True:
                    result = msg.get("result")
                    return result if isinstance(result, dict) else {}
                raise ControlError(one_line(str(msg.get("error", "the service refused the request"))))
        except TimeoutError:
            raise ControlError(f"no answer from the service within {timeout:g}s") from None
        except (BrokenPipeError, ConnectionResetError):
            pass
        raise ControlError("the service closed the connection without an answer")
    finally:
        sock.close()


def _lines(sock: socket.socket) -> Iterable[bytes]:
    buf = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.strip():
                yield line
        if len(buf) > MAX_RESPONSE_LINE_BYTES:
            raise ControlError("reply line from the service is too long")


def _decode_reply(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line.decode("utf-8"))
    except ValueError:
        raise ControlError("malformed reply from the service") from None
    if not isinstance(msg, dict):
        raise ControlError("malformed reply from the service")
    return msg
