"""A real systemd in a container for the system tests: build (or reuse) a Debian rootfs, boot it, run commands in it.

The rootfs is debootstrapped once from the machine's own configured Debian mirror into a cache folder and reused
(a marker file records the recipe it was built from). Every boot uses ``--volatile=overlay``: the cached tree is
the read-only lower layer and all writes (the project install, users, the store, the journal) go to a tmpfs that
disappears at power-off, so each test session starts from the same clean image.

Also a script: ``python tests/system/container.py build`` builds or reuses the rootfs (``.ci/system-setup.sh``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

PROJECT_ROOT = Path(__file__).resolve().parents[2]
RECIPE_VERSION = 1
# systemd as PID 1 with a bus; PAM + a session bus so user managers start (the --user unit); the interpreter and
# its venv module for the project; procps for /bin/kill (ExecReload=).
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "libpam-systemd", "dbus-user-session", "python3", "python3-venv", "procps",
)
# Timers that would only add noise (and CPU) to a short-lived test container.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer",
    "systemd-tmpfiles-clean.timer", "getty.target", "console-getty.service",
)
MARKER = ".chatos-retrain-rootfs.json"
VENV = "/opt/chatos-retrain/venv"
WHEELS = "/var/cache/chatos-retrain/wheels"
CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
Log = Callable[[str], None]


class ContainerError(RuntimeError):
    """A harness step failed; the message says which and carries the command's output."""


def _say(msg: str) -> None:
    print(f"[system] {msg}", file=sys.stderr, flush=True)


# -- pure helpers ----------------------------------------------------------------------------------------------


def os_codename(os_release: str) -> str | None:
    """``VERSION_CODENAME`` from an os-release text (``bookworm``), or None."""
    for line in os_release.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "VERSION_CODENAME" and value.strip():
            return value.strip().strip("\"'")
    return None


def configured_mirror(sources: Mapping[str, str], suite: str) -> str | None:
    """The first Debian ``deb`` URI that serves ``suite``, from apt sources (deb822 ``*.sources`` or ``*.list``)."""
    for name, text in sources.items():
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
                    uris = fields.get("uris", "").split()
                    if uris:
                        return uris[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()  # drop [arch=... signed-by=...]
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1]
    return None


def runtime_deps(pyproject: str) -> list[str]:
    """The project's runtime requirements (``[project].dependencies``)."""
    return list(tomllib.loads(pyproject)["project"]["dependencies"])


def recipe(suite: str, deps: Sequence[str]) -> dict[str, Any]:
    """What a cached rootfs was built from; a different recipe means rebuild (base) or reinstall (deps)."""
    return {
        "version": RECIPE_VERSION,
        "base": {"suite": suite, "packages": list(PACKAGES), "masked": list(MASKED_UNITS)},
        "deps": hashlib.sha256("\n".join(sorted(deps)).encode()).hexdigest()[:16],
    }


def nspid_is_init(status_text: str) -> bool:
    """True when ``/proc/PID/status`` says the process is PID 1 of its innermost pid namespace."""
    for line in status_text.splitlines():
        if line.startswith("NSpid:"):
            ids = line.split()[1:]
            return len(ids) > 1 and ids[-1] == "1"
    return False


def parse_journal(text: str) -> list[dict[str, Any]]:
    """``journalctl -o json`` lines -> entries; ``MESSAGE`` that is one of our JSON log lines is parsed into ``msg``."""
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        message = entry.get("MESSAGE")
        if isinstance(message, list):  # journald gives non-UTF-8 messages as a byte array
            message = bytes(message).decode("utf-8", "replace")
            entry["MESSAGE"] = message
        entry["msg"] = None
        if isinstance(message, str) and message.startswith("{"):
            try:
                parsed = json.loads(message)
            except ValueError:
                parsed = None
            entry["msg"] = parsed if isinstance(parsed, dict) else None
        entries.append(entry)
    return entries


# -- host side -------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """``$CHATOS_RETRAIN_CACHE`` (as in .ci/train-setup.sh), else ``~/.cache/chatos-retrain``."""
    return Path(os.environ.get("CHATOS_RETRAIN_CACHE", "~/.cache/chatos-retrain")).expanduser()


def rootfs_dir() -> Path:
    """``$CHATOS_RETRAIN_SYSTEM_ROOTFS``, else ``<cache>/system-rootfs``."""
    env = os.environ.get("CHATOS_RETRAIN_SYSTEM_ROOTFS")
    return Path(env).expanduser() if env else cache_root() / "system-rootfs"


def impossible_reason() -> str | None:
    """Why a container with systemd cannot run here at all (the only reason to skip), else None."""
    if sys.platform != "linux":
        return "systemd-nspawn needs Linux"
    if os.geteuid() != 0:
        return "systemd-nspawn and debootstrap need root (run the system tests as root, e.g. in CI)"
    missing = [b for b in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed: run .ci/system-setup.sh (apt: debootstrap systemd-container)"
    return None


def _host_codename() -> str:
    try:
        name = os_codename(Path("/etc/os-release").read_text())
    except OSError:
        name = None
    return name or "bookworm"


def _apt_sources() -> dict[str, str]:
    out: dict[str, str] = {}
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for p in files:
        if p.is_file() and p.suffix in (".list", ".sources"):
            out[p.name] = p.read_text(errors="replace")
    return out


def _run_host(argv: Sequence[str], *, log: Log, timeout: float, cwd: Path | None = None) -> None:
    log("$ " + " ".join(argv))
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise ContainerError(f"{argv[0]} failed with exit status {proc.returncode}:\n{tail}")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise rootfs builds between concurrent test sessions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _debootstrap(target: Path, suite: str, mirror: str, log: Log) -> None:
    partial = target.with_name(target.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    _run_host(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "--components=main",
               suite, str(partial), mirror], log=log, timeout=1200)
    (partial / "etc/hostname").write_text("chatos-ci\n")
    (partial / "etc/machine-id").write_text("")  # a fresh id per boot (the image is shared)
    for unit in MASKED_UNITS:
        link = partial / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    log(f"debootstrap of {suite} from {mirror} took {time.monotonic() - start:.0f} s")


def _nspawn_oneshot(root: Path, argv: Sequence[str], log: Log, timeout: float = 600) -> None:
    """Run one command in the rootfs (no boot): writes go to the cached tree itself."""
    _run_host(["systemd-nspawn", "--quiet", "--keep-unit", "--register=no", "--private-network",
               f"--directory={root}", "--setenv=PIP_NO_INDEX=1", "--setenv=PIP_DISABLE_PIP_VERSION_CHECK=1",
               *argv], log=log, timeout=timeout)


def _install_deps(root: Path, deps: Sequence[str], log: Log) -> None:
    """Download the runtime wheels on the host (it has the package index), install them offline into the venv."""
    start = time.monotonic()
    wheels = root / WHEELS.lstrip("/")
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    _run_host([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(wheels),
               *deps], log=log, timeout=600)
    venv = root / VENV.lstrip("/")
    if venv.exists():
        shutil.rmtree(venv)
    _nspawn_oneshot(root, ["/usr/bin/python3", "-m", "venv", VENV], log)
    _nspawn_oneshot(root, [f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--find-links", WHEELS, *deps],
                    log)
    log(f"runtime dependencies installed in {time.monotonic() - start:.0f} s")


def ensure_rootfs(log: Log = _say) -> Path:
    """Build the rootfs if it is missing or stale, else reuse it. Returns its path. Raises ContainerError."""
    root = rootfs_dir()
    suite = _host_codename()
    deps = runtime_deps((PROJECT_ROOT / "pyproject.toml").read_text())
    want = recipe(suite, deps)
    with _locked(root.with_name(root.name + ".lock")):
        have = _read_marker(root)
        if have is not None and have.get("version") == want["version"] and have.get("base") == want["base"] \
                and have.get("deps") == want["deps"]:
            log(f"reusing rootfs {root}")
            return root
        if have is None or have.get("version") != want["version"] or have.get("base") != want["base"]:
            mirror = configured_mirror(_apt_sources(), suite)
            if mirror is None:
                raise ContainerError(f"no Debian mirror for {suite!r} in /etc/apt/sources.list(.d)")
            log(f"building rootfs {root} ({suite}, mirror {mirror}); takes a few minutes once")
            (root / MARKER).unlink(missing_ok=True)
            _debootstrap(root, suite, mirror, log)
        _install_deps(root, deps, log)
        (root / MARKER).write_text(json.dumps(want, indent=2) + "\n")
    return root


def build_project_wheel(dest: Path, log: Log = _say) -> Path:
    """The working tree as a wheel (no dependencies: those are in the rootfs venv already).

    Built from a copy of the tree, so setuptools' build/ and egg-info never land in (or leak from) the checkout.
    """
    src = dest / "src"
    shutil.copytree(PROJECT_ROOT / "daemon", src / "daemon", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (PROJECT_ROOT / name).exists():
            shutil.copy2(PROJECT_ROOT / name, src / name)
    _run_host([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
               "--wheel-dir", str(dest), str(src)], log=log, timeout=300)
    found = sorted(dest.glob("chatos_retrain-*.whl"))
    if not found:
        raise ContainerError(f"pip wheel wrote no chatos_retrain wheel into {dest}")
    return found[-1]


def _term_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, and nspawn then shuts the container down."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# -- the booted container ---------------------------------------------------------------------------------------


@dataclass
class Container:
    """A booted systemd-nspawn container; commands run inside through ``nsenter``."""

    rootfs: Path
    log_path: Path
    name: str = field(default_factory=lambda: f"chatos-ci-{uuid.uuid4().hex[:8]}")
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0
    _log_file: TextIO | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    # -- lifecycle --

    def boot(self, timeout: float = 120.0) -> float:
        """Start the container and wait until systemd says running/degraded. Returns the seconds it took."""
        start = time.monotonic()
        self._log_file = self.log_path.open("w")
        argv = ["systemd-nspawn", "--quiet", "--keep-unit", "--register=no", f"--directory={self.rootfs}",
                f"--machine={self.name}", "--volatile=overlay", "--private-network", "--link-journal=no",
                "--console=passive", "--boot"]
        self._log_file.write("$ " + " ".join(argv) + "\n")
        self._log_file.flush()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_term_with_parent)
        deadline = start + timeout
        while not self.pid:
            self.pid = self._find_init()
            if not self.pid:
                self._wait_or_fail(deadline, "systemd inside the container did not start")
        state = ""
        while state not in ("running", "degraded"):
            res = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                           timeout=max(1.0, deadline - time.monotonic()))
            state = res.stdout.strip()
            if state not in ("running", "degraded"):
                self._wait_or_fail(deadline, f"systemd is not up: is-system-running says {state!r} {res.stderr!r}")
        return time.monotonic() - start

    def _wait_or_fail(self, deadline: float, why: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise ContainerError(f"systemd-nspawn exited with {self.proc.returncode}: {why}\n{self.console_tail()}")
        if time.monotonic() > deadline:
            raise ContainerError(f"timed out: {why}\n{self.console_tail()}")
        self._stop.wait(0.2)

    def _find_init(self) -> int:
        """The container's PID 1 (as the host sees it): a descendant of systemd-nspawn that is init of its pid ns."""
        assert self.proc is not None
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                try:
                    status = Path(f"/proc/{child}/status").read_text()
                    comm = Path(f"/proc/{child}/comm").read_text().strip()
                except OSError:
                    continue
                if nspid_is_init(status) and comm == "systemd":
                    return child
                todo.append(child)
        return 0

    def poweroff(self, timeout: float = 60.0) -> int | None:
        """Power the container off: ``systemctl poweroff`` inside, then SIGTERM, then SIGKILL. Always safe to call."""
        if self.proc is None:
            return None
        if self.proc.poll() is None and self.pid:
            self.run(["systemctl", "poweroff", "--no-block"], check=False, timeout=15)
        for sig, wait in ((None, timeout), (signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
            if sig is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def console_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- inside --

    def run(self, cmd: Sequence[str] | str, *, check: bool = True, timeout: float = 60.0, user: str | None = None,
            input: str | None = None, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside (as root, or ``user``); a string runs through ``sh -c``."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        if user is not None:
            argv = ["runuser", "-u", user, "--", *argv]
        envs = [f"{k}={v}" for k, v in (env or {}).items()]
        full = ["nsenter", "-t", str(self.pid), "-a", "--", "/usr/bin/env", "-i", f"PATH={CONTAINER_PATH}",
                "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", *envs, *argv]
        try:
            # own session: nothing run inside (say, a `kill 0`) can signal the test process group
            res = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input, check=False,
                                 start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"timed out after {timeout:.0f} s in the container: {argv}") from exc
        if check and res.returncode != 0:
            raise ContainerError(f"in the container, {argv} exited {res.returncode}:\n{res.stdout}{res.stderr}")
        return res

    def path(self, inside: str) -> Path:
        """A path in the running container's filesystem, as the host can open it (through ``/proc/PID/root``)."""
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def write(self, inside: str, data: str | bytes, *, owner: str | None = None, mode: int = 0o644) -> None:
        """Write a file inside the container (parents created), optionally chown'd to ``owner``."""
        p = self.path(inside)
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            p.write_text(data, encoding="utf-8")
        else:
            p.write_bytes(data)
        p.chmod(mode)
        if owner is not None:
            self.run(["chown", owner, inside])

    def install_project(self, wheel: Path) -> None:
        """Install the working tree's wheel into the rootfs venv (deps are there already; offline)."""
        inside = f"/tmp/{wheel.name}"
        self.write(inside, wheel.read_bytes())
        self.run([f"{VENV}/bin/pip", "install", "--quiet", "--no-index", "--no-deps", "--disable-pip-version-check",
                  inside], timeout=180)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show`` properties of a unit."""
        res = self.run(["systemctl", "show", unit, *[f"--property={p}" for p in props]])
        out = {}
        for line in res.stdout.splitlines():
            key, _, value = line.partition("=")
            out[key] = value
        return out

    def journal(self, unit: str, *, since_cursor: str | None = None, user_unit: bool = False) -> list[dict[str, Any]]:
        """The unit's journal entries (``-o json``), parsed; ``since_cursor`` limits to entries after it.

        ``user_unit``: a unit of a user manager rather than of the system manager.
        """
        # (--user-unit would also match _UID of the caller, root here: match the field itself)
        match = [f"_SYSTEMD_USER_UNIT={unit}"] if user_unit else ["--unit", unit]
        argv = ["journalctl", "--no-pager", "-o", "json", *match]
        if since_cursor:
            argv.append(f"--after-cursor={since_cursor}")
        return parse_journal(self.run(argv).stdout)

    def events(self, unit: str, name: str | None = None, *, since_cursor: str | None = None,
               user_unit: bool = False) -> list[dict[str, Any]]:
        """Our JSON log lines (parsed MESSAGE) from the unit's journal, optionally only those with ``event == name``."""
        entries = self.journal(unit, since_cursor=since_cursor, user_unit=user_unit)
        msgs = [e["msg"] for e in entries if e["msg"] is not None]
        return [m for m in msgs if name is None or m.get("event") == name]

    def cursor(self, unit: str) -> str | None:
        """The journal cursor of the unit's latest entry (pass to ``since_cursor`` to see only what follows)."""
        entries = parse_journal(self.run(["journalctl", "--no-pager", "-o", "json", "-n", "1", "-u", unit]).stdout)
        return str(entries[-1]["__CURSOR"]) if entries else None

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        """Poll ``probe`` until it returns something truthy (returned), or fail after ``timeout`` naming ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            got = probe()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            self._stop.wait(interval)


# -- a ChatOS host inside the container ---------------------------------------------------------------------------

CHATOS_USER = "chatos"
SERVICE_USER = "chatos-retrain"
STORE = f"/home/{CHATOS_USER}/ChatOS-Memory"
VENV_PYTHON = f"{VENV}/bin/python"


def add_users(c: Container) -> None:
    """The ChatOS user (private 0700 home) and the service's system user, a member of the ChatOS user's group."""
    c.run(["useradd", "--create-home", "--user-group", CHATOS_USER])
    c.run(["chmod", "0700", f"/home/{CHATOS_USER}"])
    c.run(["useradd", "--system", "--home-dir", "/var/lib/chatos-retrain", "--shell", "/usr/sbin/nologin",
           SERVICE_USER])
    c.run(["usermod", "-aG", CHATOS_USER, SERVICE_USER])


def as_chatos_python(c: Container, code: str, timeout: float = 120.0) -> Any:
    """Run Python as the ChatOS user (umask 027: the store is group-readable only); returns its JSON stdout."""
    res = c.run(["sh", "-c", 'umask 027 && exec "$0" -c "$1"', VENV_PYTHON, code], user=CHATOS_USER,
                timeout=timeout)
    return json.loads(res.stdout) if res.stdout.strip() else None


def generate_store(c: Container, n_records: int, seed: int) -> dict[str, int]:
    """A realistic store (``daemon.demo.storegen``) written by the ChatOS user; returns what a reader must count."""
    code = (
        "import json; from pathlib import Path; from daemon.demo import storegen\n"
        f"t = storegen.generate_store(Path({STORE!r}), {n_records}, days=3, seed={seed}, feedback_fraction=0.5)\n"
        "print(json.dumps({'conversations': len(t.conversations), 'feedback_events': t.feedback_events}))\n"
    )
    return dict(as_chatos_python(c, code))


def append_rated(c: Container, n: int, seed: int) -> list[str]:
    """Append ``n`` new conversations plus a thumbs-up sidecar event for each, as ChatOS + the CLI would."""
    code = (
        "import json; from datetime import datetime; from pathlib import Path; from daemon.demo import storegen\n"
        f"root = Path({STORE!r}); when = datetime(2026, 11, 25, 12, 0, 0)\n"
        f"ids = storegen.append_records(root, {n}, seed={seed}, when=when, quality='unrated')\n"
        "fb = root / 'feedback' / f'feedback_{when:%Y-%m-%d}.jsonl'\n"
        "with fb.open('a', encoding='ascii') as f:\n"
        "    for cid in ids:\n"
        "        f.write(json.dumps({'conversation_id': cid, 'thumbs_up': True, 'feedback': None,\n"
        "                            'timestamp': when.isoformat()}) + '\\n')\n"
        "print(json.dumps(ids))\n"
    )
    return list(as_chatos_python(c, code))


@contextmanager
def booted(rootfs: Path, workdir: Path, log: Log = _say) -> Iterator[Container]:
    """Boot a container on ``rootfs`` and always power it off afterwards."""
    c = Container(rootfs=rootfs, log_path=workdir / "console.log")
    try:
        took = c.boot()
        log(f"container {c.name} booted in {took:.1f} s (init pid {c.pid})")
        yield c
    finally:
        rc = c.poweroff()
        log(f"container {c.name} powered off (systemd-nspawn exit status {rc})")


def main(argv: Sequence[str]) -> int:
    """``build``: build or reuse the rootfs; ``boot``: also boot it once and power it off (a smoke check)."""
    if not argv or argv[0] not in ("build", "boot"):
        print("usage: container.py build|boot", file=sys.stderr)
        return 2
    reason = impossible_reason()
    if reason:
        print(f"container.py: {reason}", file=sys.stderr)
        return 1
    try:
        start = time.monotonic()
        root = ensure_rootfs()
        _say(f"rootfs ready in {time.monotonic() - start:.0f} s: {root}")
        if argv[0] == "boot":
            with tempfile.TemporaryDirectory() as tmp, booted(root, Path(tmp)) as c:
                print(c.run(["systemctl", "is-system-running"], check=False).stdout.strip())
    except ContainerError as exc:
        print(f"container.py: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
