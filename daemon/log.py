"""One logging chain: structlog renders our events and the stdlib's (watchdog, apscheduler, httpx) alike.

Every line has ``event``, ``level`` and ``timestamp`` (UTC ISO 8601) plus bound context (``cycle_id`` ...). Where
it goes (``log.format``, ``auto`` by default):

* ``journal`` (``auto`` picks it when stdout is the journal, i.e. ``$JOURNAL_STREAM`` names stdout, as under
  systemd): each line is one entry sent with the native journal protocol, ``MESSAGE`` the JSON line, ``PRIORITY``
  from the level (so ``journalctl -p warning`` filters), and the ids as fields (``CHATOS_CYCLE_ID``,
  ``CHATOS_JOB_ID``, ``CHATOS_EVENT``...: ``journalctl -u chatos-retrain CHATOS_CYCLE_ID=...``). If the journal
  socket refuses an entry, the line goes to stdout with a ``<N>`` syslog priority prefix, which journald also reads.
* ``json``: JSON lines on stdout (``auto`` when stdout is not a terminal);
* ``console``: a console renderer (``auto`` on a terminal).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_QUIET = ("watchdog", "apscheduler", "httpx", "httpcore")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "chatos-retrain"
# Event keys that become journal fields (CHATOS_<KEY>), so journalctl can select on them.
JOURNAL_FIELDS = ("event", "cycle_id", "job_id", "dataset_version", "model_version", "phase")


def syslog_priority(levelno: int) -> int:
    """A stdlib level as a syslog priority: 7 debug, 6 info, 4 warning, 3 error, 2 critical."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


def journal_fields(message: str, levelno: int, identifier: str = IDENTIFIER) -> dict[str, str]:
    """The journal entry of one rendered JSON line: MESSAGE (the line itself), PRIORITY, SYSLOG_IDENTIFIER and
    CHATOS_<KEY> for the ids in :data:`JOURNAL_FIELDS` the line carries."""
    fields = {"MESSAGE": message, "PRIORITY": str(syslog_priority(levelno)), "SYSLOG_IDENTIFIER": identifier}
    try:
        event = json.loads(message)
    except ValueError:
        return fields
    if isinstance(event, dict):
        for key in JOURNAL_FIELDS:
            value = event.get(key)
            if value is not None and not isinstance(value, dict | list):
                fields[f"CHATOS_{key.upper()}"] = str(value)
    return fields


def journal_datagram(fields: Mapping[str, str]) -> bytes:
    """The native journal protocol (systemd's ``sd_journal_send``): ``KEY=value`` lines, or for a value holding a
    newline ``KEY``, a newline, its length as 64-bit little endian, the value and a newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


def stream_is_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is systemd's journal stream (``$JOURNAL_STREAM`` is ``device:inode`` of it)."""
    raw = (env if env is not None else os.environ).get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in raw.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


class JournalHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Each record as one native journal entry; a line with a ``<N>`` prefix on the stream when the socket fails."""

    def __init__(self, stream: TextIO, path: str = JOURNAL_SOCKET) -> None:
        super().__init__(stream)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            try:
                self.sock.sendto(journal_datagram(journal_fields(message, record.levelno)), self.path)
            except OSError:  # no journal there, or an entry too large for one datagram: the stream keeps it
                self.stream.write(f"<{syslog_priority(record.levelno)}>{message}\n")
                self.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _auto_format(out: TextIO) -> str:
    if stream_is_journal(out):
        return "journal"
    return "console" if getattr(out, "isatty", lambda: False)() else "json"


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog and the stdlib root logger. Safe to call again (reload)."""
    out = stream if stream is not None else sys.stdout
    if fmt == "auto":
        fmt = _auto_format(out)
    renderer: Any
    if fmt in ("json", "journal"):
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=getattr(out, "isatty", lambda: False)())

    shared = _shared_processors()
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info if fmt == "console" else structlog.processors.dict_tracebacks,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _drop_logger_for_ours,
            renderer,
        ],
    )
    handler: logging.Handler = JournalHandler(out) if fmt == "journal" else logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_chatos_retrain", False):
            root.removeHandler(h)
            h.close()
    handler._chatos_retrain = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(_LEVELS.get(level, logging.INFO))
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # watchdog reports queue overflows as warnings and the watcher turns them into rescans: never drop them.
    logging.getLogger("watchdog").setLevel(logging.WARNING)


def _drop_logger_for_ours(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Our own loggers are named ``daemon.*``; keep ``logger`` only for third-party lines, where it says who spoke."""
    if str(event.get("logger", "")).startswith("daemon"):
        event.pop("logger", None)
    return event


def get(name: str = "daemon") -> Any:
    """A structlog logger (``daemon.<module>``)."""
    return structlog.stdlib.get_logger(name)
