"""systemd units for this install: a pure renderer and a small installer.

``render_unit`` builds the unit text from one template per mode; the files in ``systemd/`` are exactly its output
for the default install (a test checks this), so the commented sample and the generated unit never drift apart.
``install_unit`` writes a rendered unit where systemd looks for it and says what to run next.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path

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

_HEADER = """\
# chatos-retrain: retrain the local ChatOS model from rated conversations ({mode} service).
#
# `chatos-retrain install-unit{flag}` writes this unit with the paths of the install it runs from;
# this copy is its rendering for the default install. Every hardening line says when to relax it;
# check the result with: systemd-analyze{analyze_flag} security chatos-retrain
"""

_SYSTEM_TEMPLATE = (
    _HEADER
    + """#
# Set-up, once (as root):
#   useradd --system --home-dir /var/lib/chatos-retrain --shell /usr/sbin/nologin chatos-retrain
#   usermod -aG <chatos-user> chatos-retrain && chmod g+rx /home/<chatos-user>
#     (read the store through its owner's group: the CLI as this user, and the service if homes stay read-only)
#   /etc/chatos-retrain/retrain.yaml: store.root: /home/<chatos-user>/ChatOS-Memory
#     and service.runtime_dir: /run/chatos-retrain (where the CLI looks for the control socket)
#   systemctl daemon-reload && systemctl enable --now chatos-retrain
# Feedback: this service only reads the store. Ratings reach its feedback/ sidecar through
# `chatos-retrain feedback ID --up|--down` run as the ChatOS user, who owns the store.

[Unit]
Description=chatos-retrain: retrain the local ChatOS model from rated conversations
# Ollama (if installed as a service) should be up before models are registered; ordering only.
After=network.target ollama.service

[Service]
Type=notify
# Only the main process may report READY=/STATUS=/WATCHDOG=; training children cannot.
NotifyAccess=main
User=@USER@
Group=@USER@
ExecStart=@EXEC@
ExecReload=/bin/kill -HUP $MAINPID
# The main loop pings every WatchdogSec/2 while healthy; a hung loop is killed and restarted.
WatchdogSec=60s
Restart=on-failure
RestartSec=5s
# Exit status 2 is a configuration or usage error: restarting cannot fix it, so don't loop on it.
RestartPreventExitStatus=2
# SIGTERM reaches the main process only: it stops its training child itself (grace, then SIGKILL on the
# child's process group). Whatever is still alive at TimeoutStopSec is SIGKILLed by systemd.
KillMode=mixed
# service.stop_timeout_s + @MARGIN@ s, so the service's own shutdown always finishes first.
TimeoutStopSec=@STOP@
# /var/lib/chatos-retrain ($STATE_DIRECTORY): state database, datasets, training jobs, adapters, GGUFs.
StateDirectory=chatos-retrain
StateDirectoryMode=0750
# /run/chatos-retrain ($RUNTIME_DIRECTORY): the control socket used by `chatos-retrain status/trigger`.
RuntimeDirectory=chatos-retrain
# /etc/chatos-retrain ($CONFIGURATION_DIRECTORY): retrain.yaml.
ConfigurationDirectory=chatos-retrain
# /var/cache/chatos-retrain: Hugging Face and other caches of the training children (home is read-only).
CacheDirectory=chatos-retrain
Environment=PYTHONUNBUFFERED=1 XDG_CACHE_HOME=%C/chatos-retrain HF_HOME=%C/chatos-retrain/huggingface

# -- Hardening. Each line: what it does; relax it when ... --
# New files are private to the service user. Relax (0027) if another group must read datasets or models.
UMask=0077
# No privilege gain through setuid binaries or file capabilities. Never needs relaxing.
NoNewPrivileges=yes
# No capabilities at all: the service runs unprivileged. Never needs relaxing.
CapabilityBoundingSet=
# No ambient capabilities either. Never needs relaxing.
AmbientCapabilities=
# The whole file system is read-only except the directories above. Relax with ReadWritePaths=DIR if
# state.dir, a job dir or export.llama_cpp_dir points elsewhere and must be written.
ProtectSystem=strict
@STORE@
# Private /tmp and /var/tmp. Relax only if a trainer must share temp files with another service.
PrivateTmp=yes
# Our own mount namespace; mounts made inside never leak out. Never needs relaxing.
PrivateMounts=yes
# Stays OFF on purpose: PrivateDevices=yes would hide /dev/nvidia* and /dev/dri, so GPU training would
# silently fall back to CPU. Devices are limited by the allow-list below instead.
PrivateDevices=no
# Only pseudo devices (null, zero, random, tty...) plus the allow-list below. Relax: add DeviceAllow= lines.
DevicePolicy=closed
# NVIDIA GPUs: nvidiactl, nvidia0..N, nvidia-uvm, nvidia-caps (every /proc/devices group named nvidia*).
# Delete on CPU-only hosts to tighten further.
DeviceAllow=char-nvidia* rw
# AMD/Intel render nodes (/dev/dri/*). Delete on CPU-only or NVIDIA-only hosts.
DeviceAllow=char-drm rw
# AMD ROCm compute (/dev/kfd). Delete on CPU-only or NVIDIA-only hosts.
DeviceAllow=char-kfd rw
# No writes to /proc/sys, /sys. Never needs relaxing.
ProtectKernelTunables=yes
# No module loading. Never needs relaxing (load nvidia/nvidia-uvm at boot, not from here).
ProtectKernelModules=yes
# No kernel log access. Never needs relaxing.
ProtectKernelLogs=yes
# cgroup tree read-only. Never needs relaxing.
ProtectControlGroups=yes
# No clock changes. Never needs relaxing.
ProtectClock=yes
# No hostname changes. Never needs relaxing.
ProtectHostname=yes
# Other users' processes are invisible in /proc. Relax (ProtectProc=default) only to debug from inside.
ProtectProc=invisible
# Stays OFF: the NVIDIA driver and CUDA read /proc/driver/nvidia, PyTorch reads /proc/cpuinfo and /proc/meminfo;
# ProcSubset=pid would hide them. Set ProcSubset=pid on CPU-only hosts if training still runs.
ProcSubset=all
# Stays OFF: Ollama is reached over loopback HTTP and a trainer may download a base model.
PrivateNetwork=no
# Local and IP sockets only. Relax: add AF_NETLINK if a trainer enumerates interfaces (multi-GPU NCCL).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# No new namespaces (containers, sandboxes inside). Relax only for a trainer that uses them itself.
RestrictNamespaces=yes
# No realtime scheduling. Never needs relaxing.
RestrictRealtime=yes
# No setuid/setgid files can be created. Never needs relaxing.
RestrictSUIDSGID=yes
# Stays OFF: CUDA kernels, Triton/torch.compile JIT and ctypes callbacks need writable+executable memory.
MemoryDenyWriteExecute=no
# No personality() tricks. Never needs relaxing.
LockPersonality=yes
# Native system calls only (no 32-bit compat entry). Never needs relaxing on 64-bit hosts.
SystemCallArchitectures=native
# The usual service system calls. Relax (add a group) only if the journal shows a trainer killed by seccomp.
SystemCallFilter=@system-service
# ... minus the privileged ones (mount, chown, setuid, ...). Relax only if a trainer must chown files.
SystemCallFilter=~@privileged
# A filtered call fails with EPERM instead of killing the process, so Python reports it as an error.
SystemCallErrorNumber=EPERM
# SysV/POSIX IPC objects of this user are removed when it stops. Relax if another service shares them.
RemoveIPC=yes
# A private kernel keyring. Never needs relaxing.
KeyringMode=private

[Install]
WantedBy=multi-user.target
"""
)

_STORE_SHARED = """\
# Homes are read-only, so the store (store.root in retrain.yaml) is readable and nothing there can be written.
# `install-unit` narrows this to the store alone (ProtectHome=tmpfs + BindReadOnlyPaths=<store>). Relax:
# never; feedback is written by the ChatOS user through the CLI, not by this service.
ProtectHome=read-only"""

_STORE_BOUND = """\
# Homes are an empty tmpfs; only the ChatOS store is bound back in, below. Relax: add BindReadOnlyPaths= for
# anything else the service must read under /home (a local base model), or use ProtectHome=read-only.
ProtectHome=tmpfs
# The ChatOS store, read-only: the service never writes it (feedback is written by the ChatOS user through the
# CLI). A missing store makes the start fail with status 226/NAMESPACE instead of training on nothing.
BindReadOnlyPaths=@STORE_ROOT@"""

_USER_TEMPLATE = (
    _HEADER
    + """#
# Runs as the ChatOS user, who owns the store (reads it; feedback goes through `chatos-retrain feedback`).
# Set-up, once:
#   systemctl --user daemon-reload && systemctl --user enable --now chatos-retrain
#   loginctl enable-linger "$USER"   # keep it running when you are logged out
# Namespace options (ProtectSystem=, PrivateTmp=, ...) are left out: a user manager can only apply them
# through unprivileged user namespaces, which many hosts disable; the system unit has the full sandbox.

[Unit]
Description=chatos-retrain: retrain the local ChatOS model from rated conversations

[Service]
Type=notify
# Only the main process may report READY=/STATUS=/WATCHDOG=; training children cannot.
NotifyAccess=main
ExecStart=@EXEC@
ExecReload=/bin/kill -HUP $MAINPID
# The main loop pings every WatchdogSec/2 while healthy; a hung loop is killed and restarted.
WatchdogSec=60s
Restart=on-failure
RestartSec=5s
# Exit status 2 is a configuration or usage error: restarting cannot fix it, so don't loop on it.
RestartPreventExitStatus=2
# SIGTERM reaches the main process only: it stops its training child itself; leftovers are SIGKILLed
# at TimeoutStopSec.
KillMode=mixed
# service.stop_timeout_s + @MARGIN@ s, so the service's own shutdown always finishes first.
TimeoutStopSec=@STOP@
# No StateDirectory=/RuntimeDirectory= here: systemd < 254 maps a user StateDirectory= to ~/.config, and the CLI,
# started outside this unit, would look elsewhere. Service and CLI both use state.dir (default
# ~/.local/state/chatos-retrain) for the state database, datasets, jobs, models and the control socket.
# ~/.config/chatos-retrain: retrain.yaml.
ConfigurationDirectory=chatos-retrain
Environment=PYTHONUNBUFFERED=1

# -- Hardening that needs no privileges (seccomp and friends). Each line: when to relax it. --
# New files are private to you. Relax (0027) if your group must read datasets or models.
UMask=0077
# No privilege gain through setuid binaries. Never needs relaxing.
NoNewPrivileges=yes
# Local and IP sockets only. Relax: add AF_NETLINK if a trainer enumerates interfaces (multi-GPU NCCL).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# No new namespaces. Relax only for a trainer that uses them itself.
RestrictNamespaces=yes
# No realtime scheduling. Never needs relaxing.
RestrictRealtime=yes
# No setuid/setgid files can be created. Never needs relaxing.
RestrictSUIDSGID=yes
# Stays OFF: CUDA kernels, Triton/torch.compile JIT and ctypes callbacks need writable+executable memory.
MemoryDenyWriteExecute=no
# No personality() tricks. Never needs relaxing.
LockPersonality=yes
# Native system calls only. Never needs relaxing on 64-bit hosts.
SystemCallArchitectures=native
# The usual service system calls. Relax (add a group) only if the journal shows a trainer killed by seccomp.
SystemCallFilter=@system-service
# ... minus the privileged ones. Relax only if a trainer must chown files.
SystemCallFilter=~@privileged
# A filtered call fails with EPERM instead of killing the process.
SystemCallErrorNumber=EPERM

[Install]
WantedBy=default.target
"""
)


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
    text = _USER_TEMPLATE if user_mode else _SYSTEM_TEMPLATE
    store = _STORE_SHARED
    if store_root is not None and not user_mode:
        if not store_root.is_absolute():
            raise ValueError(f"the store root must be absolute, got {store_root}")
        if ":" in str(store_root):
            raise ValueError(f"the store root {store_root} contains ':', which BindReadOnlyPaths= cannot take")
        store = _STORE_BOUND.replace("@STORE_ROOT@", quote(str(store_root)))
    replacements = {
        "{mode}": "user" if user_mode else "system",
        "{flag}": " --user" if user_mode else "",
        "{analyze_flag}": " --user" if user_mode else "",
        "@EXEC@": exec_command(user_mode=user_mode, python=python, config=config, module=module),
        "@USER@": user,
        "@STOP@": _seconds(stop_timeout_s + STOP_MARGIN_S),
        "@MARGIN@": f"{STOP_MARGIN_S:g}",
        "@STORE@": store,
    }
    for key, value in replacements.items():
        text = text.replace(key, value)
    return text


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
