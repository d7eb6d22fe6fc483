"""What every verb shares: exit codes, the one-line error, loading the config, printing JSON, the control socket."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daemon import log, settings
from daemon.service.lifecycle import SOCKET_NAME

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2  # bad configuration or usage
EXIT_DATA = 3  # not enough data, unknown dataset version ...


class CliError(Exception):
    """An expected failure: one line on stderr (none when empty) and ``code``."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def config_errors(exc: settings.ConfigError) -> None:
    for line in exc.errors:
        print(f"{exc.source}: {line}", file=sys.stderr)


def verb_log_level(configured: str, verbose: bool) -> str:
    """A verb's log level: the configured one with ``-v``, else warning at least (a verb prints its answer, not its
    internal log records)."""
    if verbose:
        return configured
    return configured if configured in ("warning", "error") else "warning"


def load(args: argparse.Namespace) -> settings.Settings:
    """The effective settings (``--config``, env, defaults); logs go to stderr so stdout stays the answer, at
    warning and above unless ``-v`` (the service's ``run`` keeps ``log.level``)."""
    try:
        s, _ = settings.load(args.config)
    except settings.ConfigError as exc:
        config_errors(exc)
        raise CliError("", EXIT_CONFIG) from None
    log.configure(verb_log_level(s.log.level, bool(getattr(args, "verbose", False))), s.log.format,
                  stream=sys.stderr)
    return s


def socket_path(s: settings.Settings) -> Path:
    return s.runtime_dir() / SOCKET_NAME


def is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:
        return False


def print_progress(update: dict[str, Any]) -> None:
    if not update.get("heartbeat"):
        print(f"  {update.get('phase')}: {update.get('detail', '')}", file=sys.stderr)


def version_number(text: str, what: str) -> int:
    """``N`` or ``vN`` -> N; a usage error otherwise."""
    digits = str(text).lstrip("v")
    if not digits.isdigit():
        raise CliError(f"not a {what}: {text!r} (expected N or vN)", EXIT_CONFIG)
    return int(digits)
