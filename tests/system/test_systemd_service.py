"""The service under a real systemd (issue 3, item 8): start, a cycle from new data, reload, a rejected reload,
kill -9 and restart without losing or double-counting anything, and a clean stop.

One container per module; the tests run in file order and build on each other (like an operator's session).
The contract of ``chatos-retrain run``: Type=notify READY=1 after the start-up scan, ``STATUS=<phase>: <detail>``,
JSON lines on stdout with event/level/timestamp (cycle lines with cycle_id, one ``cycle.summary`` per cycle),
SIGHUP reloads (``config.reloaded`` / ``config.reload_rejected``), SIGTERM exits 0.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import container as ct
import pytest

from daemon.service.unit import render_unit

pytestmark = [pytest.mark.system, pytest.mark.slow]

UNIT = "chatos-retrain.service"
CONFIG = "/etc/chatos-retrain/retrain.yaml"
STOP_TIMEOUT_S = 10
PHASES = ("starting", "scanning", "idle", "ingesting", "building dataset", "training", "stopping")
STATUS_RE = re.compile(rf"^({'|'.join(PHASES)}): \S")
GOOD_CONFIG = f"""\
store:
  root: {ct.STORE}
state:
  dir: /var/lib/chatos-retrain
service:
  runtime_dir: /run/chatos-retrain
  stop_timeout_s: {STOP_TIMEOUT_S}s
watch:
  settle_s: 0.5
  max_wait_s: 5
policy:
  min_new_examples: 1
  min_total_examples: 1
  cooldown: 0s
log:
  level: info
  format: auto
"""


@pytest.fixture(scope="module")
def service(box: ct.Container) -> dict[str, Any]:
    """The ChatOS user with a store, the service user, the config, and the unit as install-unit renders it."""
    ct.add_users(box)
    # As the unit's set-up notes say: the group may enter the home, so the CLI run as the service user (status)
    # reads the store too. The service itself needs no such thing (test_container_harness keeps the home 0700).
    box.run(["chmod", "0750", f"/home/{ct.CHATOS_USER}"])
    truth = ct.generate_store(box, 40, seed=11)
    box.write(CONFIG, GOOD_CONFIG)
    text = render_unit(user_mode=False, python=Path(ct.VENV_PYTHON), config=Path(CONFIG),
                       store_root=Path(ct.STORE), stop_timeout_s=STOP_TIMEOUT_S)
    box.write(f"/etc/systemd/system/{UNIT}", text)
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "enable", UNIT])
    return {"truth": truth, "appended": []}


def props(box: ct.Container, *names: str) -> dict[str, str]:
    return box.show(UNIT, *names)


def cli_status(box: ct.Container) -> dict[str, Any]:
    """The store counts of ``chatos-retrain status --json`` inside, as the service user (who owns the state).

    Live (from the running service) they sit under ``store``; from state alone, at the top level.
    """
    res = box.run([f"{ct.VENV}/bin/chatos-retrain", "--config", CONFIG, "status", "--json"], user=ct.SERVICE_USER)
    data = json.loads(res.stdout)
    return dict(data.get("store") or data)


def counts(status: dict[str, Any]) -> dict[str, Any]:
    return {k: status[k] for k in ("conversations", "feedback_events", "files_tracked", "latest_dataset")}


def journal_text(box: ct.Container) -> str:
    return box.run(["journalctl", "--no-pager", "-u", UNIT]).stdout


def require_running(box: ct.Container) -> None:
    """Fail at once (not after a long wait) when an earlier step left the service down."""
    p = props(box, "ActiveState", "SubState")
    if (p["ActiveState"], p["SubState"]) != ("active", "running"):
        pytest.fail(f"the service is not running ({p}); see the first failing test above\n{journal_text(box)[-2000:]}")


def ctl(box: ct.Container, *args: str, timeout: float = 60) -> None:
    """``systemctl ARGS``; on failure the assertion shows the unit's journal, which says why."""
    res = box.run(["systemctl", *args], check=False, timeout=timeout)
    assert res.returncode == 0, f"systemctl {' '.join(args)}: {res.stderr}\n{journal_text(box)[-4000:]}"


def test_start_reaches_running_and_shows_our_status(box: ct.Container, service: dict[str, Any]) -> None:
    ctl(box, "start", UNIT, timeout=120)  # returns after READY=1 (Type=notify)
    p = props(box, "ActiveState", "SubState", "StatusText", "MainPID")
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), journal_text(box)[-3000:]
    assert STATUS_RE.match(p["StatusText"]), p["StatusText"]
    status_out = box.run(["systemctl", "status", "--no-pager", UNIT], check=False).stdout
    assert re.search(r'Status: "(' + "|".join(PHASES) + r"): ", status_out), status_out
    lines = box.events(UNIT)
    assert lines, "no JSON log lines in the journal"
    assert all({"event", "level", "timestamp"} <= line.keys() for line in lines), lines[:3]
    truth = service["truth"]
    st = cli_status(box)
    assert st["conversations"]["total"] == truth["conversations"]
    assert st["feedback_events"] == truth["feedback_events"]


def test_new_records_and_feedback_produce_a_cycle(box: ct.Container, service: dict[str, Any]) -> None:
    require_running(box)
    cursor = box.cursor(UNIT)
    service["appended"] = ct.append_rated(box, 6, seed=99)
    [summary, *_] = box.wait_for("a cycle.summary after new records",
                                 lambda: box.events(UNIT, "cycle.summary", since_cursor=cursor), timeout=60)
    cycle_id = summary.get("cycle_id")
    assert cycle_id, summary
    same_cycle = [m for m in box.events(UNIT, since_cursor=cursor) if m.get("cycle_id") == cycle_id]
    assert len(same_cycle) >= 2, same_cycle  # the summary and the steps before it carry the same id
    [entry, *_] = [e for e in box.journal(UNIT, since_cursor=cursor) if e["msg"] == summary]
    assert entry["_SYSTEMD_UNIT"] == UNIT and json.loads(entry["MESSAGE"])["cycle_id"] == cycle_id
    truth = service["truth"]
    st = cli_status(box)
    assert st["conversations"]["total"] == truth["conversations"] + 6
    assert st["feedback_events"] == truth["feedback_events"] + 6


def test_the_journal_filters_by_priority_and_by_cycle_id(box: ct.Container, service: dict[str, Any]) -> None:
    """Under systemd (log.format auto) every line reaches journald with its level as the priority and the ids as
    fields: ``journalctl -p warning`` shows the warnings (a malformed store line here) and no info line, and
    ``CHATOS_CYCLE_ID=...`` selects one cycle's lines."""
    require_running(box)
    cursor = box.cursor(UNIT)
    box.run(f"printf 'not json at all\\n' >> {ct.STORE}/logs/conversations_2026-11-26.jsonl", user=ct.CHATOS_USER)
    box.wait_for("a rejected-line warning", lambda: box.events(UNIT, "ingest.line_rejected", since_cursor=cursor),
                 timeout=60)
    [summary, *_] = box.wait_for("the cycle's summary",
                                 lambda: box.events(UNIT, "cycle.summary", since_cursor=cursor), timeout=60)
    warnings = parse_json_lines(box.run(["journalctl", "--no-pager", "-o", "json", "-u", UNIT, "-p", "warning"]).stdout)
    assert warnings, journal_text(box)[-2000:]
    assert all(int(e["PRIORITY"]) <= 4 for e in warnings), warnings
    assert any(e.get("CHATOS_EVENT") == "ingest.line_rejected" for e in warnings), warnings[-5:]
    assert not any(e.get("CHATOS_EVENT") == "cycle.summary" for e in warnings)  # info lines stay out
    cycle_id = summary["cycle_id"]
    one = parse_json_lines(box.run(["journalctl", "--no-pager", "-o", "json", "-u", UNIT,
                                    f"CHATOS_CYCLE_ID={cycle_id}"]).stdout)
    assert len(one) >= 2 and all(json.loads(e["MESSAGE"])["cycle_id"] == cycle_id for e in one), one
    assert any(e.get("CHATOS_EVENT") == "cycle.summary" for e in one)
    assert all(e["_SYSTEMD_UNIT"] == UNIT and e["SYSLOG_IDENTIFIER"] == "chatos-retrain" for e in one)


def parse_json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_reload_applies_a_new_config(box: ct.Container, service: dict[str, Any]) -> None:
    require_running(box)
    pid = props(box, "MainPID")["MainPID"]
    cursor = box.cursor(UNIT)
    box.write(CONFIG, GOOD_CONFIG.replace("min_new_examples: 1", "min_new_examples: 2"))
    ctl(box, "reload", UNIT)
    box.wait_for("config.reloaded", lambda: box.events(UNIT, "config.reloaded", since_cursor=cursor), timeout=30)
    p = box.wait_for("active after the reload", lambda: (q := props(box, "ActiveState", "MainPID", "StatusText"))
                     ["ActiveState"] == "active" and q, timeout=30)
    assert p["MainPID"] == pid
    assert STATUS_RE.match(p["StatusText"]), p


def test_bad_config_on_reload_keeps_the_service_running(box: ct.Container, service: dict[str, Any]) -> None:
    require_running(box)
    pid = props(box, "MainPID")["MainPID"]
    cursor = box.cursor(UNIT)
    box.write(CONFIG, GOOD_CONFIG.replace("min_new_examples: 1", "min_new_examples: -5\n  no_such_key: 1"))
    try:
        ctl(box, "reload", UNIT)
        [rejected, *_] = box.wait_for("config.reload_rejected",
                                      lambda: box.events(UNIT, "config.reload_rejected", since_cursor=cursor),
                                      timeout=30)
        assert "min_new_examples" in json.dumps(rejected), rejected
        p = box.wait_for("active after the rejected reload",
                         lambda: (q := props(box, "ActiveState", "SubState", "MainPID"))["ActiveState"] == "active"
                         and q, timeout=30)
        assert (p["SubState"], p["MainPID"]) == ("running", pid)
    finally:
        box.write(CONFIG, GOOD_CONFIG)  # the next start (the restart below) reads the file again


def test_kill_9_restarts_and_nothing_is_lost_or_counted_twice(box: ct.Container, service: dict[str, Any]) -> None:
    require_running(box)
    before = props(box, "MainPID", "NRestarts")
    counted = counts(cli_status(box))
    assert before["MainPID"] != "0", "the service is not running"
    box.run(["systemctl", "kill", "--signal=SIGKILL", "--kill-whom=main", UNIT])  # kill -9 of MainPID
    after = box.wait_for(
        "systemd to restart the service",
        lambda: (q := props(box, "ActiveState", "SubState", "MainPID", "NRestarts"))["NRestarts"]
        == str(int(before["NRestarts"]) + 1) and q["SubState"] == "running" and q,
        timeout=90,
    )
    assert after["MainPID"] != before["MainPID"]
    assert counts(cli_status(box)) == counted
    truth = service["truth"]
    assert counted["conversations"]["total"] == truth["conversations"] + len(service["appended"])
    assert counted["feedback_events"] == truth["feedback_events"] + len(service["appended"])


# Run as root inside: wait until every thread of PID is stopped, then more inotify events in the store's logs/ than
# the kernel queues (a create and a delete per file: nothing is left behind, and none is a data file).
_OVERFLOW_BURST = """
import sys, time
from pathlib import Path
pid, logs = sys.argv[1], Path(sys.argv[2])
end = time.monotonic() + 10
while True:
    states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in Path(f"/proc/{pid}/task").iterdir()]
    if all(s == "T" for s in states):
        break
    assert time.monotonic() < end, f"the service did not stop: {states}"
    time.sleep(0.01)
limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
for i in range(limit):  # 2 events each: 2x the queue
    p = logs / f".burst-{i}"
    p.touch()
    p.unlink()
print(limit)
"""


def test_an_inotify_queue_overflow_is_rescanned_and_loses_nothing(box: ct.Container, service: dict[str, Any]) -> None:
    """Issue 11, item 7, under real systemd: the service's process is stopped (SIGSTOP), so its inotify queue
    overflows under a burst; records and votes appended after the burst get no event at all. Resumed, the service
    reports the overflow, rescans within watch.max_wait_s and ingests every record and vote exactly once."""
    require_running(box)
    pid = props(box, "MainPID")["MainPID"]
    before = counts(cli_status(box))
    cursor = box.cursor(UNIT)
    box.run(["systemctl", "kill", "--signal=SIGSTOP", "--kill-whom=main", UNIT])
    try:
        box.run([ct.VENV_PYTHON, "-c", _OVERFLOW_BURST, pid, f"{ct.STORE}/logs"], timeout=120)
        appended = ct.append_rated(box, 4, seed=2024)
    finally:
        resumed_us = time.time() * 1e6
        box.run(["systemctl", "kill", "--signal=SIGCONT", "--kill-whom=main", UNIT])
    [entry, *_] = box.wait_for(
        "a rescan for the overflow",
        lambda: [e for e in box.journal(UNIT, since_cursor=cursor)
                 if (e["msg"] or {}).get("event") == "service.rescan" and "overflow" in e["msg"].get("reason", "")],
        timeout=60)
    assert int(entry["__REALTIME_TIMESTAMP"]) - resumed_us < 5e6, "rescan later than watch.max_wait_s after resume"
    after = box.wait_for("the appended records in the state",
                         lambda: (c := counts(cli_status(box)))["feedback_events"] == before["feedback_events"] + 4
                         and c, timeout=60)
    assert len(appended) == 4
    assert after["conversations"]["total"] == before["conversations"]["total"] + 4
    service["appended"] = [*service["appended"], *appended]
    assert props(box, "MainPID")["MainPID"] == pid  # no restart on the way


def test_stop_exits_cleanly_within_the_timeout(box: ct.Container, service: dict[str, Any]) -> None:
    require_running(box)
    timeout_s = STOP_TIMEOUT_S + 15
    assert props(box, "TimeoutStopUSec")["TimeoutStopUSec"] == f"{timeout_s}s"
    start = time.monotonic()
    ctl(box, "stop", UNIT, timeout=timeout_s + 30)
    took = time.monotonic() - start
    p = props(box, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert p == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1", "ExecMainStatus": "0"}, p
    assert took < timeout_s, f"stop took {took:.1f} s"
    text = journal_text(box)
    assert "Deactivated successfully" in text
    assert "Traceback" not in text, text[-3000:]  # expected errors are one line, never a traceback
