"""A faithful stand-in for Ollama's HTTP API, for tests and benchmarks (no Ollama binary is obtainable here).

A real HTTP/1.1 server on loopback (stdlib ``ThreadingHTTPServer``) implementing the contract read from Ollama's
``server/routes.go`` and ``server/create.go`` (the same one ``daemon/publish/ollama.py`` describes):

- ``HEAD/POST /api/blobs/<digest>``: digest regex ``^sha256[:-][0-9a-fA-F]{64}$`` (else 400 ``invalid digest
  format``); POST hashes the body while streaming it to disk (1 MiB chunks, memory flat): 201 stored, 200 already
  present (answered without reading the body, like Ollama), 400 ``digest mismatch, expected "A", got "B"``.
- ``POST /api/create``: request errors are real HTTP 4xx before the stream (bad name, non-relative ``files`` key,
  unknown blob, ``adapters``, ``quantize``); then NDJSON ``parsing GGUF``, ``using existing layer``/``creating new
  layer``, ``writing manifest``, ``success``; a non-GGUF blob or a ``from`` that would need a pull is an ``error`` line
  inside the 200. ``stream: false`` answers the final object with the matching HTTP code.
- ``GET /api/tags``, ``POST /api/show`` (GGUF header read with the ``gguf`` package; ``capabilities`` derived like
  Ollama's: ``completion``, plus ``tools`` when the template uses ``.Tools``), ``POST /api/copy``, ``DELETE
  /api/delete`` (prunes blobs no other manifest uses), ``POST /api/chat``, ``GET /api/version``.
- Loaded models, like Ollama's scheduler: a chat loads its model and keeps it for ``keep_alive`` (default 5m; a
  number is seconds, a string a Go duration, negative = forever); ``GET /api/ps`` lists what is loaded (``name``,
  ``model``, ``size``, ``digest``, ``details``, ``expires_at``, ``size_vram``, ``context_length``); ``keep_alive: 0``
  unloads after answering. ``POST /api/generate`` with no prompt loads (``done_reason "load"``) or, with
  ``keep_alive: 0``, unloads (``"unload"``); an unknown model is 404 ``model 'X' not found``; with a prompt it
  answers like a one-message chat (``response``).
- ``/api/create`` checks the Go ``template`` the way Ollama's ``template.Parse`` would reject it, with a Python
  check of text/template's action syntax (:func:`go_template_error`: unclosed ``{{``, empty or unknown actions,
  unknown functions, ``{{ if }}``/``{{ range }}``/``{{ with }}`` without ``{{ end }}``, a stray ``{{ end }}`` or
  ``{{ else }}``): Ollama's ``template error: template: :LINE: ...``, HTTP 400 (an error line when streaming). A blob
  that is not GGUF fails like Ollama's content sniffing: ``unsupported content type: unknown`` (:func:`err_not_gguf`).
- ``/api/chat`` runs the registered GGUF in llama.cpp's engine (``xllamacpp``, loaded in this process, one server per
  blob): greedy or sampled per ``options.temperature``, cut at ``options.num_predict`` (``done_reason "length"``) or
  at an ``options.stop`` string or end-of-generation token (``"stop"``), like Ollama's runner; a GGUF the engine
  cannot load is Ollama's 500 ``llama runner process has terminated: ...``. A GGUF with no transformer blocks (what
  :func:`make_tiny_gguf` writes) cannot run in any engine: it, or any GGUF when ``xllamacpp`` is not importable or
  the engine is switched off (``use_llama=False``), gets a deterministic canned reply (cut to ``num_predict`` words
  with ``done_reason "length"``) and says so in the reply's ``"standin"`` note.

State lives under ``data_dir`` in Ollama's layout (``blobs/sha256-<hex>``, ``manifests/<host>/<ns>/<model>/<tag>``), so
it survives a restart. Faults (constructor keywords, :meth:`StandinServer.set_faults`, or ``POST /_standin/faults``
on the API port or the separate admin port): ``down`` (listener closed: connection refused), ``status_500``,
``slow_s``, ``error_mid_stream``, ``digest_mismatch``, ``disk_full``, ``no_success``.

Use in tests: the ``ollama_standin`` fixture (a server in a thread) or :class:`StandinProcess` (a subprocess, for
black-box and memory tests). As a script: ``python tests/ollama_standin.py --port P --data DIR`` prints one JSON line
``{"url", "admin_url", "pid"}`` when ready and runs until SIGTERM/SIGINT.

This module must not import the project (it stands for a foreign server); only stdlib, plus ``gguf``/``xllamacpp``
when importable.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.server
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

try:  # the fixture is only defined where pytest is importable; the script runs without it
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

VERSION = "0.33.0"
DIGEST_RE = re.compile(r"^sha256[:-][0-9a-fA-F]{64}$")
CANNED_REPLY = "Hello! This is the Ollama stand-in answering without a model: no engine can run this GGUF here."
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
CHUNK = 1 << 20
MAX_JSON_BODY = 64 << 20
DISCARD_LIMIT = 256 << 10  # like Go's net/http: unread request bodies up to this are drained, larger ones close

MT_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_MODEL = "application/vnd.ollama.image.model"
MT_TEMPLATE = "application/vnd.ollama.image.template"
MT_SYSTEM = "application/vnd.ollama.image.system"
MT_PARAMS = "application/vnd.ollama.image.params"

_PART = {
    "host": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}$"),
    "namespace": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,79}$"),
    "model": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
    "tag": re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}$"),
}

_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
               11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
               17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}

ERR_ADAPTERS = "LoRA adapters are no longer supported"
ERR_QUANTIZE = ("create-time quantization is only supported for safetensors imports; "
                "quantize GGUF models with llama.cpp tools before importing")
ERR_NOT_GGUF = "unsupported content type: unknown"  # a binary blob that is not GGUF (see err_not_gguf)
ERR_BAD_TEMPLATE = "template error"  # Ollama's errBadTemplate; the parse error follows after ": "
ENGINE_THREADS = 2


def err_not_gguf(head: bytes) -> str:
    """Ollama's error for a blob that is not GGUF (``server/create.go`` ``detectContentType``: its own sniffing, then
    Go's ``http.DetectContentType``, else ``unknown``), for the few content types a test uploads."""
    if head.startswith(b"PK\x03\x04"):
        kind = "application/zip"
    elif head and not any(b < 0x20 and b not in b"\t\n\r\x0c\x1b" for b in head[:512]):
        kind = "text/plain; charset=utf-8"
    else:
        return ERR_NOT_GGUF
    return f"unsupported content type: {kind}"


# Functions Ollama's templates may call: text/template's builtins and Ollama's own (template/template.go funcs).
_GO_FUNCS = {"and", "or", "not", "len", "index", "slice", "print", "printf", "println", "html", "js", "urlquery",
             "call", "eq", "ne", "lt", "le", "gt", "ge", "json", "currentDate", "yesterdayDate", "toTypeScriptType"}
_GO_OPENERS = {"if", "range", "with", "define", "block"}
_GO_LITERAL = re.compile(r"""^(?:\.|\$|"|'|`|\(|-?\d|true\b|false\b|nil\b)""")


def go_template_error(text: str) -> str | None:
    """Why Go's text/template would refuse ``text`` (``template: :LINE: message``, Ollama's parse error), or None.

    A Python check of the action syntax, not Go itself (no Go toolchain is needed): actions ``{{ ... }}`` with the
    ``{{-``/``-}}`` trim markers and ``{{/* */}}`` comments, quoted strings inside actions, the control structures'
    nesting (``if``/``range``/``with``/``define``/``block`` ... ``else`` ... ``end``) and the function or keyword an
    action starts with. It does not type-check pipelines; every template of ``daemon/train/templates.py`` passes."""
    stack: list[str] = []
    pos = 0
    while True:
        start = text.find("{{", pos)
        if start < 0:
            break
        line = text.count("\n", 0, start) + 1
        end = _action_end(text, start + 2)
        if end < 0:
            return f"template: :{line}: unclosed action"
        body = text[start + 2:end].strip()
        body = body[1:].strip() if body.startswith("-") else body
        body = body[:-1].strip() if body.endswith("-") and not body.endswith("--") else body
        pos = end + 2
        if body.startswith("/*"):
            if not body.endswith("*/"):
                return f"template: :{line}: unclosed comment"
            continue
        word = re.split(r"[\s(|]", body, maxsplit=1)[0] if body else ""
        if not body:
            return f"template: :{line}: missing value for command"
        if word in _GO_OPENERS:
            if len(body.split(None, 1)) < 2:
                return f"template: :{line}: missing value for {word}"
            stack.append(word)
        elif word == "else":
            if not stack or stack[-1] not in ("if", "range", "with"):
                return f"template: :{line}: unexpected {{{{else}}}}"
        elif word == "end":
            if not stack:
                return f"template: :{line}: unexpected {{{{end}}}}"
            stack.pop()
        elif word in ("break", "continue"):
            if "range" not in stack:
                return f"template: :{line}: {{{{{word}}}}} outside {{{{range}}}}"
        elif word == "template":
            continue
        elif not _GO_LITERAL.match(word) and word not in _GO_FUNCS and not re.match(r"^\$\w*", word):
            if not re.match(r"^[A-Za-z_]\w*$", word):
                return f'template: :{line}: unexpected "{word[:1]}" in command'
            return f'template: :{line}: function "{word}" not defined'
    if stack:
        return f"template: :{text.count(chr(10)) + 1}: unexpected EOF"
    return None


def _action_end(text: str, i: int) -> int:
    """Where the action opened before ``i`` closes (the index of its ``}}``), skipping quoted strings; -1 if never."""
    quote = ""
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote != "`":
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c in "\"'`":
            quote = c
        elif text.startswith("}}", i):
            return i
        i += 1
    return -1


# --------------------------------------------------------------------------------------------------- faults


@dataclass
class Faults:
    """Switches that make the stand-in misbehave the ways a real Ollama does."""

    down: bool = False  # API listener closed: connection refused (the admin port keeps answering)
    status_500: bool = False  # every API call answers 500 {"error": "internal"}
    slow_s: float = 0.0  # every API answer is delayed this long
    error_mid_stream: bool = False  # create emits "parsing GGUF" then an {"error"} line inside the 200
    digest_mismatch: bool = False  # every blob POST ends 400 digest mismatch
    disk_full: bool = False  # every blob POST ends 500 "no space left on device"
    no_success: bool = False  # create writes the manifest but the stream ends without its final "success" line

    def updated(self, values: Mapping[str, Any]) -> Faults:
        """A copy with ``values`` applied; unknown names or wrong types raise ValueError."""
        known = {f.name: f.type for f in fields(self)}
        out = Faults(**asdict(self))
        for k, v in values.items():
            if k not in known:
                raise ValueError(f"unknown fault {k!r}; known: {', '.join(known)}")
            if k == "slow_s":
                if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                    raise ValueError("slow_s must be a non-negative number")
                v = float(v)
            elif not isinstance(v, bool):
                raise ValueError(f"fault {k} must be true or false")
            setattr(out, k, v)
        return out


# --------------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class Name:
    """An Ollama model name with defaults filled in (``types/model/name.go``)."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, raw: Any) -> Name | None:
        """Parse ``[host/][namespace/]model[:tag]``; None when Ollama would call it invalid."""
        if not isinstance(raw, str) or not raw:
            return None
        rest, tag = raw, DEFAULT_TAG
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1:]
        parts = rest.split("/")
        if len(parts) > 3:
            return None
        model = parts[-1]
        namespace = parts[-2] if len(parts) >= 2 else DEFAULT_NAMESPACE
        host = parts[-3] if len(parts) == 3 else DEFAULT_HOST
        checks = (("host", host), ("namespace", namespace), ("model", model), ("tag", tag))
        if not all(_PART[k].match(v) for k, v in checks):
            return None
        return cls(host, namespace, model, tag)

    def display(self) -> str:
        """Ollama's DisplayShortest: default host and namespace left out."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    def key(self) -> tuple[str, ...]:
        """Names compare case-insensitively."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())


class ApiError(Exception):
    """An error answered as an HTTP status with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------------- on-disk store


class Store:
    """Blobs and manifests under ``root``, in Ollama's layout. Every request reads the disk: a restart loses nothing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.manifests = root / "manifests"
        self.lock = threading.RLock()
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.manifests.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def canonical(digest: str) -> str:
        return digest.replace("-", ":", 1)

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-", 1)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def put_bytes(self, data: bytes) -> tuple[str, int, bool]:
        """Store a small blob (template, params, config); returns (digest, size, newly_created)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if path.is_file():
            return digest, len(data), False
        _atomic_write(path, data)
        return digest, len(data), True

    def manifest_file(self, name: Name) -> Path:
        return self.manifests / name.host / name.namespace / name.model / name.tag

    def find(self, name: Name) -> tuple[Name, Path] | None:
        """The stored name matching ``name`` case-insensitively, and its manifest file."""
        exact = self.manifest_file(name)
        if exact.is_file():
            return name, exact
        for stored, path in self.all():
            if stored.key() == name.key():
                return stored, path
        return None

    def all(self) -> list[tuple[Name, Path]]:
        out = []
        for p in self.manifests.glob("*/*/*/*"):
            if p.is_file() and not p.name.startswith("."):
                rel = p.relative_to(self.manifests).parts
                out.append((Name(*rel), p))
        return out

    def read_manifest(self, path: Path) -> dict[str, Any]:
        obj: dict[str, Any] = json.loads(path.read_bytes())
        return obj

    def write_manifest(self, name: Name, data: bytes) -> None:
        existing = self.find(name)
        if existing is not None and existing[0] != name:
            existing[1].unlink()  # same name in another case: Ollama keeps one
        _atomic_write(self.manifest_file(name), data)

    def referenced(self) -> set[str]:
        refs: set[str] = set()
        for _, path in self.all():
            try:
                m = self.read_manifest(path)
            except (OSError, ValueError):
                continue
            refs.add(self.canonical(m.get("config", {}).get("digest", "")))
            refs.update(self.canonical(layer.get("digest", "")) for layer in m.get("layers", []))
        return refs

    def prune(self, candidates: set[str] | None = None) -> list[str]:
        """Delete blobs no manifest references (all unreferenced when ``candidates`` is None). Returns them."""
        refs = self.referenced()
        removed = []
        for p in self.blobs.iterdir():
            if not p.name.startswith("sha256-") or "-partial" in p.name:
                continue
            d = self.canonical(p.name)
            if d in refs or (candidates is not None and d not in candidates):
                continue
            p.unlink(missing_ok=True)
            removed.append(d)
        return removed


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------- GGUF


_GGUF_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}
_GGUF_LOCK = threading.Lock()


def read_gguf(path: Path) -> dict[str, Any]:
    """The GGUF's key/values and parameter count, via the ``gguf`` package (``{}`` when it is not importable).
    Blobs are content-addressed and never change, so one read per file is enough (a 150k-token vocabulary takes
    the reader ~10 s to open)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _GGUF_LOCK:
        if key in _GGUF_CACHE:
            return _GGUF_CACHE[key]
    out = _read_gguf(path)
    with _GGUF_LOCK:
        _GGUF_CACHE[key] = out
    return out


def _read_gguf(path: Path) -> dict[str, Any]:
    try:
        import gguf
    except ImportError:
        return {}
    reader = gguf.GGUFReader(str(path))
    kv: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if hasattr(value, "tolist"):
            value = value.tolist()
        kv[key] = value
    count = int(sum(int(t.n_elements) for t in reader.tensors))
    runnable = any(str(t.name).startswith("blk.") for t in reader.tensors)  # has transformer blocks to run
    del reader
    return {"kv": kv, "parameter_count": count, "runnable": runnable}


def keep_alive_seconds(value: Any) -> float:
    """Ollama's ``keep_alive``: absent = 5m; a number = seconds; a string = a Go duration ("5m", "1h30m", "0s", "0");
    negative = forever (returned as -1)."""
    if value is None or value == "":
        return 300.0
    if isinstance(value, bool):
        raise ApiError(400, "invalid keep_alive")
    if isinstance(value, int | float):
        return -1.0 if value < 0 else float(value)
    text = str(value).strip()
    try:
        number = float(text)
        return -1.0 if number < 0 else number
    except ValueError:
        pass
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    found = re.fullmatch(r"-?(?:\d+(?:\.\d+)?(?:ns|us|ms|s|m|h))+", text)
    if not found:
        raise ApiError(400, f'time: invalid duration "{text}"')
    total = sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text))
    return -1.0 if text.startswith("-") else total


def human_number(n: int) -> str:
    """Ollama's format.HumanNumber (parameter_size): 494.03M, 1.5B, 8K."""
    for unit, div in (("B", 1_000_000_000), ("M", 1_000_000), ("K", 1_000)):
        if n >= div:
            v = n / div
            if v == int(v):
                return f"{int(v)}{unit}"
            return f"{v:.1f}{unit}" if unit == "B" else f"{v:.2f}{unit}"
    return str(n)


def make_tiny_gguf(
    path: Path,
    *,
    architecture: str = "qwen2",
    chat_template: str | None = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
    general_type: str | None = None,
    file_type: int = 1,
    pad_mb: float = 0.0,
) -> Path:
    """Write a small but valid GGUF (a few f16/f32 tensors, an architecture, a chat template) with ``gguf.GGUFWriter``.
    ``general_type="adapter"`` makes a LoRA-adapter GGUF; ``pad_mb`` adds a big tensor. No model weights needed."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), architecture)
    if general_type is not None:
        w.add_type(general_type)
    w.add_name("tiny-standin-test")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_file_type(file_type)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 8)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones((8,), dtype=np.float32))
    if pad_mb > 0:
        n = int(pad_mb * (1 << 20)) // 4
        w.add_tensor("pad.weight", rng.standard_normal(n).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------------------------------- HTTP plumbing


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], standin: StandinServer, admin_only: bool) -> None:
        self.standin = standin
        self.admin_only = admin_only
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def close_connections(self, spare: socket.socket | None = None) -> None:
        with self.conns_lock:
            conns = [c for c in self.conns if c is not spare]
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer
    server_version = "standin-ollama"
    _body_gen: Iterator[bytes] | None = None
    _body_finished = False
    _body_left = 0
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        with self.server.conns_lock:
            self.server.conns.add(self.connection)

    def finish(self) -> None:
        with self.server.conns_lock:
            self.server.conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.standin.verbose:
            sys.stderr.write("standin: " + (format % args) + "\n")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # request body --------------------------------------------------------------------------------------------

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body in pieces (Content-Length or chunked), never whole in memory; one reader per request,
        so a second call continues where the first stopped."""
        if self._body_gen is None:
            self._body_gen = self._read_body()
        return self._body_gen

    def _read_body(self) -> Iterator[bytes]:
        te = self.headers.get("Transfer-Encoding", "").lower()
        if "chunked" in te:
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    raise ConnectionError("client closed mid-body")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    self._body_finished = True
                    return
                left = size
                while left:
                    piece = self.rfile.read(min(left, CHUNK))
                    if not piece:
                        raise ConnectionError("client closed mid-body")
                    left -= len(piece)
                    yield piece
                self.rfile.readline(16)
        else:
            while self._body_left > 0:
                piece = self.rfile.read(min(self._body_left, CHUNK))
                if not piece:
                    raise ConnectionError("client closed mid-body")
                self._body_left -= len(piece)
                yield piece
            self._body_finished = True

    def _drain(self) -> None:
        for _ in self._body_chunks():
            pass

    def _discard_like_go(self) -> None:
        """Answering without reading (all of) the body: drain a small rest, close the connection after a big one."""
        if self._body_finished:
            return
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        if not chunked and self._body_left <= DISCARD_LIMIT:
            self._drain()
        else:
            self.close_connection = True

    def _json_body(self) -> dict[str, Any]:
        data = bytearray()
        for piece in self._body_chunks():
            data += piece
            if len(data) > MAX_JSON_BODY:
                raise ApiError(400, "request body too large")
        if not data.strip():
            raise ApiError(400, "missing request body")
        try:
            obj = json.loads(bytes(data))
        except ValueError as e:
            raise ApiError(400, f"invalid character in JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "json: cannot unmarshal into Go value of type api.Request")
        return obj

    # responses -----------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/json; charset=utf-8") -> None:
        self.send_response(status)
        if body or self.command != "HEAD":
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Date", self.date_time_string())
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _send_error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": message})

    def _stream_start(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def _stream_line(self, obj: Any) -> None:
        data = json.dumps(obj).encode() + b"\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _stream_end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # routing -------------------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self._body_gen = None
        self._body_finished = False
        try:
            self._body_left = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._body_left = 0
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        standin = self.server.standin
        try:
            if path.startswith("/_standin/"):
                self._admin(method, path)
                return
            if self.server.admin_only:
                self._discard_like_go()
                self._send(404, b"404 page not found", "text/plain")
                return
            faults = standin.faults
            if faults.slow_s > 0 and standin.halt.wait(faults.slow_s):
                self.close_connection = True
                return
            if faults.status_500:
                self._discard_like_go()
                self._send_error(500, "internal")
                return
            self._route(method, path)
        except ApiError as e:
            self._discard_like_go()
            self._send_error(e.status, e.message)
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True

    def _route(self, method: str, path: str) -> None:
        api = _Api(self)
        if path == "/" and method in ("GET", "HEAD"):
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/version" and method in ("GET", "HEAD"):
            self._send_json(200, {"version": self.server.standin.version})
        elif path.startswith("/api/blobs/") and method in ("HEAD", "POST"):
            api.blob(method, path[len("/api/blobs/"):])
        elif path == "/api/tags" and method in ("GET", "HEAD"):
            api.tags()
        elif path == "/api/create" and method == "POST":
            api.create()
        elif path == "/api/show" and method == "POST":
            api.show()
        elif path == "/api/copy" and method == "POST":
            api.copy()
        elif path == "/api/delete" and method == "DELETE":
            api.delete()
        elif path == "/api/chat" and method == "POST":
            api.chat()
        elif path == "/api/generate" and method == "POST":
            api.generate()
        elif path == "/api/ps" and method in ("GET", "HEAD"):
            self._send_json(200, {"models": self.server.standin.running()})
        else:
            self._discard_like_go()
            self._send(404, b"404 page not found", "text/plain")

    def _apply_and_answer(self, new: Faults) -> None:
        """Faults are in effect when the answer arrives; a `down` switch spares this connection until it answered."""
        standin = self.server.standin
        standin.apply_faults(new, spare=self.connection)
        if new.down and not self.server.admin_only:
            self.close_connection = True
        self._send_json(200, asdict(new))

    def _admin(self, method: str, path: str) -> None:
        standin = self.server.standin
        if path == "/_standin/faults" and method == "GET":
            self._send_json(200, asdict(standin.faults))
        elif path == "/_standin/faults" and method == "POST":
            try:
                new = standin.faults.updated(self._json_body())
            except ValueError as e:
                raise ApiError(400, str(e)) from None
            self._apply_and_answer(new)
        elif path == "/_standin/reset" and method == "POST":
            self._drain()
            self._apply_and_answer(Faults())
        else:
            self._discard_like_go()
            self._send(404, b"404 page not found", "text/plain")


# --------------------------------------------------------------------------------------------------- the API


class _Api:
    """The Ollama endpoints, one method each, over the on-disk store."""

    def __init__(self, h: _Handler) -> None:
        self.h = h
        self.standin = h.server.standin
        self.store = self.standin.store

    # blobs ---------------------------------------------------------------------------------------------------

    def blob(self, method: str, digest: str) -> None:
        """HEAD: 200/404. POST: hash while writing to a partial file, then rename: 201, 200 present, 400 mismatch."""
        h = self.h
        if not DIGEST_RE.match(digest):
            raise ApiError(400, "invalid digest format")
        if method == "HEAD":
            h._send(200 if self.store.has_blob(digest) else 404)
            return
        if self.store.has_blob(digest):
            h._discard_like_go()  # Ollama answers 200 without reading the upload
            h._send(200)
            return
        faults = self.standin.faults
        final = self.store.blob_path(digest)
        tmp = final.with_name(f"{final.name}-partial-{uuid.uuid4().hex}")
        sha = hashlib.sha256()
        try:
            with tmp.open("wb") as f:
                for piece in h._body_chunks():
                    if faults.disk_full:
                        break
                    sha.update(piece)
                    f.write(piece)
            if faults.disk_full:
                h._drain()
                raise ApiError(500, f"write {tmp}: no space left on device")
            got = "sha256:" + sha.hexdigest()
            if faults.digest_mismatch:
                got = "sha256:" + hashlib.sha256(got.encode()).hexdigest()
            if got != self.store.canonical(digest):
                raise ApiError(400, f'digest mismatch, expected "{digest}", got "{got}"')
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        h._send(201)

    # models --------------------------------------------------------------------------------------------------

    def tags(self) -> None:
        models: list[tuple[int, dict[str, Any]]] = []
        for name, path in self.store.all():
            try:
                raw = path.read_bytes()
                m = json.loads(raw)
                cfg = self._config(m)
            except (OSError, ValueError):
                continue
            size = int(m.get("config", {}).get("size", 0)) + sum(int(x.get("size", 0)) for x in m.get("layers", []))
            models.append((path.stat().st_mtime_ns, {
                "name": name.display(),
                "model": name.display(),
                "modified_at": _mtime(path),
                "size": size,
                "digest": hashlib.sha256(raw).hexdigest(),
                "details": _details(cfg),
            }))
        models.sort(key=lambda x: x[0], reverse=True)  # most recently modified first, like Ollama
        self.h._send_json(200, {"models": [m for _, m in models]})

    def show(self) -> None:
        req = self.h._json_body()
        raw = req.get("model") or req.get("name")
        if not raw:
            raise ApiError(400, "model is required")
        found = self._lookup(raw)
        name, path = found
        m = self.store.read_manifest(path)
        cfg = self._config(m)
        layers = {x.get("mediaType"): x for x in m.get("layers", [])}
        template = self._layer_text(layers.get(MT_TEMPLATE)) if MT_TEMPLATE in layers else "{{ .Prompt }}"
        system = self._layer_text(layers.get(MT_SYSTEM)) if MT_SYSTEM in layers else ""
        params = json.loads(self._layer_text(layers[MT_PARAMS])) if MT_PARAMS in layers else {}
        model_layer = layers.get(MT_MODEL)
        info: dict[str, Any] = {}
        if model_layer is not None:
            meta = read_gguf(self.store.blob_path(model_layer["digest"]))
            for k, v in meta.get("kv", {}).items():
                info[k] = [] if isinstance(v, list) and len(v) > 5 else v
            if meta:
                info["general.parameter_count"] = meta["parameter_count"]
        self.h._send_json(200, {
            "license": "",
            "modelfile": _modelfile(name, self.store.blob_path(model_layer["digest"]) if model_layer else None,
                                    template, system, params),
            "parameters": _parameters_text(params),
            "template": template,
            "system": system,
            "details": _details(cfg),
            "model_info": info,
            "capabilities": ["completion", *(["tools"] if re.search(r"\.Tools\b", template) else [])],
            "modified_at": _mtime(path),
        })

    def copy(self) -> None:
        req = self.h._json_body()
        src, dst = Name.parse(req.get("source")), Name.parse(req.get("destination"))
        if src is None:
            raise ApiError(400, f"source {json.dumps(req.get('source'))} is invalid")
        if dst is None:
            raise ApiError(400, f"destination {json.dumps(req.get('destination'))} is invalid")
        with self.store.lock:
            found = self.store.find(src)
            if found is None:
                raise ApiError(404, f"model {json.dumps(req.get('source'))} not found")
            self.store.write_manifest(dst, found[1].read_bytes())
        self.h._send(200)

    def delete(self) -> None:
        req = self.h._json_body()
        raw = req.get("model") or req.get("name")
        name = Name.parse(raw)
        if name is None:
            raise ApiError(400, f"name {json.dumps(raw)} is invalid")
        with self.store.lock:
            found = self.store.find(name)
            if found is None:
                raise ApiError(404, f"model '{raw}' not found")
            m = self.store.read_manifest(found[1])
            found[1].unlink()
            if not self.standin.noprune:
                layers = {self.store.canonical(x["digest"]) for x in m.get("layers", [])}
                layers.add(self.store.canonical(m.get("config", {}).get("digest", "")))
                self.store.prune(layers)
        self.h._send(200)

    # create --------------------------------------------------------------------------------------------------

    def create(self) -> None:
        req = self.h._json_body()
        files = req.get("files") or {}
        if not isinstance(files, dict):
            raise ApiError(400, "json: cannot unmarshal files into Go struct field of type map[string]string")
        for fname, digest in files.items():
            if fname in ("", ".") or fname.startswith("/") or ".." in fname.split("/") or re.search(r"[\\:]", fname):
                raise ApiError(400, f"file path must be relative: {fname}")
            if not isinstance(digest, str) or not DIGEST_RE.match(digest):
                raise ApiError(400, f"invalid digest for {fname}: invalid digest format")
        if req.get("adapters"):
            raise ApiError(400, ERR_ADAPTERS)
        name = Name.parse(req.get("model") or req.get("name"))
        if name is None:
            raise ApiError(400, "invalid model name")
        for fname in sorted(files):
            if not self.store.has_blob(files[fname]):
                raise ApiError(400, f"blob not found for {fname} (digest {files[fname]}): file does not exist")
        if req.get("quantize") or req.get("quantization"):
            raise ApiError(400, ERR_QUANTIZE)

        stream = req.get("stream") is not False
        lines: list[dict[str, Any]] = []
        if stream:
            self.h._stream_start()

        def send(obj: dict[str, Any]) -> None:
            lines.append(obj)
            if stream:
                self.h._stream_line(obj)

        try:
            with self.store.lock:
                self._create_steps(req, name, files, send)
        except Exception as e:  # a server-side failure after the first line is an error line, like Ollama
            send({"error": f"{type(e).__name__}: {e}"})
        if stream:
            self.h._stream_end()
            return
        last = lines[-1] if lines else {"error": "no response"}
        if "error" in last:
            self.h._send_json(int(last.get("status") or 500), {"error": last["error"]})
        else:
            self.h._send_json(200, last)

    def _create_steps(self, req: dict[str, Any], name: Name, files: dict[str, str], send: Any) -> None:
        store, faults = self.store, self.standin.faults
        layers: list[dict[str, Any]] = []
        config: dict[str, Any] = {}
        if req.get("from"):
            base = Name.parse(req["from"])
            found = store.find(base) if base else None
            if found is None:
                send({"status": "pulling manifest"})
                send({"error": f"pull model manifest: Get \"https://{DEFAULT_HOST}/v2/{DEFAULT_NAMESPACE}/"
                               f"{req['from']}/manifests/latest\": dial tcp: lookup {DEFAULT_HOST}: no such host"})
                return
            bm = store.read_manifest(found[1])
            layers = [x for x in bm.get("layers", []) if x.get("mediaType") == MT_MODEL]
            config = self._config(bm)
            for x in layers:
                send({"status": f"using existing layer {x['digest']}"})
        elif files:
            for fname in sorted(files):
                digest = store.canonical(files[fname])
                send({"status": "parsing GGUF"})
                if faults.error_mid_stream:
                    send({"error": "standin: injected error after the first line"})
                    return
                path = store.blob_path(digest)
                with path.open("rb") as f:
                    head = f.read(512)
                if head[:4] not in (b"GGUF", b"FUGG"):
                    send({"error": err_not_gguf(head), "status": 400})
                    return
                meta = read_gguf(path)
                kv = meta.get("kv", {})
                if kv.get("general.type") == "adapter":
                    send({"error": f"{ERR_ADAPTERS}: {fname} is a LoRA adapter", "status": 400})
                    return
                arch = str(kv.get("general.architecture", ""))
                ft = kv.get("general.file_type")
                config = {
                    "model_format": "gguf",
                    "model_family": arch,
                    "model_families": [arch] if arch else [],
                    "model_type": human_number(int(meta.get("parameter_count", 0))),
                    "file_type": _FILE_TYPES.get(ft, "unknown") if isinstance(ft, int) else "unknown",
                }
                size = path.stat().st_size
                layers.append({"mediaType": MT_MODEL, "digest": digest, "size": size})
                send({"status": f"using existing layer {digest}"})
        else:
            send({"error": "neither 'from' or 'files' was specified", "status": 400})
            return

        bad = go_template_error(req["template"]) if isinstance(req.get("template"), str) else None
        if bad is not None:  # Ollama's setTemplate: template.Parse fails -> errBadTemplate, a 400
            send({"error": f"{ERR_BAD_TEMPLATE}: {bad}", "status": 400})
            return
        for media, value in ((MT_TEMPLATE, req.get("template")), (MT_SYSTEM, req.get("system"))):
            if isinstance(value, str) and value:
                d, size, new = store.put_bytes(value.encode())
                layers.append({"mediaType": media, "digest": d, "size": size})
                send({"status": f"{'creating new' if new else 'using existing'} layer {d}"})
        if req.get("parameters"):
            params = req["parameters"]
            if not isinstance(params, dict):
                send({"error": "parameters must be an object", "status": 400})
                return
            d, size, new = store.put_bytes(json.dumps(params, sort_keys=True).encode())
            layers.append({"mediaType": MT_PARAMS, "digest": d, "size": size})
            send({"status": f"{'creating new' if new else 'using existing'} layer {d}"})

        config.update({"architecture": "amd64", "os": "linux",
                       "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layers]}})
        cdigest, csize, _ = store.put_bytes(json.dumps(config, sort_keys=True).encode())
        manifest = {"schemaVersion": 2, "mediaType": MT_MANIFEST,
                    "config": {"mediaType": MT_CONFIG, "digest": cdigest, "size": csize}, "layers": layers}
        old = store.find(name)
        old_layers: set[str] = set()
        if old is not None:
            om = store.read_manifest(old[1])
            old_layers = {store.canonical(x["digest"]) for x in om.get("layers", [])}
            old_layers.add(store.canonical(om.get("config", {}).get("digest", "")))
        send({"status": "writing manifest"})
        store.write_manifest(name, json.dumps(manifest).encode())
        if old_layers and not self.standin.noprune:
            store.prune(old_layers)
        if faults.no_success:
            return  # the server "died" after writing: the model exists but the client never heard success
        send({"status": "success"})

    # chat ----------------------------------------------------------------------------------------------------

    def _model_request(self) -> tuple[dict[str, Any], str, Path, dict[str, Any]]:
        """A request naming a model: (body, name as given, manifest path, manifest); 400 without one, 404 unknown."""
        req = self.h._json_body()
        raw = req.get("model")
        if not raw:
            raise ApiError(400, "model is required")
        _, path = self._lookup(raw)
        return req, raw, path, self.store.read_manifest(path)

    def chat(self) -> None:
        req, raw, path, m = self._model_request()
        layers = {x.get("mediaType"): x for x in m.get("layers", [])}
        params = json.loads(self._layer_text(layers[MT_PARAMS])) if MT_PARAMS in layers else {}
        system = self._layer_text(layers[MT_SYSTEM]) if MT_SYSTEM in layers else ""
        messages = req.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(x, dict) for x in messages):
            raise ApiError(400, "messages must be a list of objects")
        if system and not any(x.get("role") == "system" for x in messages):
            messages = [{"role": "system", "content": system}, *messages]
        options = {**params, **(req.get("options") or {})}
        num_predict = int(options.get("num_predict", -1))
        model_layer = layers.get(MT_MODEL)
        if model_layer is None:
            raise ApiError(500, "model has no weights")
        started = time.monotonic_ns()
        content, reason, count, how = self.standin.generate(
            self.store.blob_path(model_layer["digest"]), model_layer["digest"], messages, options, num_predict)
        elapsed = time.monotonic_ns() - started
        self._keep(raw, path, m, req.get("keep_alive"))
        final: dict[str, Any] = {
            "model": raw,
            "created_at": datetime.now().astimezone().isoformat(),
            "message": {"role": "assistant", "content": content},
            "done": True,
            "done_reason": reason,
            "total_duration": elapsed,
            "load_duration": 0,
            "prompt_eval_count": sum(len(str(x.get("content", "")).split()) for x in messages),
            "prompt_eval_duration": 0,
            "eval_count": count,
            "eval_duration": elapsed,
        }
        if how:
            final["standin"] = how
        if req.get("stream") is False:
            self.h._send_json(200, final)
            return
        self.h._stream_start()
        for word in content.split(" "):
            self.h._stream_line({"model": raw, "created_at": final["created_at"],
                                 "message": {"role": "assistant", "content": word + " "}, "done": False})
        self.h._stream_line({**final, "message": {"role": "assistant", "content": ""}})
        self.h._stream_end()

    def generate(self) -> None:
        """``POST /api/generate``: no prompt = load (or unload with ``keep_alive: 0``); a prompt = a one-turn chat."""
        req, raw, path, m = self._model_request()
        now = datetime.now().astimezone().isoformat()
        prompt = req.get("prompt") or ""
        if not prompt:
            self._keep(raw, path, m, req.get("keep_alive"))
            unload = keep_alive_seconds(req.get("keep_alive")) == 0
            self.h._send_json(200, {"model": raw, "created_at": now, "response": "", "done": True,
                                    "done_reason": "unload" if unload else "load"})
            return
        layers = {x.get("mediaType"): x for x in m.get("layers", [])}
        model_layer = layers.get(MT_MODEL)
        if model_layer is None:
            raise ApiError(500, "model has no weights")
        options = {**(json.loads(self._layer_text(layers[MT_PARAMS])) if MT_PARAMS in layers else {}),
                   **(req.get("options") or {})}
        content, reason, count, _ = self.standin.generate(
            self.store.blob_path(model_layer["digest"]), model_layer["digest"],
            [{"role": "user", "content": str(prompt)}], options, int(options.get("num_predict", -1)))
        self._keep(raw, path, m, req.get("keep_alive"))
        self.h._send_json(200, {"model": raw, "created_at": now, "response": content, "done": True,
                                "done_reason": reason, "eval_count": count})

    # helpers -------------------------------------------------------------------------------------------------

    def _keep(self, raw: str, path: Path, manifest: dict[str, Any], keep_alive: Any) -> None:
        name = Name.parse(raw)
        size = sum(int(x.get("size", 0)) for x in manifest.get("layers", []))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self.standin.keep_loaded(name.display() if name else raw, digest, size,
                                 _details(self._config(manifest)), keep_alive)

    def _lookup(self, raw: str) -> tuple[Name, Path]:
        name = Name.parse(raw)
        found = self.store.find(name) if name else None
        if found is None:
            raise ApiError(404, f"model '{raw}' not found")
        return found

    def _config(self, manifest: dict[str, Any]) -> dict[str, Any]:
        d = manifest.get("config", {}).get("digest")
        if not d:
            return {}
        try:
            obj: dict[str, Any] = json.loads(self.store.blob_path(d).read_bytes())
        except (OSError, ValueError):
            return {}
        return obj

    def _layer_text(self, layer: dict[str, Any] | None) -> str:
        if layer is None:
            return ""
        return self.store.blob_path(layer["digest"]).read_text(encoding="utf-8")


def _details(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"parent_model": "", "format": cfg.get("model_format", ""), "family": cfg.get("model_family", ""),
            "families": cfg.get("model_families") or None, "parameter_size": cfg.get("model_type", ""),
            "quantization_level": cfg.get("file_type", "")}


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime).astimezone().isoformat()


def _go_value(v: Any) -> str:
    """Go's %#v for the JSON values a params layer holds."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, float) and v == int(v):
        return str(int(v))
    return str(v)


def _parameters_text(params: dict[str, Any]) -> str:
    """``/api/show``'s parameters: ``<name padded to 30> <value>``, one line per list element."""
    lines: list[str] = []
    for k in sorted(params):
        values = params[k] if isinstance(params[k], list) else [params[k]]
        lines.extend(f"{k:<30} {_go_value(v)}" for v in values)
    return "\n".join(lines)


def _modelfile(name: Name, blob: Path | None, template: str, system: str, params: dict[str, Any]) -> str:
    out = ['# Modelfile generated by "ollama show"', "# To build a new Modelfile based on this, replace FROM with:",
           f"# FROM {name.display()}", "", f"FROM {blob}", f'TEMPLATE """{template}"""']
    if system:
        out.append(f'SYSTEM """{system}"""')
    for k in sorted(params):
        values = params[k] if isinstance(params[k], list) else [params[k]]
        out.extend(f"PARAMETER {k} {v if not isinstance(v, bool) else str(v).lower()}" for v in values)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------- server


class StandinServer:
    """The stand-in in this process: API listener + admin listener, each served by a thread."""

    def __init__(
        self,
        data_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_port: int = 0,
        version: str = VERSION,
        noprune: bool = False,
        use_llama: bool | None = None,
        verbose: bool = False,
        **faults: Any,
    ) -> None:
        """Like a default Ollama, blobs no manifest references are pruned when a model is deleted or overwritten and at
        start (an uploaded blob not yet used by a create does not survive a restart); ``noprune=True`` is Ollama's
        OLLAMA_NOPRUNE. ``use_llama``: None = real generation when xllamacpp is importable and the GGUF is a runnable
        model (see :meth:`generate`), True = always the engine (a GGUF it cannot load fails as Ollama's runner
        does), False = canned always.
        Other keywords are initial :class:`Faults`."""
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.admin_port = admin_port
        self.version = version
        self.noprune = noprune
        self.verbose = verbose
        self.faults = Faults().updated(faults)
        self.halt = threading.Event()
        self.store = Store(self.data_dir)
        self._use_llama = use_llama
        self._llamas: dict[str, Any] = {}
        self._llama_lock = threading.Lock()
        self.loaded: dict[str, dict[str, Any]] = {}  # name -> /api/ps entry + "until" (monotonic; None = forever)
        self._state_lock = threading.RLock()
        self._api: _HTTPServer | None = None
        self._admin: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # lifecycle -----------------------------------------------------------------------------------------------

    def start(self) -> StandinServer:
        with self._state_lock:
            self.halt.clear()
            self.store = Store(self.data_dir)
            if not self.noprune:
                self.store.prune()
            if self._admin is None:
                self._admin = self._serve(self.admin_port, admin_only=True)
                self.admin_port = self._admin.server_address[1]
            if not self.faults.down:
                self._open_api()
        return self

    def stop(self) -> None:
        with self._state_lock:
            self.halt.set()
            self._close_api()
            if self._admin is not None:
                self._shutdown(self._admin)
                self._admin = None
            for t in self._threads:
                t.join(timeout=10)
            self._threads = [t for t in self._threads if t.is_alive()]
            self._llamas.clear()

    def restart(self) -> StandinServer:
        """Stop and start again on the same ports over the same data dir (faults kept)."""
        self.stop()
        return self.start()

    def __enter__(self) -> StandinServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    # faults --------------------------------------------------------------------------------------------------

    def set_faults(self, **values: Any) -> Faults:
        """Switch faults on/off (unnamed ones keep their value). ``down=True`` closes the API listener now."""
        new = self.faults.updated(values)
        self.apply_faults(new)
        return new

    def reset_faults(self) -> Faults:
        self.apply_faults(Faults())
        return self.faults

    def apply_faults(self, new: Faults, spare: socket.socket | None = None) -> None:
        """Make ``new`` the faults now; ``spare`` is a connection not to cut (the admin request being answered)."""
        with self._state_lock:
            was_down = self.faults.down
            self.faults = new
            if new.down and not was_down:
                self.halt.set()  # wake slow handlers so they drop their connections
                self._close_api(spare)
            elif not new.down and was_down:
                self.halt.clear()
                if self._admin is not None:  # started: bring the listener back on the same port
                    self._open_api()

    # loaded models -------------------------------------------------------------------------------------------

    def keep_loaded(self, name: str, digest: str, size: int, details: dict[str, Any], keep_alive: Any) -> None:
        """After a request ran ``name``: keep it loaded for ``keep_alive`` (0: unload now, like Ollama)."""
        seconds = keep_alive_seconds(keep_alive)
        with self._state_lock:
            if seconds == 0:
                self.unload(name)
                return
            until = None if seconds < 0 else time.monotonic() + seconds
            expires = (datetime.now().astimezone() + timedelta(seconds=seconds if seconds > 0 else 10 * 365 * 86400))
            self.loaded[name] = {"name": name, "model": name, "size": size, "digest": digest, "details": details,
                                 "expires_at": expires.isoformat(), "size_vram": size, "context_length": 2048,
                                 "until": until}

    def unload(self, name: str) -> None:
        with self._state_lock:
            entry = self.loaded.pop(name, None)
            if entry is not None and not any(e["digest"] == entry["digest"] for e in self.loaded.values()):
                with self._llama_lock:
                    self._llamas.pop(entry["digest"], None)

    def running(self) -> list[dict[str, Any]]:
        """What /api/ps lists: the loaded models whose keep-alive has not run out."""
        now = time.monotonic()
        with self._state_lock:
            for name in [n for n, e in self.loaded.items() if e["until"] is not None and e["until"] <= now]:
                self.unload(name)
            return [{k: v for k, v in e.items() if k != "until"} for e in self.loaded.values()]

    # generation ----------------------------------------------------------------------------------------------

    @property
    def llama_available(self) -> bool:
        """Whether /api/chat can run GGUFs in llama.cpp's engine (``xllamacpp`` importable, not switched off)."""
        if self._use_llama is False:
            return False
        try:
            import xllamacpp  # noqa: F401
        except ImportError:
            return False
        return True

    def generate(self, path: Path, digest: str, messages: list[dict[str, Any]], options: dict[str, Any],
                 num_predict: int) -> tuple[str, str, int, str | None]:
        """(content, done_reason, eval_count, standin note). Real generation in xllamacpp, else the canned reply.

        A GGUF without transformer blocks (what the tests' fake exporter writes: valid metadata and a couple of
        tensors, no model) cannot run in any engine; a real Ollama would refuse to load it. It gets the canned reply
        too, so the many tests that exercise registration with such files keep their scope; every real GGUF runs."""
        why = None
        if not self.llama_available:
            why = "no xllamacpp: canned reply" if self._use_llama is not False else "engine off: canned reply"
        elif self._use_llama is None and read_gguf(path).get("runnable") is False:
            why = "not a runnable model (no transformer blocks): canned reply"
        if why is not None:
            words = CANNED_REPLY.split(" ")
            if 0 < num_predict < len(words):
                return " ".join(words[:num_predict]), "length", num_predict, why
            return CANNED_REPLY, "stop", len(words), why
        stops = options.get("stop")
        request: dict[str, Any] = {
            "messages": messages,
            "temperature": float(options.get("temperature", 0.8)),  # Ollama's default
            "stop": [stops] if isinstance(stops, str) else list(stops or []),
            "seed": int(options.get("seed", 0)),
        }
        for key, name in (("top_k", "top_k"), ("top_p", "top_p"), ("min_p", "min_p"), ("repeat_penalty",
                                                                                       "repeat_penalty")):
            if key in options:
                request[name] = options[key]
        if num_predict > 0:
            request["max_tokens"] = num_predict
        with self._llama_lock:  # one generation at a time, like one runner slot
            try:
                server = self._llamas.get(digest)
                if server is None:
                    server = self._load(path, int(options.get("num_ctx", 2048)))
                    self._llamas[digest] = server
                out = server.handle_chat_completions(request)
            except ApiError:
                raise
            except Exception as e:
                raise ApiError(500, f"llama runner process has terminated: {type(e).__name__}: {e}") from None
        if not isinstance(out, dict) or not out.get("choices"):
            raise ApiError(500, f"llama runner process has terminated: {out!r:.300}")
        choice = out["choices"][0]
        content = (choice.get("message") or {}).get("content") or ""
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        return content, reason, int((out.get("usage") or {}).get("completion_tokens", 0)), None

    @staticmethod
    def _load(path: Path, n_ctx: int) -> Any:
        """An xllamacpp server on ``path``. llama.cpp reports a load failure as a generic RuntimeError (its reason is
        on stderr), which Ollama's runner answers as a 500."""
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.cpuparams.n_threads = ENGINE_THREADS
        try:
            return xllamacpp.Server(params)
        except Exception as e:
            raise ApiError(500, f"llama runner process has terminated: error loading model {path.name}: "
                                f"{e}") from None

    # listeners -----------------------------------------------------------------------------------------------

    def _serve(self, port: int, admin_only: bool) -> _HTTPServer:
        srv = _HTTPServer((self.host, port), self, admin_only)
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                             name=f"standin-{'admin' if admin_only else 'api'}", daemon=True)
        t.start()
        self._threads.append(t)
        return srv

    def _open_api(self) -> None:
        if self._api is None:
            self._api = self._serve(self.port, admin_only=False)
            self.port = self._api.server_address[1]

    def _close_api(self, spare: socket.socket | None = None) -> None:
        if self._api is not None:
            self._shutdown(self._api, spare)
            self._api = None

    @staticmethod
    def _shutdown(srv: _HTTPServer, spare: socket.socket | None = None) -> None:
        srv.shutdown()
        srv.server_close()
        srv.close_connections(spare)


# --------------------------------------------------------------------------------------------------- subprocess


class StandinProcess:
    """The stand-in as a separate process (``python tests/ollama_standin.py``), for black-box and memory tests."""

    def __init__(self, data_dir: Path | str, *, port: int = 0, python: str = sys.executable,
                 args: tuple[str, ...] = (), startup_timeout_s: float = 30.0) -> None:
        self.data_dir = Path(data_dir)
        self.port = port
        self.python = python
        self.args = args
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin_url = ""
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.standin.log"

    def start(self) -> StandinProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, str(Path(__file__).resolve()), "--port", str(self.port), "--data", str(self.data_dir),
               *self.args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL)
        ready = self._read_ready_line()
        self.url, self.admin_url = ready["url"], ready["admin_url"]
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def _read_ready_line(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + self.startup_timeout_s
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"stand-in did not start; see {self.log_path}: {self.log_path.read_text()[-500:]}")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                piece = os.read(fd, 4096)
                if not piece:
                    continue
                buf += piece
        obj: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
        return obj

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def set_faults(self, **values: Any) -> dict[str, Any]:
        req = urllib.request.Request(self.admin_url + "/_standin/faults", data=json.dumps(values).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            obj: dict[str, Any] = json.loads(resp.read())
        return obj

    def status(self) -> dict[str, int]:
        """VmRSS / VmHWM (peak) of the process, in KiB, from /proc."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
        return out

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, timed wait, SIGKILL. Returns the exit code."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def restart(self) -> StandinProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> StandinProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if pytest is not None:

    @pytest.fixture
    def ollama_standin(tmp_path: Path) -> Iterator[StandinServer]:
        """A stand-in Ollama on a free loopback port, in a thread, state under tmp_path; stopped after the test."""
        srv = StandinServer(tmp_path / "ollama-standin").start()
        try:
            yield srv
        finally:
            srv.stop()


# --------------------------------------------------------------------------------------------------- script


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ollama HTTP API stand-in for tests and benchmarks")
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--admin-port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--data", required=True, help="state directory (blobs, manifests)")
    p.add_argument("--faults", default="{}", help='initial faults as JSON, e.g. {"slow_s": 2}')
    p.add_argument("--noprune", action="store_true", help="keep unreferenced blobs (Ollama's OLLAMA_NOPRUNE)")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    try:
        srv = StandinServer(a.data, host=a.host, port=a.port, admin_port=a.admin_port, noprune=a.noprune,
                            verbose=a.verbose, **json.loads(a.faults)).start()
    except (OSError, ValueError) as e:
        print(f"ollama-standin: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"url": srv.url, "admin_url": srv.admin_url, "pid": os.getpid()}), flush=True)
    while not stop.wait(3600):
        pass
    srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
