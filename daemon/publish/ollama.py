"""Ollama's HTTP API as values (pure): request bodies, the judgement of answers, and the typed errors.

:mod:`daemon.publish.ollama_client` (the only module of the service that speaks HTTP) executes these; keeping them
pure makes every body and every check testable without a server. The errors callers branch on:

- :class:`OllamaUnavailable`: nothing answered (refused, DNS, timeout, connection dropped). Keep the artifact and
  retry later.
- :class:`NotFound`: HTTP 404 (unknown model or blob).
- :class:`DigestMismatch`: the server hashed the uploaded blob to another digest. Never retried blindly.
- :class:`OllamaError`: anything else (4xx/5xx with the server's ``{"error"}`` text, an ``error`` line inside a 200
  NDJSON stream, a stream that ends without ``success``, a malformed answer).

The contract comes from Ollama's ``server/routes.go`` and ``server/create.go`` (``tests/ollama_standin.py`` serves the
same; docs/operations.md says what each failure means to an operator): errors before the first NDJSON line are real
HTTP errors, errors after it arrive as ``{"error": ...}`` lines inside an HTTP 200, so :func:`parse_create_lines`
scans every line and requires the final ``{"status": "success"}``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
"""What this client sends: lowercase hex, colon separator (the server also accepts ``sha256-`` and uppercase)."""

_MAX_ERROR_TEXT = 300  # keep one-line messages readable when a server returns a page instead of JSON

# Ollama's model.Name parts (types/model/name.go): [host/][namespace/]model[:tag], each part starting alnum or "_".
_NAME_RE = re.compile(
    r"^(?:(?:[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349})/)?"  # host (may carry a :port)
    r"(?:(?:[A-Za-z0-9_][A-Za-z0-9_-]{0,79})/)?"  # namespace
    r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"  # model
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,79})?$"  # tag
)

# --------------------------------------------------------------------------------------------------- errors


class OllamaError(Exception):
    """A failed Ollama call; ``str()`` is one line naming the call, the HTTP status and the server's error text."""

    def __init__(self, message: str, *, status: int | None = None, server_error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.server_error = server_error

    @property
    def retryable(self) -> bool:
        """True when trying again later can succeed (server down or a 5xx); False for a request Ollama rejects."""
        return self.status is None or self.status >= 500


class OllamaUnavailable(OllamaError):
    """Nothing usable answered: connection refused, DNS failure, timeout, or the connection dropped mid-answer."""

    @property
    def retryable(self) -> bool:
        return True


class NotFound(OllamaError):
    """HTTP 404: the model (or blob) does not exist on the server."""


class DigestMismatch(OllamaError):
    """The server hashed the uploaded bytes to another digest (HTTP 400): the file changed or the transfer broke."""


# --------------------------------------------------------------------------------------------------- pure core


def check_digest(digest: str) -> str:
    """Return ``digest`` when it is ``sha256:<64 lowercase hex>``; raise ValueError before any request otherwise."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ValueError(f"digest {digest!r} is not of the form sha256:<64 lowercase hex>")
    return digest


def valid_model_name(name: str) -> bool:
    """True when Ollama accepts ``name`` (``[host/][namespace/]model[:tag]``) in create/copy."""
    return isinstance(name, str) and bool(_NAME_RE.match(name))


def check_model_name(name: str) -> str:
    """Return ``name`` when Ollama would accept it; raise ValueError otherwise (before any request)."""
    if not valid_model_name(name):
        raise ValueError(f"model name {name!r} is not a valid Ollama name ([namespace/]model[:tag])")
    return name


@dataclass(frozen=True)
class ModelSpec:
    """What Ollama is told about a model beside its weights: the one description that both the ``/api/create``
    body and the Modelfile beside the GGUF (:mod:`daemon.publish.modelfile`) are built from, so they cannot drift.

    ``options`` are the configured extra parameters (never ``stop``: the stop strings are the template's own)."""

    template: str
    stop: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    system: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "options", MappingProxyType({k: v for k, v in self.options.items() if k != "stop"}))

    @property
    def parameters(self) -> dict[str, Any]:
        """The create body's ``parameters``: the options, then ``stop`` as a list."""
        return {**self.options, "stop": list(self.stop)}


def create_body(
    name: str,
    files: Mapping[str, str],
    *,
    template: str | None = None,
    system: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    stream: bool = True,
) -> dict[str, Any]:
    """The ``POST /api/create`` body for a model built from uploaded blobs (never ``from``/``adapters``/``quantize``).

    ``files`` maps relative file names to blob digests (``{"model.gguf": "sha256:..."}``); ``parameters`` carries
    ``stop`` (a list) and any extra options.
    """
    check_model_name(name)
    if not files:
        raise ValueError("create needs at least one file")
    for fname, digest in files.items():
        if not fname or fname.startswith("/") or ".." in fname.split("/") or "\\" in fname or ":" in fname:
            raise ValueError(f"file name {fname!r} must be a relative path")
        check_digest(digest)
    body: dict[str, Any] = {"model": name, "files": dict(files), "stream": stream}
    if template is not None:
        body["template"] = template
    if system is not None:
        body["system"] = system
    if parameters:
        params = dict(parameters)
        if "stop" in params:
            params["stop"] = list(params["stop"])
        body["parameters"] = params
    return body


def chat_body(
    name: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    num_predict: int,
    temperature: float = 0.0,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``POST /api/chat`` body for one non-streamed, bounded answer (the smoke test)."""
    if num_predict <= 0:
        raise ValueError("num_predict must be positive: an unbounded smoke answer can run forever")
    opts: dict[str, Any] = dict(options or {})
    opts.update({"num_predict": int(num_predict), "temperature": float(temperature)})
    return {"model": name, "messages": [dict(m) for m in messages], "stream": False, "options": opts}


def parse_create_lines(lines: Iterable[str], *, on_status: Callable[[str], None] | None = None) -> list[str]:
    """Judge a ``/api/create`` NDJSON stream: return its statuses, raise OllamaError on an ``error`` line, a line that
    is not a JSON object, or a stream whose last status is not ``success``. Unknown statuses are progress."""
    statuses: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise OllamaError(f"unreadable stream line {one_line(line)!r}") from None
        if not isinstance(obj, dict):
            raise OllamaError(f"unexpected stream line {one_line(line)!r}")
        if "error" in obj:
            # Ollama's own stream:false mapping: the line's "status" when it has one, else 500.
            status = obj["status"] if isinstance(obj.get("status"), int) else 500
            text = one_line(str(obj["error"]))
            after = f" after {statuses[-1]!r}" if statuses else ""
            raise OllamaError(f"error line{after} (status {status}): {text}", status=status, server_error=text)
        st = obj.get("status")
        if isinstance(st, str):
            statuses.append(st)
            if on_status is not None:
                on_status(st)
    if not statuses or statuses[-1] != "success":
        last = repr(statuses[-1]) if statuses else "nothing"
        raise OllamaError(f"stream ended without success (last status: {last})")
    return statuses


def parse_parameters(text: str) -> dict[str, list[str]]:
    """Parse ``/api/show``'s ``parameters`` text (``<name padded to 30> <value>`` per line, strings Go-quoted, one
    line per list element) into ``{name: [values...]}``."""
    out: dict[str, list[str]] = {}
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        key, _, value = line.partition(" ")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)  # Go's %q/%#v quoting is JSON-compatible for the strings we send
            except ValueError:
                value = value[1:-1]
        out.setdefault(key, []).append(value)
    return out


def verify_show(
    show_json: Mapping[str, Any],
    *,
    architecture: str | Sequence[str] | None,
    template: str,
    stops: Sequence[str],
) -> list[str]:
    """Problems with a freshly created model's ``/api/show``: not gguf, another architecture, another template, a
    missing stop. Empty means the model is what we uploaded. ``architecture`` may list several accepted values;
    ``None`` or empty accepts any."""
    problems: list[str] = []
    details = show_json.get("details") or {}
    fmt = details.get("format") if isinstance(details, Mapping) else None
    if fmt != "gguf":
        problems.append(f"format is {fmt!r}, expected 'gguf'")
    wanted = [architecture] if isinstance(architecture, str) else list(architecture or [])
    if wanted:
        info = show_json.get("model_info") or {}
        arch = info.get("general.architecture") if isinstance(info, Mapping) else None
        if arch not in wanted:
            problems.append(f"architecture is {arch!r}, expected {' or '.join(repr(a) for a in wanted)}")
    got_template = show_json.get("template")
    if got_template != template:
        problems.append(f"template differs from the training template ({_template_diff(got_template, template)})")
    have = parse_parameters(str(show_json.get("parameters") or "")).get("stop", [])
    missing = [s for s in stops if s not in have]
    if missing:
        problems.append(f"stop parameters missing: {', '.join(repr(s) for s in missing)}")
    return problems


def smoke_problems(chat_json: Mapping[str, Any], require_stop: bool) -> list[str]:
    """Problems with a smoke ``/api/chat`` answer: empty content, not done, or (when ``require_stop``) an answer cut
    by ``num_predict`` (``done_reason == "length"``), the symptom of a template/stop-token mismatch."""
    problems: list[str] = []
    message = chat_json.get("message") or {}
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, str) or not content.strip():
        problems.append("empty answer")
    if chat_json.get("done") is False:
        problems.append("answer not done")
    reason = chat_json.get("done_reason")
    if require_stop and reason == "length":
        problems.append("answer ran to num_predict without a stop (done_reason 'length'): check the template and stops")
    return problems


def _template_diff(got: Any, want: str) -> str:
    if not isinstance(got, str):
        return f"server has {type(got).__name__}"
    n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
    return f"first difference at character {n}; server has {len(got)} characters, expected {len(want)}"


def one_line(text: str, limit: int = _MAX_ERROR_TEXT) -> str:
    """``text`` on one line, cut to ``limit`` characters (a server may answer a whole page)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def error_text(body: bytes | str) -> str:
    """The server's error text from a response body: ``{"error": "..."}`` when it is JSON, else the body itself."""
    raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(raw)
    except ValueError:
        return one_line(raw)
    if isinstance(obj, dict) and "error" in obj:
        return one_line(str(obj["error"]))
    return one_line(raw)


def http_error(call: str, status: int, body: bytes | str) -> OllamaError:
    """Map an HTTP error answer to the error class callers branch on (pure, so the mapping is testable)."""
    text = error_text(body)
    msg = f"Ollama {call}: HTTP {status}" + (f": {text}" if text else "")
    if status == 404:
        return NotFound(msg, status=status, server_error=text)
    if status == 400 and text.startswith("digest mismatch"):
        return DigestMismatch(msg, status=status, server_error=text)
    return OllamaError(msg, status=status, server_error=text)
