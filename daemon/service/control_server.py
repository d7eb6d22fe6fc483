"""The service's end of the control socket: accepts connections, checks the peer, answers each request in its own
thread (the protocol is in :mod:`daemon.service.control`).

Access: the socket file is 0600 (created under a temporary name, chmod-ed, then renamed into place, so it is never
reachable with looser permissions), a directory we create for it is 0700, and the peer's uid (``SO_PEERCRED``)
must be ours or root's. A socket file left by a dead process is replaced; one that answers means another instance
is running, which is an error.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import socket
import stat
import struct
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon import log
from daemon.service.control import (
    MAX_REQUEST_BYTES,
    ControlError,
    ControlInUse,
    Handler,
    RequestError,
    encode,
    one_line,
    parse_request,
)

_log = log.get("daemon.service.control_server")

MAX_CONNECTIONS = 16
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected Unix socket (Linux ``SO_PEERCRED``)."""
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


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
        self._thread = threading.Thread(target=self._serve, args=(self._listener, self._wake[0]),
                                        name="chatos-retrain-control", daemon=True)
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

    def _serve(self, listener: socket.socket, wake: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        sel.register(wake, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj is wake or self._stopping:
                        return
                    try:
                        conn, _addr = listener.accept()
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
