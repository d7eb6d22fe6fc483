"""The sd_notify protocol without libsystemd: newline-separated ``KEY=value`` datagrams to ``$NOTIFY_SOCKET``.

With no ``NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call is a no-op, so the service runs the
same way from a terminal. Sending never raises: a lost notification must not take the service down; the first
failure is logged as a warning, later ones at debug level.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

from daemon import log

_log = log.get("daemon.service.sdnotify")

SEND_TIMEOUT_S = 2.0  # a full receive queue on systemd's side must not stall the main loop for long


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares ``MONOTONIC_USEC`` against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _address(value: str) -> str | None:
    """``/run/systemd/notify`` stays a path; ``@name`` becomes the abstract address ``\\0name``; else None."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _one_line(value: object) -> str:
    return str(value).replace("\r", " ").replace("\n", " ")


class Notifier:
    """Speaks to the service manager. Build with ``from_env()``; ``address`` None means "not under systemd"."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """Read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. The watchdog is ours only when there is a
        socket and the pid is unset or equals ours (a child inheriting the variables must not ping for us).
        Unsupported socket kinds (``vsock:``) are logged and treated as unset."""
        env = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            _log.warning("sd_notify_unsupported_socket", notify_socket=raw)
        watchdog: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
            wd_pid = env.get("WATCHDOG_PID")
            if address is not None and usec > 0 and (not wd_pid or int(wd_pid) == pid):
                watchdog = usec
        except ValueError:
            watchdog = None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        """True when there is a socket to talk to."""
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``, as systemd advises), or None when off."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2 / 1_000_000

    def send(self, **fields: object) -> bool:
        """Send one datagram of ``KEY=value`` lines, in the order given. True when it was sent.

        Line breaks inside a value would start a bogus field, so they are replaced by spaces.
        """
        if self.address is None or not fields:
            return False
        data = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()).encode("utf-8")
        try:
            with self._lock:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    sock.settimeout(SEND_TIMEOUT_S)
                    self._sock = sock
                self._sock.sendto(data, self.address)
        except OSError as exc:
            where = self.address.replace("\0", "@")
            if not self._warned:
                self._warned = True
                _log.warning("sd_notify_failed", socket=where, error=str(exc), fields=sorted(fields))
            else:
                _log.debug("sd_notify_failed", socket=where, error=str(exc), fields=sorted(fields))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) is complete. An optional ``STATUS=`` goes in the same datagram."""
        return self.send(READY=1) if status is None else self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """``STATUS=``: one line shown by ``systemctl status``."""
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the main loop is alive. Call only from the loop, and only while it is healthy."""
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (required by systemd >= 253 for Type=notify-reload, ignored before).
        Follow with ``ready()`` when the reload is done."""
        return self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec())

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send(STOPPING=1) if status is None else self.send(STOPPING=1, STATUS=status)

    def extend_timeout(self, usec: int) -> bool:
        """``EXTEND_TIMEOUT_USEC=``: ask for ``usec`` more microseconds in the current start/stop/runtime phase."""
        return self.send(EXTEND_TIMEOUT_USEC=int(usec))

    def close(self) -> None:
        """Release the socket (it is reopened on the next send)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
