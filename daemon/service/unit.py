"""systemd units for this install: a pure renderer and a small installer.

``render_unit`` builds the unit text from one template per mode (``units/system.service.in``, ``units/user.service.in``,
package data) with the parts they share in their own files: the header and the hardening block both units apply.
The files in ``systemd/`` are exactly its output for the default install (a test checks this), so the commented
sample and the generated unit never drift apart.
``install_unit`` writes a rendered unit where systemd looks for it and says what to run next.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template

UNIT_NAME = "chatos-retrain.service"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_SYSTEM_PYTHON = Path("/opt/chatos-retrain/venv/bin/python")
DEFAULT_SYSTEM_CONFIG = Path("/etc/chatos-retrain/retrain.yaml")
# User-mode defaults are unit specifiers (%h home, %E config home), resolved by the user's own systemd.
DEFAULT_USER_VENV_BIN = "%h/.local/share/chatos-retrain/venv/bin"
DEFAULT_USER_CONFIG = "%E/chatos-retrain/retrain.yaml"
DEFAULT_STOP_TIMEOUT_S = 30.0
STOP_MARGIN_S = 15.0  # TimeoutStopSec = service.stop_timeout_s + this: the service must win the race

_PLAIN = re.compile(r"^[A-Za-z0-9_./:+,=@-]+$")
UNITS = "units"  # package data beside this module: the unit text, one file per part, rendered by _fill


def _fragment(name: str) -> str:
    """One part of the unit text (daemon/service/units/<name>, shipped as package data), final newline dropped."""
    return (resources.files(__name__.rpartition(".")[0]) / UNITS / name).read_text(encoding="utf-8").removesuffix("\n")


def _fill(name: str, values: Mapping[str, str]) -> str:
    """The fragment ``name`` with its ``${placeholders}`` filled by ``string.Template.substitute``.

    Strict both ways, so a misspelt placeholder cannot ship: one without a value raises KeyError (substitute), and
    so does a value that no placeholder takes. A literal ``$`` in the unit text is written ``$$`` in the file.
    """
    template = Template(_fragment(name))
    try:
        text = template.substitute(values)
    except KeyError as exc:
        raise KeyError(f"unit template {name}: ${{{exc.args[0]}}} has no value (a misspelt placeholder?)") from exc
    unused = sorted(set(values) - set(template.get_identifiers()))
    if unused:
        raise KeyError(f"unit template {name} has no placeholder for {unused}")
    return text


def quote(value: str, *, exec_line: bool = False) -> str:
    """One word for a unit file: double-quoted when needed, ``%`` (and in Exec lines ``$``) escaped.

    Raises ValueError for control characters, which no unit file can carry.
    """
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{value!r} contains a control character")
    if not _PLAIN.match(value):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    value = value.replace("%", "%%")
    if exec_line:
        value = value.replace("$", "$$")
    return value


def _seconds(value: float) -> str:
    return f"{value:g}s"


def exec_command(*, user_mode: bool, python: Path | None, config: Path | None, module: bool = False) -> str:
    """The ``ExecStart=`` value: the entry point next to ``python`` (or ``python -m daemon``), ``run --config``."""
    if python is None:
        if module:
            raise ValueError("module=True needs an explicit python path")
        entry = f"{DEFAULT_USER_VENV_BIN}/chatos-retrain" if user_mode else quote(
            str(DEFAULT_SYSTEM_PYTHON.parent / "chatos-retrain"), exec_line=True)
        argv = [entry]
    else:
        if not python.is_absolute():
            raise ValueError(f"the interpreter path must be absolute, got {python}")
        argv = [quote(str(python), exec_line=True), "-m", "daemon"] if module else [
            quote(str(python.parent / "chatos-retrain"), exec_line=True)]
    if config is None:
        cfg = DEFAULT_USER_CONFIG if user_mode else quote(str(DEFAULT_SYSTEM_CONFIG), exec_line=True)
    else:
        if not config.is_absolute():
            raise ValueError(f"the config path must be absolute, got {config}")
        cfg = quote(str(config), exec_line=True)
    return " ".join([*argv, "run", "--config", cfg])


def render_unit(
    *,
    user_mode: bool,
    python: Path | None,
    config: Path | None,
    user: str = "chatos-retrain",
    store_root: Path | None = None,
    module: bool = False,
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S,
) -> str:
    """The unit text for this install. Pure.

    ``python`` is the venv interpreter (None: the default install's); ExecStart is the ``chatos-retrain`` entry
    point next to it, or ``python -m daemon`` with ``module=True``. ``config`` None means the default config
    path. ``store_root`` (system mode only) narrows home access to a read-only bind of the store; without it all
    homes are read-only. ``stop_timeout_s`` is ``service.stop_timeout_s``; TimeoutStopSec adds a margin.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", user) or len(user) > 32:
        raise ValueError(f"{user!r} is not a valid user name")
    if stop_timeout_s <= 0:
        raise ValueError("stop_timeout_s must be positive")
    store = _fill("store-shared.in", {})
    if store_root is not None and not user_mode:
        if not store_root.is_absolute():
            raise ValueError(f"the store root must be absolute, got {store_root}")
        if ":" in str(store_root):
            raise ValueError(f"the store root {store_root} contains ':', which BindReadOnlyPaths= cannot take")
        store = _fill("store-bound.in", {"store_root": quote(str(store_root))})
    flag = " --user" if user_mode else ""
    values = {
        "header": _fill("header.in", {"mode": "user" if user_mode else "system", "flag": flag}),
        "hardening": _fill("hardening.in", {}),  # the one block both units share
        "exec": exec_command(user_mode=user_mode, python=python, config=config, module=module),
        "stop": _seconds(stop_timeout_s + STOP_MARGIN_S),
        "margin": f"{STOP_MARGIN_S:g}",
    }
    if user_mode:
        return _fill("user.service.in", values) + "\n"
    return _fill("system.service.in", {**values, "user": user, "store": store}) + "\n"


# -- installing ----------------------------------------------------------------------------------------------


class UnitExistsError(Exception):
    """A different unit is already installed at the destination and ``force`` was not given."""


@dataclass(frozen=True)
class InstallResult:
    path: Path
    written: bool  # False: an identical unit was already there
    next_commands: list[str] = field(default_factory=list)


def unit_path(user_mode: bool, environ: dict[str, str] | None = None) -> Path:
    """Where systemd looks for an admin-installed unit: /etc/systemd/system, or ~/.config/systemd/user."""
    if not user_mode:
        return SYSTEM_UNIT_DIR / UNIT_NAME
    env = os.environ if environ is None else environ
    base = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME") or Path.home()) / ".config")
    return base / "systemd" / "user" / UNIT_NAME


def entry_point_missing(python: Path) -> bool:
    """True when no ``chatos-retrain`` script sits next to ``python`` (then render with ``module=True``)."""
    return not os.access(python.parent / "chatos-retrain", os.X_OK)


def _setup_commands(service_user: str, store_root: Path | None) -> list[str]:
    """useradd / usermod lines still needed on this host for the system unit."""
    cmds = []
    try:
        pw = pwd.getpwnam(service_user)
    except KeyError:
        pw = None
        cmds.append(f"useradd --system --home-dir /var/lib/chatos-retrain --shell /usr/sbin/nologin {service_user}")
    if store_root is not None:
        try:
            st = store_root.stat()
        except OSError:
            return cmds
        if st.st_mode & 0o005 != 0o005:  # not world-readable/searchable: read it through the owner's group
            try:
                group = grp.getgrgid(st.st_gid)
            except KeyError:
                return cmds
            member = pw is not None and (pw.pw_gid == group.gr_gid or service_user in group.gr_mem)
            if not member:
                cmds.append(f"usermod -aG {group.gr_name} {service_user}")
    return cmds


def install_unit(
    text: str,
    *,
    user_mode: bool,
    force: bool = False,
    dest: Path | None = None,
    service_user: str = "chatos-retrain",
    store_root: Path | None = None,
) -> InstallResult:
    """Write ``text`` (from :func:`render_unit`) to the unit path; return it and the commands to run next.

    Refuses (UnitExistsError) to replace a different existing file unless ``force``. Writes atomically.
    """
    path = dest or unit_path(user_mode)
    ctl = "systemctl --user" if user_mode else "systemctl"
    nxt = [] if user_mode else _setup_commands(service_user, store_root)
    nxt += [f"{ctl} daemon-reload", f"{ctl} enable --now {UNIT_NAME}"]
    if user_mode:
        nxt.append("loginctl enable-linger \"$USER\"  # optional: keep it running while you are logged out")
    try:
        current = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        current = None
    if current == text:
        return InstallResult(path, False, nxt)
    if current is not None and not force:
        raise UnitExistsError(f"{path} exists and differs from the rendered unit; use --force to replace it "
                              "(or --print to compare)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return InstallResult(path, True, nxt)
