"""systemd units: rendering (quoting, modes, store access), the shipped files, installing, and systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import need

from daemon.service import unit
from daemon.service.unit import InstallResult, UnitExistsError, install_unit, render_unit

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_FILE = ROOT / "systemd" / "chatos-retrain.service"
USER_FILE = ROOT / "systemd" / "chatos-retrain.user.service"
MAX_EXPOSURE = 2.5
# Directives that restrict the service: each must sit right under a comment saying when to relax it.
HARDENING = {
    "UMask", "NoNewPrivileges", "CapabilityBoundingSet", "AmbientCapabilities", "ProtectSystem", "ProtectHome",
    "BindReadOnlyPaths", "ReadOnlyPaths", "PrivateTmp", "PrivateMounts", "PrivateDevices", "DevicePolicy",
    "DeviceAllow", "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectClock", "ProtectHostname", "ProtectProc", "ProcSubset", "PrivateNetwork", "RestrictAddressFamilies",
    "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "MemoryDenyWriteExecute", "LockPersonality",
    "SystemCallArchitectures", "SystemCallFilter", "SystemCallErrorNumber", "RemoveIPC", "KeyringMode",
}


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


# -- rendering ---------------------------------------------------------------------------------------------------


def test_shipped_files_are_the_default_rendering() -> None:
    assert SYSTEM_FILE.read_text() == render_unit(user_mode=False, python=None, config=None)
    assert USER_FILE.read_text() == render_unit(user_mode=True, python=None, config=None)


def test_system_unit_has_the_required_settings() -> None:
    d = directives(SYSTEM_FILE.read_text())
    assert d["ExecStart"] == [
        "/opt/chatos-retrain/venv/bin/chatos-retrain run --config /etc/chatos-retrain/retrain.yaml"]
    want = {
        "Type": "notify", "NotifyAccess": "main", "User": "chatos-retrain", "Restart": "on-failure",
        "KillMode": "mixed", "StateDirectory": "chatos-retrain", "RuntimeDirectory": "chatos-retrain",
        "ConfigurationDirectory": "chatos-retrain", "ExecReload": "/bin/kill -HUP $MAINPID",
        "PrivateDevices": "no", "DevicePolicy": "closed", "WantedBy": "multi-user.target",
    }
    assert {k: d[k][0] for k in want} == want
    assert d["WatchdogSec"] and d["TimeoutStopSec"] == ["45s"]
    assert "char-nvidia* rw" in d["DeviceAllow"] and "char-drm rw" in d["DeviceAllow"]
    assert d["ProtectHome"] == ["read-only"]  # no store path known: all homes read-only


def test_user_unit_is_the_unprivileged_variant() -> None:
    d = directives(USER_FILE.read_text())
    assert "User" not in d and "Group" not in d
    assert d["WantedBy"] == ["default.target"]
    assert d["ExecStart"] == [
        "%h/.local/share/chatos-retrain/venv/bin/chatos-retrain run --config %E/chatos-retrain/retrain.yaml"]
    assert not {"ProtectSystem", "ProtectHome", "PrivateTmp", "DevicePolicy", "BindReadOnlyPaths"} & d.keys()
    # systemd < 254 puts a user StateDirectory= under ~/.config; the CLI would not find the state there
    assert not {"StateDirectory", "RuntimeDirectory"} & d.keys() and d["ConfigurationDirectory"] == ["chatos-retrain"]
    assert {"Type", "NotifyAccess", "WatchdogSec", "KillMode", "TimeoutStopSec", "ExecReload"} <= d.keys()


@pytest.mark.parametrize("user_mode", [False, True])
def test_every_hardening_line_has_a_comment_above_it(user_mode: bool) -> None:
    text = render_unit(user_mode=user_mode, python=None, config=None, store_root=Path("/home/a/ChatOS-Memory"))
    lines = text.splitlines()
    checked = 0
    for i, line in enumerate(lines):
        key = line.partition("=")[0]
        if key in HARDENING and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"
            checked += 1
    assert checked >= (12 if user_mode else 30)


def test_paths_with_spaces_percent_and_dollar_are_quoted_and_escaped() -> None:
    text = render_unit(user_mode=False, python=Path("/opt/my venv/bin/python"), config=Path("/etc/x y/100% $HOME.yaml"),
                       store_root=Path("/home/al ice/ChatOS-Memory"))
    d = directives(text)
    assert d["ExecStart"] == ['"/opt/my venv/bin/chatos-retrain" run --config "/etc/x y/100%% $$HOME.yaml"']
    assert d["BindReadOnlyPaths"] == ['"/home/al ice/ChatOS-Memory"']
    assert d["ProtectHome"] == ["tmpfs"]


def test_quote_escapes_backslashes_and_quotes() -> None:
    assert unit.quote('/a "b"\\c') == '"/a \\"b\\"\\\\c"'
    assert unit.quote("/plain/path-1.2_x") == "/plain/path-1.2_x"
    assert unit.quote("/a$b", exec_line=True) == '"/a$$b"'


def test_module_mode_runs_python_dash_m_daemon() -> None:
    text = render_unit(user_mode=True, python=Path("/usr/bin/python3"), config=Path("/home/u/retrain.yaml"),
                       module=True)
    assert directives(text)["ExecStart"] == ["/usr/bin/python3 -m daemon run --config /home/u/retrain.yaml"]


def test_store_root_is_ignored_in_user_mode_and_timeouts_follow_the_setting() -> None:
    text = render_unit(user_mode=True, python=None, config=None, store_root=Path("/home/u/ChatOS-Memory"),
                       stop_timeout_s=100)
    d = directives(text)
    assert "BindReadOnlyPaths" not in d and d["TimeoutStopSec"] == ["115s"]
    assert directives(render_unit(user_mode=False, python=None, config=None, user="svc"))["User"] == ["svc"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"python": Path("venv/bin/python")}, "must be absolute"),
        ({"config": Path("retrain.yaml")}, "must be absolute"),
        ({"config": Path("/etc/a\nb.yaml")}, "control character"),
        ({"store_root": Path("/home/a:b")}, "contains ':'"),
        ({"store_root": Path("ChatOS-Memory")}, "must be absolute"),
        ({"user": "Bad User"}, "not a valid user name"),
        ({"stop_timeout_s": 0}, "positive"),
    ],
)
def test_bad_inputs_are_one_clear_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"user_mode": False, "python": None, "config": None, **kwargs}
    with pytest.raises(ValueError, match=message):
        render_unit(**args)  # type: ignore[arg-type]



# -- the templates (package data) ------------------------------------------------------------------------------------

UNITS_DIR = ROOT / "daemon" / "service" / "units"


@pytest.mark.parametrize("user_mode", [False, True])
def test_a_misspelt_placeholder_fails_the_render(monkeypatch: pytest.MonkeyPatch, user_mode: bool) -> None:
    real = unit._fragment
    name = "user.service.in" if user_mode else "system.service.in"
    assert "TimeoutStopSec=${stop}" in real(name)

    def misspelt(n: str) -> str:
        return real(n).replace("${stop}", "${stpo}") if n == name else real(n)

    monkeypatch.setattr(unit, "_fragment", misspelt)
    with pytest.raises(KeyError, match=r"\$\{stpo\} has no value"):
        render_unit(user_mode=user_mode, python=None, config=None)


def test_a_value_no_placeholder_takes_fails_too(monkeypatch: pytest.MonkeyPatch) -> None:
    real = unit._fragment
    monkeypatch.setattr(unit, "_fragment", lambda n: real(n).replace("${margin}", "15") if n == "user.service.in"
                        else real(n))
    with pytest.raises(KeyError, match=r"user.service.in has no placeholder for \['margin'\]"):
        render_unit(user_mode=True, python=None, config=None)


def test_a_literal_dollar_in_the_unit_text_is_doubled_in_the_template() -> None:
    assert "ExecReload=/bin/kill -HUP $$MAINPID" in unit._fragment("system.service.in")
    assert "ExecReload=/bin/kill -HUP $MAINPID" in SYSTEM_FILE.read_text()


def test_the_hardening_block_is_written_once_and_both_units_carry_it() -> None:
    block = unit._fragment("hardening.in")
    assert block.count("SystemCallFilter=") == 2 and "NoNewPrivileges=yes" in block
    for text in (SYSTEM_FILE.read_text(), USER_FILE.read_text()):
        assert text.count(block) == 1
    for name in ("system.service.in", "user.service.in"):  # by reference, never copied
        assert "${hardening}" in unit._fragment(name) and "SystemCallFilter" not in unit._fragment(name)
    # the user unit's hardening is exactly the shared block: nothing privileged slipped into it
    user_hardening = {k for k in directives(USER_FILE.read_text()) if k in HARDENING}
    assert user_hardening == set(directives(block))


def test_every_template_file_is_used_and_shipped_as_package_data() -> None:
    import tomllib

    files = sorted(p.name for p in UNITS_DIR.iterdir())
    assert files == ["hardening.in", "header.in", "store-bound.in", "store-shared.in", "system.service.in",
                     "user.service.in"]
    source = (ROOT / "daemon" / "service" / "unit.py").read_text()
    assert all(f'"{name}"' in source for name in files)
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["daemon"]
    shipped = {p.relative_to(ROOT / "daemon") for pat in patterns for p in (ROOT / "daemon").glob(pat)}
    assert {Path("service") / "units" / name for name in files} <= shipped


# -- installing ----------------------------------------------------------------------------------------------------


def test_install_writes_then_is_idempotent_then_refuses_a_different_file(tmp_path: Path) -> None:
    dest = tmp_path / "units" / "chatos-retrain.service"
    text = render_unit(user_mode=True, python=None, config=None)
    first = install_unit(text, user_mode=True, dest=dest)
    assert first == InstallResult(dest, True, first.next_commands)
    assert dest.read_text() == text and oct(dest.stat().st_mode & 0o777) == "0o644"
    assert first.next_commands[:2] == ["systemctl --user daemon-reload",
                                       "systemctl --user enable --now chatos-retrain.service"]
    assert install_unit(text, user_mode=True, dest=dest).written is False
    other = render_unit(user_mode=True, python=None, config=None, stop_timeout_s=5)
    with pytest.raises(UnitExistsError, match="--force"):
        install_unit(other, user_mode=True, dest=dest)
    assert dest.read_text() == text
    assert install_unit(other, user_mode=True, dest=dest, force=True).written
    assert dest.read_text() == other
    assert [p.name for p in dest.parent.iterdir()] == ["chatos-retrain.service"]  # no temp file left


def test_system_install_lists_the_user_to_create(tmp_path: Path) -> None:
    res = install_unit("x\n", user_mode=False, dest=tmp_path / "u.service", service_user="no-such-user-xyz")
    assert res.next_commands[0].startswith("useradd --system") and res.next_commands[0].endswith("no-such-user-xyz")
    assert res.next_commands[-2:] == ["systemctl daemon-reload", "systemctl enable --now chatos-retrain.service"]


def test_unit_paths() -> None:
    assert unit.unit_path(False) == Path("/etc/systemd/system/chatos-retrain.service")
    assert unit.unit_path(True, {"XDG_CONFIG_HOME": "/cfg", "HOME": "/h"}) == Path(
        "/cfg/systemd/user/chatos-retrain.service")
    assert unit.unit_path(True, {"HOME": "/h"}) == Path("/h/.config/systemd/user/chatos-retrain.service")


# -- systemd-analyze -------------------------------------------------------------------------------------------------

ANALYZE = shutil.which("systemd-analyze")


@pytest.fixture
def needs_analyze() -> None:
    need(ANALYZE, "systemd-analyze is not installed (apt: systemd)")


def analyze(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "xdg-runtime"  # --user needs one, and a host without a user session has none
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"}
    return subprocess.run([str(ANALYZE), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def rendered_for_verify(tmp_path: Path, user_mode: bool, **kwargs: object) -> Path:
    """A unit whose ExecStart exists (verify checks it): an entry point in a folder with a space in its name."""
    venv_bin = tmp_path / "my venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "chatos-retrain").symlink_to(sys.executable)
    folder = tmp_path / ("user" if user_mode else "system")
    folder.mkdir()
    path = folder / "chatos-retrain.service"
    path.write_text(render_unit(user_mode=user_mode, python=venv_bin / "python",
                                config=tmp_path / "conf dir" / "retrain.yaml", **kwargs))  # type: ignore[arg-type]
    return path


@pytest.mark.usefixtures("needs_analyze")
@pytest.mark.parametrize("user_mode", [False, True])
def test_systemd_analyze_verify_is_clean(tmp_path: Path, user_mode: bool) -> None:
    path = rendered_for_verify(tmp_path, user_mode, store_root=None if user_mode else Path("/home/a b/ChatOS-Memory"))
    res = analyze(*(["--user"] if user_mode else []), "verify", str(path), tmp_path=tmp_path)
    assert (res.returncode, res.stdout + res.stderr) == (0, "")


@pytest.mark.usefixtures("needs_analyze")
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    path = rendered_for_verify(tmp_path, False)
    text = path.read_text()
    path.write_text(text.replace(f'"{tmp_path}/my venv/bin/chatos-retrain"', f"{tmp_path}/my venv/bin/chatos-retrain"))
    res = analyze("verify", str(path), tmp_path=tmp_path)
    assert res.returncode != 0 and "is not executable" in res.stdout + res.stderr


def exposure(path: Path, tmp_path: Path) -> float:
    res = analyze("security", "--offline=true", "--no-pager", str(path), tmp_path=tmp_path)
    need(res.returncode == 0 or "--offline" not in res.stderr,
         f"this systemd-analyze has no --offline: {res.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr
    return float(m.group(1))


@pytest.mark.usefixtures("needs_analyze")
@pytest.mark.parametrize("store_root", [None, Path("/home/alice/ChatOS-Memory")], ids=["shipped", "store-bound"])
def test_system_unit_exposure_is_at_most_2_5(tmp_path: Path, store_root: Path | None) -> None:
    path = tmp_path / "chatos-retrain.service"
    path.write_text(render_unit(user_mode=False, python=None, config=None, store_root=store_root))
    score = exposure(path, tmp_path)
    print(f"systemd-analyze security exposure ({'shipped' if store_root is None else 'store-bound'}): {score}")
    assert score <= MAX_EXPOSURE
