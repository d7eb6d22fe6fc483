"""The Ollama HTTP client: the only module of the service that speaks HTTP.

A thin httpx shell over the pure core in :mod:`daemon.publish.ollama`: it sends the bodies built there, judges the
answers with the functions there, and maps every failure to one of its :class:`~daemon.publish.ollama.OllamaError`
subclasses with a one-line message. Every call has a timeout; redirects are never followed (the host is the
configured one or nothing) and no proxy is taken from the environment.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from daemon import log
from daemon.publish.ollama import (
    OllamaError,
    OllamaUnavailable,
    chat_body,
    check_digest,
    check_model_name,
    create_body,
    http_error,
    one_line,
    parse_create_lines,
)

if TYPE_CHECKING:
    from daemon.settings import OllamaSettings

_log = log.get("daemon.publish.ollama_client")

_CHUNK = 1 << 20  # upload chunk: 1 MiB keeps memory flat and syscalls few

ProgressFn = Callable[[int, int], None]
"""``progress(bytes_sent, total_bytes)`` during a blob upload."""


def file_sha256(path: Path | str) -> str:
    """``path``'s digest as Ollama names blobs, ``sha256:<hex>`` (streamed: a multi-GB GGUF never sits in memory)."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


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
            raise OllamaError(f"Ollama GET /api/version: no version in answer {one_line(json.dumps(obj))!r}")
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

    def ps(self) -> list[dict[str, Any]]:
        """``GET /api/ps``: the models loaded now (``name``, ``size``, ``size_vram``, ``expires_at``...)."""
        models = self._json("GET", "/api/ps").get("models")
        if not isinstance(models, list):
            raise OllamaError("Ollama GET /api/ps: answer has no 'models' list")
        return [m for m in models if isinstance(m, dict)]

    def unload(self, name: str) -> None:
        """``POST /api/generate`` with no prompt and ``keep_alive: 0``: Ollama frees the model's memory now (its
        documented way to unload). Unknown -> NotFound."""
        self._ok("POST", "/api/generate", json={"model": name, "keep_alive": 0, "stream": False})

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
            raise OllamaError(f"Ollama {method} {path}: answer is not JSON: {one_line(resp.text)!r}") from None
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
            why = f"cannot connect: {one_line(str(e)) or type(e).__name__}"
        else:
            why = f"{type(e).__name__}: {one_line(str(e))}" if str(e) else type(e).__name__
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
