"""Notifications against real receivers (issue 16 item 2): a webhook receiver (``http.server`` on 127.0.0.1,
started by the test, checking the HMAC signature), a real command hook script, and a fake ``notify-send`` on PATH
(the desktop session bus cannot run here, so the fake records the argv it was given). Each notifier's failing cases
too: receiver down, 500, slow; hook exiting non-zero or running past its limit. A failing notifier is one line and
never touches the cycle, which only enqueues."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import logs_file, rec, write_lines
from structlog.testing import capture_logs

from daemon import cli, notify
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.notify import events as ev
from daemon.notify.local import Command, Desktop
from daemon.notify.webhook import Webhook
from daemon.state import State

SECRET = "s3cret-for-the-test"
AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Receiver:
    """A webhook receiver: answers each POST with the next of ``statuses`` (then 200), after ``delay_s``, and keeps
    what it got, with whether the signature checked out."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.delay_s = 0.0
        self.got: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
                receiver.got.append({
                    "body": json.loads(raw), "event": self.headers.get("X-Chatos-Event"),
                    "signed_ok": hmac.compare_digest(self.headers.get("X-Chatos-Signature", ""), expected),
                    "content_type": self.headers.get("Content-Type"),
                })
                receiver.arrived.set()
                time.sleep(receiver.delay_s)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the client gave up (the slow case)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(autouse=True)
def _no_dispatcher_left() -> Iterator[None]:
    yield
    notify.close(grace_s=0.5)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def lines(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [x for x in logs if x["event"] == name]


def event(kind: str = "promoted") -> ev.Event:
    return ev.Event(kind, f"{kind}: m:v1: gate passed", "m:v1", "j-1", "c-1", "gate passed", AT.isoformat())


# -- the webhook ------------------------------------------------------------------------------------------------


def test_the_webhook_posts_the_event_signed(receiver: Receiver) -> None:
    hook = Webhook(receiver.url, secret=SECRET, retries=0)
    with capture_logs() as logs:
        res = notify.deliver(hook, event(), threading.Event())
    assert res == {"notifier": "webhook", "ok": True, "detail": "HTTP 200"}
    [got] = receiver.got
    assert got["signed_ok"] and got["event"] == "promoted" and got["content_type"] == "application/json"
    assert got["body"] == event().as_json()
    [line] = lines(logs, "notify.sent")
    assert (line["notifier"], line["notify_event"], line["log_level"]) == ("webhook", "promoted", "info")
    assert SECRET not in json.dumps(logs)


def test_a_wrong_secret_fails_the_receivers_check_and_a_secret_file_works(receiver: Receiver,
                                                                          tmp_path: Path) -> None:
    notify.deliver(Webhook(receiver.url, secret="not-the-secret", retries=0), event(), threading.Event())
    key = tmp_path / "webhook.key"
    key.write_text(SECRET + "\n")
    notify.deliver(Webhook(receiver.url, secret_file=key, retries=0), event(), threading.Event())
    assert [g["signed_ok"] for g in receiver.got] == [False, True]


def test_a_500_is_retried_with_backoff_until_it_succeeds(receiver: Receiver) -> None:
    receiver.statuses = [500, 503]
    hook = Webhook(receiver.url, secret=SECRET, retries=3, backoff_s=0.05)
    with capture_logs() as logs:
        res = notify.deliver(hook, event(), threading.Event())
    assert res["ok"] and res["detail"] == "HTTP 200 after 3 attempts"
    assert len(receiver.got) == 3 and all(g["signed_ok"] for g in receiver.got)
    assert len(lines(logs, "notify.sent")) == 1 and not lines(logs, "notify.failed")


def test_a_4xx_is_not_retried_and_retries_run_out(receiver: Receiver) -> None:
    receiver.statuses = [404]
    res = notify.deliver(Webhook(receiver.url, retries=3, backoff_s=0.01), event(), threading.Event())
    assert not res["ok"] and res["detail"].startswith("HTTP 404") and len(receiver.got) == 1
    receiver.statuses = [500, 500, 500]
    with capture_logs() as logs:
        res = notify.deliver(Webhook(receiver.url, retries=2, backoff_s=0.01), event(), threading.Event())
    assert res["detail"] == "HTTP 500 (attempt 3 of 3)" and len(receiver.got) == 4
    [line] = lines(logs, "notify.failed")
    assert (line["notifier"], line["log_level"], line["reason"]) == ("webhook", "warning", res["detail"])


def test_a_receiver_that_is_down_is_one_warning_line_and_the_cycle_goes_on(make_settings: Any) -> None:
    s = make_settings(notify={"webhook": {"url": closed_port_url(), "retries": 1, "backoff_s": 0.05}})
    with State(s.state_dir()) as st, capture_logs() as logs:
        result = run_cycle(s, st, CycleRequest(None))  # an empty store: a skip, which notifies nothing ...
        assert result.outcome in ("skipped", "no_data")
        notify.cycle_ended(s, st, {**result.as_json(), "outcome": "rejected", "job_id": "j-9"})  # ... this does
        notify.close(grace_s=10)
    [line] = lines(logs, "notify.failed")
    assert line["notifier"] == "webhook" and line["notify_event"] == "rejected" and line["job_id"] == "j-9"
    assert "ConnectError" in line["reason"] and "attempt 2 of 2" in line["reason"]
    assert not lines(logs, "notify.dropped") and lines(logs, "cycle.summary")


def test_a_slow_receiver_never_blocks_the_cycle_side(receiver: Receiver, make_settings: Any) -> None:
    receiver.delay_s = 3.0
    s = make_settings(notify={"webhook": {"url": receiver.url, "secret": SECRET, "timeout_s": 0.5, "retries": 0}})
    summary = {"cycle_id": "c-slow", "outcome": "promoted", "reason": "gate passed", "job_id": "j-1",
               "model_tag": None, "counts": {}}
    with State(s.state_dir()) as st, capture_logs() as logs:
        t0 = time.perf_counter()
        for _ in range(5):
            notify.cycle_ended(s, st, summary)
        cycle_side = time.perf_counter() - t0
        assert cycle_side < 0.5, f"the cycle side took {cycle_side:.3f}s"
        assert receiver.arrived.wait(10)
        notify.close(grace_s=0.2)  # the rest are dropped, with one line
    failed = lines(logs, "notify.failed")
    assert failed and all("no answer within 0.5s" in f["reason"] for f in failed)
    [dropped] = lines(logs, "notify.dropped")
    assert dropped["deliveries"] >= 1 and dropped["log_level"] == "warning"


def test_the_stop_ends_a_retry_wait(receiver: Receiver) -> None:
    receiver.statuses = [500] * 10
    d = notify.Dispatcher()
    d.submit([Webhook(receiver.url, retries=5, backoff_s=30)], [event()])
    assert receiver.arrived.wait(10)
    t0 = time.perf_counter()
    with capture_logs() as logs:
        d.close(grace_s=0.2)
    assert time.perf_counter() - t0 < 3
    assert any("stopping" in f["reason"] for f in lines(logs, "notify.failed"))


# -- the command hook -------------------------------------------------------------------------------------------


def hook_script(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "hook.sh"
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return p


def test_the_command_hook_gets_the_event_as_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "got.json"
    hook = hook_script(tmp_path, f'cat > "{out}"\necho "args: $*" >> "{out}.args"\n')
    with capture_logs() as logs:
        res = notify.deliver(Command([str(hook), "--from", "chatos"], timeout_s=10), event("rejected"),
                             threading.Event())
    assert res == {"notifier": "command", "ok": True, "detail": "exit 0"}
    assert json.loads(out.read_text()) == event("rejected").as_json()
    assert (tmp_path / "got.json.args").read_text() == "args: --from chatos\n"
    assert lines(logs, "notify.sent")[0]["notify_event"] == "rejected"


def test_a_hook_exiting_non_zero_is_one_line(tmp_path: Path) -> None:
    hook = hook_script(tmp_path, 'cat >/dev/null\necho "no route to pager" >&2\nexit 3\n')
    with capture_logs() as logs:
        res = notify.deliver(Command([str(hook)], timeout_s=10), event("job_failed"), threading.Event())
    assert not res["ok"] and res["detail"] == "hook.sh exited 3: no route to pager"
    [line] = lines(logs, "notify.failed")
    assert (line["notifier"], line["notify_event"], line["reason"]) == ("command", "job_failed", res["detail"])


def test_a_hook_past_its_limit_is_killed_with_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "sleeper.pid"
    hook = hook_script(tmp_path, f'sleep 60 &\necho $! > "{pidfile}"\nwait\n')
    t0 = time.perf_counter()
    with capture_logs() as logs:
        res = notify.deliver(Command([str(hook)], timeout_s=0.5), event(), threading.Event())
    assert time.perf_counter() - t0 < 5
    assert not res["ok"] and res["detail"] == "hook.sh timed out after 0.5s (killed)"
    assert len(lines(logs, "notify.failed")) == 1
    sleeper = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while Path(f"/proc/{sleeper}").exists() and time.monotonic() < deadline:
        stat = Path(f"/proc/{sleeper}/stat").read_text() if Path(f"/proc/{sleeper}").exists() else ""
        if ") Z" in stat:
            break
        time.sleep(0.05)
    stat = Path(f"/proc/{sleeper}/stat").read_text() if Path(f"/proc/{sleeper}").exists() else ""
    assert not stat or ") Z" in stat, "the hook's child outlived the time limit"


def test_a_missing_hook_binary_is_one_line(tmp_path: Path) -> None:
    res = notify.deliver(Command([str(tmp_path / "nope")], timeout_s=1), event(), threading.Event())
    assert not res["ok"] and res["detail"].startswith("cannot run")


# -- the desktop notification -------------------------------------------------------------------------------------


def fake_notify_send(tmp_path: Path, code: int = 0) -> Path:
    """The session bus cannot run here: a fake ``notify-send`` that records its argv stands in for it."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    p = bindir / "notify-send"
    p.write_text(f'#!{sys.executable}\nimport json, sys\nopen("{tmp_path}/argv.json", "w").write(json.dumps('
                 f'sys.argv[1:]))\nsys.exit({code})\n')
    p.chmod(0o755)
    return bindir


def test_the_desktop_notifier_runs_notify_send_on_the_session_bus(tmp_path: Path) -> None:
    bindir = fake_notify_send(tmp_path)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus"}
    res = notify.deliver(Desktop(env=env), event("job_failed"), threading.Event())
    assert res["ok"], res
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv == ["--app-name=chatos-retrain", "--urgency=critical", "--", "chatos-retrain: job failed",
                    event("job_failed").summary]


def test_the_desktop_notifier_without_a_bus_or_binary_is_one_line(tmp_path: Path) -> None:
    bindir = fake_notify_send(tmp_path, code=1)
    with capture_logs() as logs:
        no_bus = notify.deliver(Desktop(env={"PATH": str(bindir)}), event(), threading.Event())
        no_bin = notify.deliver(Desktop(env={"PATH": str(tmp_path / "empty"), "DBUS_SESSION_BUS_ADDRESS": "x"}),
                                event(), threading.Event())
        failing = notify.deliver(Desktop(env={"PATH": str(bindir), "DBUS_SESSION_BUS_ADDRESS": "x"}), event(),
                                 threading.Event())
    assert "no session bus" in no_bus["detail"] and "not found" in no_bin["detail"]
    assert failing["detail"] == "notify-send exited 1"
    assert len(lines(logs, "notify.failed")) == 3


# -- through a real cycle, and the CLI ----------------------------------------------------------------------------


def test_a_promoting_cycle_sends_promoted_to_the_receiver(receiver: Receiver, make_settings: Any, store: Path,
                                                         fake_python: Path, base_model: Path, tmp_path: Path) -> None:
    write_lines(logs_file(store), [rec(f"e0000000000{i}", quality="good", answer=f"answer {i}") for i in range(6)])
    got = tmp_path / "hook.json"
    hook = hook_script(tmp_path, f'cat >> "{got}"\n')
    s = make_settings(
        training={"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                  "max_steps": 3, "timeout": 60, "env": {"FAKE_TRAINER_MODE": "ok"}},
        policy={"min_new_examples": 1, "min_total_examples": 1, "max_runs_per_day": 100},
        dataset={"min_train_examples": 1, "min_eval_examples": 1},
        export={"enabled": False},
        notify={"webhook": {"url": receiver.url, "secret": SECRET}, "command": {"argv": [str(hook)]}},
    )
    with State(s.state_dir()) as st, capture_logs() as logs:
        result = run_cycle(s, st, CycleRequest(None))
        assert result.outcome == "promoted", result.reason
        notify.close(grace_s=10)
    [posted] = receiver.got
    assert posted["signed_ok"] and posted["event"] == "promoted"
    body = posted["body"]
    assert (body["event"], body["job_id"], body["cycle_id"]) == ("promoted", result.job_id, result.cycle_id)
    assert set(body) == {"event", "summary", "model_tag", "job_id", "cycle_id", "reason", "at"}
    assert json.loads(got.read_text()) == body
    assert sorted(x["notifier"] for x in lines(logs, "notify.sent")) == ["command", "webhook"]


def test_waiting_for_ollama_is_sent_once(receiver: Receiver, make_settings: Any) -> None:
    from daemon.state import ModelRow

    s = make_settings(notify={"webhook": {"url": receiver.url}, "ollama_wait_hours": 1})
    with State(s.state_dir()) as st:
        with st.transaction():
            st.models.add(ModelRow(version=1, job_id="j-1", dataset_version=1, gguf_path="/x.gguf",
                                   gguf_sha256="sha256:00", gguf_size=1, chat_template="qwen-2.5", status="pending",
                                   tag="chatos-retrained:v1", created_at="2026-03-01T08:00:00+00:00",
                                   last_error="Ollama not reachable at http://127.0.0.1:11434"))
        quiet = {"cycle_id": "c-x", "outcome": "skipped", "reason": "", "counts": {}}
        for _ in range(3):
            notify.cycle_ended(s, st, quiet, AT)
        notify.close(grace_s=10)
    assert [g["body"]["event"] for g in receiver.got] == ["ollama_waiting"]
    assert receiver.got[0]["body"]["model_tag"] == "chatos-retrained:v1"
    assert "4.0 h" in receiver.got[0]["body"]["summary"]


def test_notify_test_reports_each_notifier(receiver: Receiver, tmp_path: Path, capsys: Any) -> None:
    bad = hook_script(tmp_path, "exit 2\n")
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(json.dumps({"state": {"dir": str(tmp_path / "state")}, "store": {"root": str(tmp_path / "s")},
                               "notify": {"webhook": {"url": receiver.url, "secret": SECRET},
                                          "command": {"argv": [str(bad)]}}}))
    assert cli.main(["--config", str(cfg), "notify", "test", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert [(r["notifier"], r["ok"]) for r in out["notifiers"]] == [("webhook", True), ("command", False)]
    assert receiver.got[0]["event"] == "test" and receiver.got[0]["signed_ok"]
    cfg.write_text(json.dumps({"state": {"dir": str(tmp_path / "state")}, "store": {"root": str(tmp_path / "s")},
                               "notify": {"webhook": {"url": receiver.url}}}))
    assert cli.main(["--config", str(cfg), "notify", "test"]) == 0
    assert capsys.readouterr().out.startswith("webhook  ok     HTTP 200")
    empty = tmp_path / "empty.yaml"
    empty.write_text(json.dumps({"state": {"dir": str(tmp_path / "state")}}))
    assert cli.main(["--config", str(empty), "notify", "test"]) == 2
