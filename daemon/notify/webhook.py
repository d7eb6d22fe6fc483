"""The webhook notifier: the service's second (and last) module that speaks HTTP, beside the Ollama adapter.

One JSON POST per event to ``notify.webhook.url`` (loopback unless ``allow_remote``), signed like GitHub's
``X-Hub-Signature-256``: ``X-Chatos-Signature: sha256=<hex HMAC-SHA256 of the raw body>`` with the configured
secret; ``X-Chatos-Event`` names the event. Connection errors, timeouts, 429 and 5xx are retried ``retries`` times
with doubling backoff (the sleeps end early when the dispatcher stops); another 4xx fails at once. Redirects are
never followed and no proxy is taken from the environment. Runs on the dispatcher's thread, never on a cycle's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from pathlib import Path

import httpx

from daemon import log
from daemon.notify.events import Event, one_line

_log = log.get("daemon.notify.webhook")

SIGNATURE_HEADER = "X-Chatos-Signature"
EVENT_HEADER = "X-Chatos-Event"


class NotifyError(Exception):
    """A notifier could not deliver an event; the message is one line."""


def body(event: Event) -> bytes:
    """The raw body: the event as compact JSON, keys sorted (what the signature covers)."""
    return json.dumps(event.as_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(secret: bytes, raw: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the raw body with the secret (verify with :func:`hmac.compare_digest`)."""
    return "sha256=" + hmac.new(secret, raw, hashlib.sha256).hexdigest()


class Webhook:
    """POSTs events to one URL. The secret is read when the notifier is built (from the config or a file, never
    from argv), and never logged."""

    name = "webhook"

    def __init__(self, url: str, *, secret: str | None = None, secret_file: Path | None = None,
                 timeout_s: float = 10.0, retries: int = 3, backoff_s: float = 2.0) -> None:
        self.url = url
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), float(backoff_s)
        self._secret_file = secret_file
        self._secret = secret.encode() if secret is not None else None

    def _key(self) -> bytes | None:
        if self._secret_file is None:
            return self._secret
        try:
            return self._secret_file.read_bytes().strip()
        except OSError as exc:
            raise NotifyError(f"cannot read notify.webhook.secret_file: {exc.strerror or exc}") from None

    def send(self, event: Event, stop: threading.Event) -> str:
        """Deliver ``event``; returns ``HTTP <code>`` (and the attempts it took), or raises :class:`NotifyError`."""
        raw = body(event)
        headers = {"Content-Type": "application/json", "User-Agent": "chatos-retrain", EVENT_HEADER: event.event}
        key = self._key()
        if key:
            headers[SIGNATURE_HEADER] = sign(key, raw)
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 5.0))
        last, attempt = "", 0
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as http:
            for attempt in range(1, self.retries + 2):
                try:
                    r = http.post(self.url, content=raw, headers=headers)
                except httpx.TimeoutException:
                    last = f"no answer within {self.timeout_s:g}s"
                except httpx.HTTPError as exc:
                    last = one_line(f"{type(exc).__name__}: {exc}")
                else:
                    if 200 <= r.status_code < 300:
                        return f"HTTP {r.status_code}" + (f" after {attempt} attempts" if attempt > 1 else "")
                    last = f"HTTP {r.status_code}"
                    if 400 <= r.status_code < 500 and r.status_code != 429:
                        break
                if attempt <= self.retries:
                    _log.debug("notify.retry", notifier=self.name, notify_event=event.event, attempt=attempt,
                               reason=last)
                    if stop.wait(self.backoff_s * 2 ** (attempt - 1)):
                        raise NotifyError(f"{last}; the service is stopping")
        raise NotifyError(f"{last} (attempt {attempt} of {self.retries + 1})")
