"""The notifiers that run a process (through :mod:`daemon.proc`, argv lists, never a shell): the desktop
notification (``notify-send`` on the session bus, for the ``--user`` unit) and the command hook (the event as JSON
on its stdin, time-limited)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Mapping, Sequence

from daemon import proc
from daemon.notify.events import Event, one_line
from daemon.notify.webhook import NotifyError

_URGENCY = {"job_failed": "critical", "registration_failed": "critical", "ollama_waiting": "normal"}


class Desktop:
    """``notify-send`` when the binary is on PATH and ``DBUS_SESSION_BUS_ADDRESS`` is set (a system unit has no
    session bus: each event then fails with one line saying so)."""

    name = "desktop"

    def __init__(self, env: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> None:
        self._env = env
        self.timeout_s = timeout_s

    def send(self, event: Event, stop: threading.Event) -> str:
        env = dict(os.environ if self._env is None else self._env)
        if not env.get("DBUS_SESSION_BUS_ADDRESS"):
            raise NotifyError("no session bus (DBUS_SESSION_BUS_ADDRESS unset: desktop notifications need the "
                              "--user unit)")
        binary = shutil.which("notify-send", path=env.get("PATH"))
        if binary is None:
            raise NotifyError("notify-send not found on PATH")
        argv = [binary, "--app-name=chatos-retrain", f"--urgency={_URGENCY.get(event.event, 'low')}",
                "--", event.title, event.summary]
        return _run(argv, timeout_s=self.timeout_s, env=env, stdin="")


class Command:
    """The command hook: ``argv`` run with the event as one JSON object on stdin; exit 0 within ``timeout_s``."""

    name = "command"

    def __init__(self, argv: Sequence[str], timeout_s: float = 10.0) -> None:
        self.argv = list(argv)
        self.timeout_s = timeout_s

    def send(self, event: Event, stop: threading.Event) -> str:
        return _run(self.argv, timeout_s=self.timeout_s, env=None,
                    stdin=json.dumps(event.as_json(), sort_keys=True) + "\n")


def _run(argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None, stdin: str) -> str:
    try:
        done = proc.run_in_group(argv, timeout=timeout_s, env=env, stdin=stdin)
    except proc.TimeoutExpired:
        raise NotifyError(f"{os.path.basename(argv[0])} timed out after {timeout_s:g}s (killed)") from None
    except OSError as exc:
        raise NotifyError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        err = one_line(done.stderr or done.stdout or "", 200)
        raise NotifyError(f"{os.path.basename(argv[0])} exited {done.returncode}" + (f": {err}" if err else ""))
    return "exit 0"
