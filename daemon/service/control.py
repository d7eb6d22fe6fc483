"""The control socket's protocol and its client: one owner-only Unix stream socket between the CLI and the running
service (:mod:`daemon.service.control_server` is the service's end).

Protocol, one connection per request, UTF-8 JSON lines::

    client -> {"cmd": "status" | "trigger" | "reload", ...}
    server -> {"progress": {...}}            zero or more, while the handler runs (``trigger --wait``)
    server -> {"ok": true, "result": {...}}  or {"ok": false, "error": "one line"}; then the server closes

Only the service's own user (or root) gets an answer; the server module says how.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Emit = Callable[[dict[str, Any]], None]
Handler = Callable[[dict[str, Any], Emit], dict[str, Any]]

MAX_REQUEST_BYTES = 64 * 1024
MAX_RESPONSE_LINE_BYTES = 16 * 1024 * 1024


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
    """An error text as one line (never empty)."""
    return " ".join(str(text).split()) or "error"


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
