"""The Ollama HTTP adapter: the only module of the service that speaks HTTP.

Pure functions build the request bodies and judge the answers (:func:`create_body`, :func:`chat_body`,
:func:`parse_create_lines`, :func:`verify_show`, :func:`smoke_problems`); :class:`OllamaClient` executes them with
httpx, a timeout on every call, and maps every failure to one :class:`OllamaError` subclass with a one-line message:

- :class:`OllamaUnavailable`: nothing answered (refused, DNS, timeout, connection dropped). Keep the artifact and
  retry later.
- :class:`NotFound`: HTTP 404 (unknown model or blob).
- :class:`DigestMismatch`: the server hashed the uploaded blob to another digest. Never retried blindly.
- :class:`OllamaError`: anything else (4xx/5xx with the server's ``{"error"}`` text, an ``error`` line inside a 200
  NDJSON stream, a stream that ends without ``success``, a malformed answer).

The contract comes from Ollama's ``server/routes.go`` and ``server/create.go`` (see docs/OLLAMA_AND_EXPORT.md in the
project notes): errors before the first NDJSON line are real HTTP errors, errors after it arrive as ``{"error": ...}``
lines inside an HTTP 200, so :meth:`OllamaClient.create` checks the code, scans every line and requires the final
``{"status": "success"}``. Redirects are never followed: the host is the configured one or nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from daemon import log

if TYPE_CHECKING:
    from daemon.settings import OllamaSettings

_log = log.get("daemon.publish.ollama")

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
"""What this client sends: lowercase hex, colon separator (the server also accepts ``sha256-`` and uppercase)."""

_CHUNK = 1 << 20  # upload and hashing chunk: 1 MiB keeps memory flat and syscalls few
_MAX_ERROR_TEXT = 300  # keep one-line messages readable when a server returns a page instead of JSON

# Ollama's model.Name parts (types/model/name.go): [host/][namespace/]model[:tag], each part starting alnum or "_".
_NAME_RE = re.compile(
    r"^(?:(?:[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349})/)?"  # host (may carry a :port)
    r"(?:(?:[A-Za-z0-9_][A-Za-z0-9_-]{0,79})/)?"  # namespace
    r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"  # model
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,79})?$"  # tag
)

ProgressFn = Callable[[int, int], None]
"""``progress(bytes_sent, total_bytes)`` during a blob upload."""


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


def file_sha256(path: Path | str, chunk_size: int = _CHUNK) -> str:
    """Stream ``path`` through sha256 (never whole in memory) and return ``sha256:<hex>``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return "sha256:" + h.hexdigest()


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
            raise OllamaError(f"unreadable stream line {_one_line(line)!r}") from None
        if not isinstance(obj, dict):
            raise OllamaError(f"unexpected stream line {_one_line(line)!r}")
        if "error" in obj:
            # Ollama's own stream:false mapping: the line's "status" when it has one, else 500.
            status = obj["status"] if isinstance(obj.get("status"), int) else 500
            text = _one_line(str(obj["error"]))
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


def _one_line(text: str, limit: int = _MAX_ERROR_TEXT) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def error_text(body: bytes | str) -> str:
    """The server's error text from a response body: ``{"error": "..."}`` when it is JSON, else the body itself."""
    raw = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(raw)
    except ValueError:
        return _one_line(raw)
    if isinstance(obj, dict) and "error" in obj:
        return _one_line(str(obj["error"]))
    return _one_line(raw)


def http_error(call: str, status: int, body: bytes | str) -> OllamaError:
    """Map an HTTP error answer to the error class callers branch on (pure, so the mapping is testable)."""
    text = error_text(body)
    msg = f"Ollama {call}: HTTP {status}" + (f": {text}" if text else "")
    if status == 404:
        return NotFound(msg, status=status, server_error=text)
    if status == 400 and text.startswith("digest mismatch"):
        return DigestMismatch(msg, status=status, server_error=text)
    return OllamaError(msg, status=status, server_error=text)


# --------------------------------------------------------------------------------------------------- the shell


class OllamaClient:
    """A thin httpx client for one Ollama server. Every call has a connect and a read timeout; uploads, create and
    chat use ``long_timeout_s`` per chunk/line (a big GGUF takes a while to parse, a model a while to load).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        host: str,
        timeout_s: float = 30.0,
        *,
        long_timeout_s: float | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Ollama host {host!r} must look like http://127.0.0.1:11434")
        self.host = host.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.long_timeout_s = float(long_timeout_s if long_timeout_s is not None else max(600.0, timeout_s))
        connect = min(self.timeout_s, 10.0)
        self._timeout = httpx.Timeout(self.timeout_s, connect=connect)
        self._long = httpx.Timeout(self.long_timeout_s, connect=connect)
        self._http = httpx.Client(
            base_url=self.host,
            timeout=self._timeout,
            follow_redirects=False,  # the host is the configured one; a redirect is an error, never followed
            trust_env=False,  # no proxy from the environment between us and a loopback Ollama
            transport=transport,
            headers={"User-Agent": "chatos-retrain"},
        )

    @classmethod
    def from_settings(cls, settings: OllamaSettings, **kw: Any) -> OllamaClient:
        """A client for the configured ``ollama.host`` with ``ollama.timeout_s`` (settings validated the host)."""
        return cls(settings.host, settings.timeout_s, **kw)

    # context manager -----------------------------------------------------------------------------------------

    def __enter__(self) -> OllamaClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # calls -----------------------------------------------------------------------------------------------------

    def version(self) -> str:
        """``GET /api/version``: the server's version string (also the cheapest reachability probe)."""
        obj = self._json("GET", "/api/version")
        v = obj.get("version")
        if not isinstance(v, str):
            raise OllamaError(f"Ollama GET /api/version: no version in answer {_one_line(json.dumps(obj))!r}")
        return v

    def blob_exists(self, digest: str) -> bool:
        """``HEAD /api/blobs/<digest>``: True when the server already has the blob."""
        path = "/api/blobs/" + quote(check_digest(digest), safe=":")
        resp = self._send("HEAD", path)
        if resp.status_code == 200:
            return True
        if resp.status_code == 404:
            return False
        raise http_error(f"HEAD {path}", resp.status_code, resp.content)

    def push_blob(self, path: Path | str, digest: str, progress: ProgressFn | None = None) -> bool:
        """Upload ``path`` as blob ``digest``, streamed in 1 MiB chunks. Returns True when the server stored it
        (201), False when it already had it (HEAD first, or a 200). A mismatch raises :class:`DigestMismatch`."""
        check_digest(digest)
        src = Path(path)
        if self.blob_exists(digest):
            return False
        size = src.stat().st_size
        url = "/api/blobs/" + quote(digest, safe=":")
        resp = self._send(
            "POST",
            url,
            content=_file_chunks(src, size, progress),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
            timeout=self._long,
        )
        if resp.status_code == 201:
            return True
        if resp.status_code == 200:
            return False
        raise http_error(f"POST {url}", resp.status_code, resp.content)

    def ensure_blob(self, path: Path | str, digest: str | None = None, progress: ProgressFn | None = None) -> str:
        """Make sure the server has ``path`` as a blob (hashed first when ``digest`` is None). Returns the digest."""
        d = check_digest(digest) if digest is not None else file_sha256(path)
        self.push_blob(path, d, progress)
        return d

    def create(
        self,
        name: str,
        files: Mapping[str, str],
        *,
        template: str | None = None,
        system: str | None = None,
        parameters: Mapping[str, Any] | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> list[str]:
        """``POST /api/create`` from uploaded blobs, streamed. Returns the status lines (ending with ``success``);
        raises on an HTTP error before the stream, on any ``error`` line, or when ``success`` never comes."""
        body = create_body(name, files, template=template, system=system, parameters=parameters, stream=True)
        call = "POST /api/create"
        _log.debug("ollama.request", method="POST", path="/api/create", host=self.host, model=name)
        try:
            with self._http.stream("POST", "/api/create", json=body, timeout=self._long) as resp:
                if resp.status_code != 200:
                    raise http_error(call, resp.status_code, resp.read())
                try:
                    return parse_create_lines(resp.iter_lines(), on_status=on_status)
                except OllamaError as e:
                    raise OllamaError(f"Ollama {call} ({name}): HTTP 200 stream: {e}", status=e.status,
                                      server_error=e.server_error) from None
        except httpx.HTTPError as e:
            raise self._unavailable(call, e) from None

    def show(self, name: str) -> dict[str, Any]:
        """``POST /api/show``: modelfile, parameters text, template, system, details, model_info. 404 -> NotFound."""
        return self._json("POST", "/api/show", json={"model": name})

    def tags(self) -> list[dict[str, Any]]:
        """``GET /api/tags``: the local models (``name``, ``digest``, ``size``, ``details``...)."""
        models = self._json("GET", "/api/tags").get("models")
        if not isinstance(models, list):
            raise OllamaError("Ollama GET /api/tags: answer has no 'models' list")
        return [m for m in models if isinstance(m, dict)]

    def copy(self, src: str, dst: str) -> None:
        """``POST /api/copy``: tag ``dst`` with ``src``'s manifest (same blobs, no upload). Missing src -> NotFound."""
        check_model_name(dst)
        self._ok("POST", "/api/copy", json={"source": src, "destination": dst})

    def delete(self, name: str) -> None:
        """``DELETE /api/delete``: remove one tag (the server prunes blobs nothing else uses). Unknown -> NotFound."""
        self._ok("DELETE", "/api/delete", json={"model": name})

    def chat(
        self,
        name: str,
        messages: Sequence[Mapping[str, Any]],
        num_predict: int,
        temperature: float = 0.0,
    ) -> dict[str, Any]:
        """``POST /api/chat`` without streaming, bounded by ``num_predict``: the whole answer object."""
        body = chat_body(name, messages, num_predict=num_predict, temperature=temperature)
        return self._json("POST", "/api/chat", json=body, timeout=self._long)

    # plumbing --------------------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, *, timeout: httpx.Timeout | None = None, **kw: Any) -> httpx.Response:
        """One request; transport failures become OllamaUnavailable, redirects an OllamaError."""
        call = f"{method} {path}"
        _log.debug("ollama.request", method=method, path=path, host=self.host)
        try:
            resp = self._http.request(method, path, timeout=timeout or self._timeout, **kw)
        except httpx.HTTPError as e:
            raise self._unavailable(call, e) from None
        if resp.is_redirect:
            where = resp.headers.get("location", "?")
            raise OllamaError(f"Ollama {call}: HTTP {resp.status_code} redirect to {where!r} refused "
                              f"(only {self.host} is trusted)", status=resp.status_code)
        return resp

    def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        resp = self._send(method, path, **kw)
        if resp.status_code != 200:
            raise http_error(f"{method} {path}", resp.status_code, resp.content)
        try:
            obj = resp.json()
        except ValueError:
            raise OllamaError(f"Ollama {method} {path}: answer is not JSON: {_one_line(resp.text)!r}") from None
        if not isinstance(obj, dict):
            raise OllamaError(f"Ollama {method} {path}: answer is not a JSON object")
        return obj

    def _ok(self, method: str, path: str, **kw: Any) -> None:
        resp = self._send(method, path, **kw)
        if resp.status_code != 200:
            raise http_error(f"{method} {path}", resp.status_code, resp.content)

    def _unavailable(self, call: str, e: httpx.HTTPError) -> OllamaUnavailable:
        if isinstance(e, httpx.TimeoutException):
            why = f"timed out ({type(e).__name__})"
        elif isinstance(e, httpx.ConnectError):
            why = f"cannot connect: {_one_line(str(e)) or type(e).__name__}"
        else:
            why = f"{type(e).__name__}: {_one_line(str(e))}" if str(e) else type(e).__name__
        return OllamaUnavailable(f"Ollama not reachable at {self.host} ({call}: {why})")


def _file_chunks(path: Path, size: int, progress: ProgressFn | None) -> Iterator[bytes]:
    """Yield ``path`` in 1 MiB chunks, reporting progress; fails if the file changes size under us."""
    sent = 0
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            sent += len(block)
            if progress is not None:
                progress(sent, size)
            yield block
    if sent != size:
        raise OllamaError(f"blob {path} changed size during upload ({size} -> {sent} bytes)")
