"""One logging chain: structlog renders our events and the stdlib's (watchdog, apscheduler, httpx) alike.

JSON lines on stdout when stdout is not a TTY (journald keeps them whole), a console renderer on a TTY.
Every line has ``event``, ``level`` and ``timestamp`` (UTC ISO 8601) plus bound context (``cycle_id`` ...).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_QUIET = ("watchdog", "apscheduler", "httpx", "httpcore")


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog and the stdlib root logger. Safe to call again (reload)."""
    out = stream if stream is not None else sys.stdout
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=getattr(out, "isatty", lambda: False)())

    shared = _shared_processors()
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.dict_tracebacks if fmt == "json" else structlog.processors.format_exc_info,
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
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_chatos_retrain", False):
            root.removeHandler(h)
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
