"""Notifications, the pure parts: which cycle outcomes become which events, the once-only wait for Ollama, the
webhook's signature, and the ``notify:`` settings' checks."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from daemon.cycle.context import CycleResult, Outcome
from daemon.notify import events as ev
from daemon.notify import webhook
from daemon.settings import NotifySettings, Settings

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
KEYS = {"event", "summary", "model_tag", "job_id", "cycle_id", "reason", "at"}


def summary(outcome: Outcome, **kw: Any) -> dict[str, Any]:
    r = CycleResult("c-1", outcome, True, kw.pop("reason", "why it ended"), job_id=kw.pop("job_id", "j-1"),
                    model_tag=kw.pop("model_tag", None), counts=kw.pop("counts", {}))
    return r.as_json()


@pytest.mark.parametrize(("outcome", "expected"), [
    (Outcome.PROMOTED, "promoted"), (Outcome.REGISTERED, "promoted"), (Outcome.PENDING_REGISTRATION, "promoted"),
    (Outcome.REJECTED, "rejected"), (Outcome.TRAIN_FAILED, "job_failed"), (Outcome.EXPORT_FAILED, "job_failed"),
    (Outcome.NO_SPACE, "job_failed"), (Outcome.ERROR, "job_failed"), (Outcome.REGISTER_FAILED, "registration_failed"),
    (Outcome.SKIPPED, None), (Outcome.DATASET, None), (Outcome.NOT_CONFIGURED, None), (Outcome.NO_DATA, None),
    (Outcome.CANCELLED, None), (Outcome.ABORTED, None),
])
def test_each_outcome_gives_its_event_or_none(outcome: Outcome, expected: str | None) -> None:
    found = ev.from_result(summary(outcome, model_tag="m:v3", reason="line one\nline two"), AT)
    assert [e.event for e in found] == ([expected] if expected else [])
    for e in found:
        assert set(e.as_json()) == KEYS and "\n" not in e.summary and e.reason == "line one line two"
        assert (e.cycle_id, e.job_id, e.model_tag, e.at) == ("c-1", "j-1", "m:v3", AT.isoformat())


def test_every_outcome_is_decided() -> None:
    """A new outcome must be placed: an event, or deliberately none."""
    silent = {Outcome.SKIPPED, Outcome.DATASET, Outcome.NOT_CONFIGURED, Outcome.NO_DATA, Outcome.CANCELLED,
              Outcome.ABORTED, Outcome.ERROR}
    assert {Outcome(o) for o in ev._BY_OUTCOME} | silent == set(Outcome)


def test_an_error_without_a_job_is_not_a_failed_job() -> None:
    assert ev.from_result(summary(Outcome.ERROR, job_id=None), AT) == []


def test_a_retried_registration_that_fails_for_good_is_reported() -> None:
    found = ev.from_result(summary(Outcome.SKIPPED, counts={"registrations_retried": ["v2:failed", "v3:pending"]}),
                           AT)
    assert [(e.event, e.reason) for e in found] == [("registration_failed", "Ollama refused v2")]


def pending(version: int, hours_ago: float) -> ev.Pending:
    return ev.Pending(version, f"m:v{version}", f"j-{version}", (AT - timedelta(hours=hours_ago)).isoformat(),
                      "Ollama not reachable at http://127.0.0.1:11434")


def test_waiting_for_ollama_is_reported_once_per_version() -> None:
    waiting = [pending(1, 7), pending(2, 1)]
    first, reported = ev.ollama_waiting(waiting, set(), now=AT, hours=6, cycle_id="c-1")
    assert [(e.event, e.model_tag) for e in first] == [("ollama_waiting", "m:v1")] and reported == {1}
    assert "7.0 h" in first[0].summary and first[0].reason.startswith("Ollama not reachable")
    again, reported = ev.ollama_waiting(waiting, reported, now=AT + timedelta(hours=1), hours=6, cycle_id="c-2")
    assert again == [] and reported == {1}
    later, reported = ev.ollama_waiting(waiting, reported, now=AT + timedelta(hours=5), hours=6, cycle_id="c-3")
    assert [e.model_tag for e in later] == ["m:v2"] and reported == {1, 2}
    # v1 registered (no longer pending): forgotten, so the set does not grow forever
    _, reported = ev.ollama_waiting([pending(2, 9)], reported, now=AT, hours=6, cycle_id="c-4")
    assert reported == {2}


def test_the_signature_is_hmac_sha256_of_the_raw_body() -> None:
    event = ev.test_event(AT)
    raw = webhook.body(event)
    assert json.loads(raw) == event.as_json()
    expected = hmac.new(b"s3cret", raw, hashlib.sha256).hexdigest()
    assert webhook.sign(b"s3cret", raw) == f"sha256={expected}"
    assert webhook.sign(b"other", raw) != webhook.sign(b"s3cret", raw)


def test_notify_defaults_send_every_event_and_nowhere() -> None:
    n = Settings().notify
    assert n.events == ["promoted", "rejected", "job_failed", "registration_failed", "ollama_waiting"]
    assert n.webhook.url is None and not n.webhook.allow_remote and not n.desktop.enabled and n.command.argv == []


@pytest.mark.parametrize("url", ["http://example.com/hook", "https://10.0.0.5:8443/x", "http://[2001:db8::1]/"])
def test_a_remote_webhook_needs_allow_remote(url: str) -> None:
    with pytest.raises(ValidationError, match=r"notify\.webhook\.allow_remote"):
        NotifySettings(webhook={"url": url})
    assert NotifySettings(webhook={"url": url, "allow_remote": True}).webhook.url == url


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "127.0.0.1:8080", "http:///nohost"])
def test_a_webhook_url_must_be_http(url: str) -> None:
    with pytest.raises(ValidationError, match="must look like"):
        NotifySettings(webhook={"url": url})


def test_loopback_webhooks_pass_and_the_secret_is_masked(tmp_path: Any) -> None:
    for url in ("http://127.0.0.1:9/h", "http://localhost/h", "http://[::1]:8080/"):
        assert NotifySettings(webhook={"url": url}).webhook.url == url
    s = Settings(notify={"webhook": {"url": "http://127.0.0.1/h", "secret": "hunter2"}})
    assert "hunter2" not in json.dumps(s.model_dump(mode="json")) and "hunter2" not in repr(s)
    with pytest.raises(ValidationError, match="not both"):
        NotifySettings(webhook={"url": "http://127.0.0.1/h", "secret": "a", "secret_file": str(tmp_path / "k")})


@pytest.mark.parametrize(("argv", "match"), [
    (["notify-me"], "absolute path"), (["relative/hook.sh"], "absolute path"), (["/bin/hook", ""], "non-empty"),
    ("/bin/hook --flag", "valid list"),
])
def test_bad_command_argv_is_refused(argv: Any, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        NotifySettings(command={"argv": argv})


def test_unknown_events_are_refused() -> None:
    with pytest.raises(ValidationError):
        NotifySettings(events=["promoted", "exploded"])
    assert NotifySettings(events=[]).events == []
