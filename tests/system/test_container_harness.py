"""The harness and the rendered unit under a real systemd, independent of the service's own ``run`` verb.

A probe program stands in for ``chatos-retrain run``: it speaks sd_notify, reports what the sandbox lets it see,
and follows the signals systemd sends. So these tests pin down the unit itself (quoting, user, store bind,
hardening, watchdog/notify plumbing, restart, clean stop) and the container plumbing the scenario tests rely on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import container as ct
import pytest

from daemon.service.unit import render_unit

pytestmark = [pytest.mark.system, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
UNIT = "chatos-retrain.service"
FAKE_VENV = "/opt/fake venv"  # a space in every path the unit quotes
CONFIG = "/etc/chatos-retrain/retrain (ci) 100%.yaml"

PROBE = f"""#!{ct.VENV_PYTHON}
# Stands in for `chatos-retrain run`: reports its sandbox as JSON lines, speaks sd_notify, follows signals.
import json, os, pwd, signal, socket, sys

def notify(msg):
    addr = os.environ["NOTIFY_SOCKET"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect("\\0" + addr[1:] if addr.startswith("@") else addr)
        s.sendall(msg.encode())

def emit(event, **kw):
    print(json.dumps({{"event": event, "level": "info", **kw}}), flush=True)

def error_of(fn):
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return 0

store = {ct.STORE!r}
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
state = os.environ.get("STATE_DIRECTORY", "")
emit(
    "probe.sandbox",
    argv=sys.argv,
    user=pwd.getpwuid(os.getuid()).pw_name,
    store_lines=sum(len(open(os.path.join(store, "logs", f)).readlines())
                    for f in os.listdir(os.path.join(store, "logs"))),
    store_write_errno=error_of(lambda: open(os.path.join(store, "feedback", "x.jsonl"), "a")),
    etc_write_errno=error_of(lambda: open("/etc/probe", "w")),
    state_write_errno=error_of(lambda: open(os.path.join(state, "probe"), "w").close()),
    homes=sorted(os.listdir("/home")),
    chatos_home=sorted(os.listdir("/home/{ct.CHATOS_USER}")),
    no_new_privs=status["NoNewPrivs"].strip(),
    seccomp=status["Seccomp"].strip(),
    cap_eff=status["CapEff"].strip(),
    watchdog_usec=os.environ.get("WATCHDOG_USEC"),
    state_directory=state,
    runtime_directory=os.environ.get("RUNTIME_DIRECTORY"),
)
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGHUP, signal.SIGTERM}})
notify("READY=1\\nSTATUS=idle: probe ready")
while True:
    info = signal.sigtimedwait({{signal.SIGHUP, signal.SIGTERM}}, 10)
    if info is None:
        notify("WATCHDOG=1")
    elif info.si_signo == signal.SIGHUP:
        notify("RELOADING=1\\nSTATUS=starting: reloading")
        emit("probe.reloaded")
        notify("READY=1\\nSTATUS=idle: probe reloaded")
    else:
        notify("STOPPING=1\\nSTATUS=stopping: SIGTERM")
        emit("probe.stopped")
        sys.exit(0)
"""


def events(box: ct.Container, name: str, cursor: str | None = None) -> list[dict[str, Any]]:
    return box.events(UNIT, name, since_cursor=cursor)


def test_container_boots_systemd_and_has_the_project(box: ct.Container) -> None:
    state = box.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    failed = box.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
    assert state in ("running", "degraded"), failed
    assert box.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    where = box.run([ct.VENV_PYTHON, "-c", "import daemon, sys; print(daemon.__file__); print(sys.prefix)"])
    file, prefix = where.stdout.split()
    assert prefix == ct.VENV and file.startswith(f"{ct.VENV}/lib/"), where.stdout
    assert box.run(["test", "-x", f"{ct.VENV}/bin/chatos-retrain"], check=False).returncode == 0
    assert box.run(["hostname"]).stdout.strip() == "chatos-ci"  # commands really run inside, not on the host
    assert box.path("/etc/hostname").read_text() == "chatos-ci\n"


@pytest.fixture(scope="module")
def chatos_host(box: ct.Container) -> dict[str, int]:
    """The ChatOS user (0700 home) with a store, the service user, and another user whose home must stay hidden."""
    ct.add_users(box)
    truth = ct.generate_store(box, 12, seed=3)
    box.run(["useradd", "--create-home", "other"])
    return truth


def test_rendered_unit_runs_sandboxed_under_real_systemd(box: ct.Container, chatos_host: dict[str, int]) -> None:
    truth = chatos_host
    box.write("/home/other/secret.txt", "not for the service\n")
    box.write(f"{FAKE_VENV}/bin/chatos-retrain", PROBE, mode=0o755)
    box.write(CONFIG, "store:\n  root: /home/chatos/ChatOS-Memory\n")
    text = render_unit(user_mode=False, python=Path(f"{FAKE_VENV}/bin/python"), config=Path(CONFIG),
                       store_root=Path(ct.STORE), stop_timeout_s=5)
    box.write(f"/etc/systemd/system/{UNIT}", text)
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "enable", UNIT])  # also keeps the stopped unit loaded, with its exit status
    verify = box.run(["systemd-analyze", "verify", UNIT], check=False)
    assert verify.returncode == 0 and not verify.stdout.strip(), verify.stdout + verify.stderr

    # start: Type=notify returns once READY=1 arrived; systemctl status shows our STATUS= text
    box.run(["systemctl", "start", UNIT], timeout=60)
    props = box.show(UNIT, "ActiveState", "SubState", "StatusText", "MainPID", "NRestarts")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["StatusText"] == "idle: probe ready"
    assert 'Status: "idle: probe ready"' in box.run(["systemctl", "status", "--no-pager", UNIT]).stdout

    # the sandbox, as the probe saw it
    [seen] = box.wait_for("the probe's report", lambda: events(box, "probe.sandbox"), timeout=20)
    assert seen["argv"] == [f"{FAKE_VENV}/bin/chatos-retrain", "run", "--config", CONFIG]
    assert seen["user"] == ct.SERVICE_USER
    assert seen["store_lines"] >= truth["conversations"]  # the 0700 home did not stop it: the store is bound in
    assert seen["store_write_errno"] == 30 and seen["etc_write_errno"] == 30  # EROFS
    assert seen["state_write_errno"] == 0 and seen["state_directory"] == "/var/lib/chatos-retrain"
    assert seen["runtime_directory"] == "/run/chatos-retrain"
    assert seen["homes"] == [ct.CHATOS_USER] and seen["chatos_home"] == ["ChatOS-Memory"]  # no other home
    assert (seen["no_new_privs"], seen["seccomp"], int(seen["cap_eff"], 16)) == ("1", "2", 0)
    assert seen["watchdog_usec"] == "60000000"

    # reload goes through ExecReload= (kill -HUP) and keeps the same process
    cursor = box.cursor(UNIT)
    box.run(["systemctl", "reload", UNIT], timeout=30)
    box.wait_for("probe.reloaded", lambda: events(box, "probe.reloaded", cursor), timeout=20)
    after = box.show(UNIT, "ActiveState", "MainPID", "StatusText")
    assert after["ActiveState"] == "active" and after["MainPID"] == props["MainPID"]

    # kill -9: Restart=on-failure brings it back with a new main pid
    box.run(["systemctl", "kill", "--signal=SIGKILL", "--kill-whom=main", UNIT])  # kill -9 of MainPID
    restarted = box.wait_for(
        "a restart after kill -9",
        lambda: (p := box.show(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts"))["NRestarts"] == "1"
        and p["SubState"] == "running" and p,
        timeout=30,
    )
    assert restarted["MainPID"] != props["MainPID"]

    # stop: SIGTERM, exit 0, well within TimeoutStopSec
    timeout_stop = box.show(UNIT, "TimeoutStopUSec")["TimeoutStopUSec"]
    assert timeout_stop == "20s"
    start = time.monotonic()
    box.run(["systemctl", "stop", UNIT], timeout=60)
    took = time.monotonic() - start
    done = box.show(UNIT, "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert done == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0", "ExecMainCode": "1"}, done
    assert took < 20
    assert events(box, "probe.stopped")
    assert "Deactivated successfully" in box.run(["journalctl", "-u", UNIT, "--no-pager"]).stdout


def test_shipped_user_unit_runs_under_a_user_manager(box: ct.Container, chatos_host: dict[str, int]) -> None:
    home, uid = f"/home/{ct.CHATOS_USER}", box.run(["id", "-u", ct.CHATOS_USER]).stdout.strip()
    user_env = {"XDG_RUNTIME_DIR": f"/run/user/{uid}"}
    entry = f"{home}/.local/share/chatos-retrain/venv/bin/chatos-retrain"  # what %h/... in the shipped unit means
    config = f"{home}/.config/chatos-retrain/retrain.yaml"
    box.write(entry, PROBE, mode=0o755)
    box.write(config, f"store:\n  root: {ct.STORE}\n")
    box.write(f"{home}/.config/systemd/user/{UNIT}", (ROOT / "systemd" / "chatos-retrain.user.service").read_text())
    box.run(["chown", "-R", f"{ct.CHATOS_USER}:", f"{home}/.local", f"{home}/.config"])
    box.run(["loginctl", "enable-linger", ct.CHATOS_USER])
    box.wait_for("the user manager", lambda: box.run(["systemctl", "is-active", f"user@{uid}.service"],
                                                     check=False).stdout.strip() == "active", timeout=30)

    def user_ctl(*args: str) -> str:
        return box.run(["systemctl", "--user", *args], user=ct.CHATOS_USER, env=user_env, timeout=60).stdout

    user_ctl("daemon-reload")
    user_ctl("start", UNIT)
    def user_show(*names: str) -> dict[str, str]:
        out = user_ctl("show", UNIT, *[f"--property={n}" for n in names])
        return dict(line.split("=", 1) for line in out.splitlines())

    shown = user_show("SubState", "StatusText")
    assert shown == {"SubState": "running", "StatusText": "idle: probe ready"}
    [seen] = box.wait_for("the probe's report",
                          lambda: box.events(UNIT, "probe.sandbox", user_unit=True), timeout=20)
    assert seen["argv"] == [entry, "run", "--config", config]
    assert seen["user"] == ct.CHATOS_USER and seen["store_lines"] >= chatos_host["conversations"]
    assert (seen["no_new_privs"], seen["seccomp"]) == ("1", "2")
    # no StateDirectory=/RuntimeDirectory= in the user unit: the service falls back to state.dir, as the CLI does
    assert (seen["state_directory"], seen["runtime_directory"]) == ("", None)
    user_ctl("stop", UNIT)
    done = user_show("Result", "ExecMainStatus")
    assert done == {"Result": "success", "ExecMainStatus": "0"}
