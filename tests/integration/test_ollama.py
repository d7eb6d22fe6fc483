"""daemon.publish.ollama and ollama_client: the pure request builders and judges, then the client against the
stand-in Ollama for every call and every error path (HTTP error before the first line, error line mid-stream,
missing success, 404s, digest mismatch, down, 500, slow), and a 50 MB blob upload with the stand-in as a subprocess
proving memory stays flat."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import need_module
from ollama_standin import CANNED_REPLY, StandinProcess, StandinServer, make_tiny_gguf
from structlog.testing import capture_logs

from daemon.publish import ollama, ollama_client
from daemon.publish.ollama import DigestMismatch, NotFound, OllamaError, OllamaUnavailable
from daemon.publish.ollama_client import OllamaClient
from daemon.train import templates

QWEN = templates.get("qwen-2.5")
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[StandinServer]:
    s = StandinServer(tmp_path / "ollama").start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(srv: StandinServer) -> Iterator[OllamaClient]:
    with OllamaClient(srv.url, timeout_s=5, long_timeout_s=5) as c:
        yield c


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    return make_tiny_gguf(tmp_path / "model.gguf", architecture="qwen2", chat_template=QWEN.jinja)


def register(client: OllamaClient, gguf: Path, name: str = "chatos:v1") -> str:
    digest = client.ensure_blob(gguf)
    client.create(name, {"model.gguf": digest}, template=QWEN.ollama_template, system="be brief",
                  parameters={"stop": list(QWEN.stop), "temperature": 0.7})
    return digest


# --------------------------------------------------------------------------------------------------- pure core


def test_check_digest_and_names() -> None:
    assert ollama.check_digest(DIGEST) == DIGEST
    for bad in ("sha256:" + "AB" * 32, "sha256-" + "ab" * 32, "sha256:abc", "md5:" + "ab" * 32, "", None):
        with pytest.raises(ValueError, match=r"digest"):
            ollama.check_digest(bad)  # type: ignore[arg-type]
    for good in ("chatos-retrained:v1", "chatos-retrained", "user/model:latest", "m_1.2:v10"):
        assert ollama.valid_model_name(good), good
    for bad in ("", "bad name", "-x", "x:", "a/b/c/d", "x:-y", "ü"):
        assert not ollama.valid_model_name(bad), bad


def test_file_sha256_streams(tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc" * 1000)
    import hashlib

    assert ollama_client.file_sha256(p) == "sha256:" + hashlib.sha256(b"abc" * 1000).hexdigest()


def test_create_body_is_a_plain_value() -> None:
    body = ollama.create_body("chatos:v3", {"model.gguf": DIGEST}, template="T", system="S",
                              parameters={"stop": ("<a>", "<b>"), "num_ctx": 4096})
    assert body == {"model": "chatos:v3", "files": {"model.gguf": DIGEST}, "stream": True, "template": "T",
                    "system": "S", "parameters": {"stop": ["<a>", "<b>"], "num_ctx": 4096}}
    assert json.loads(json.dumps(body)) == body
    assert "adapters" not in body and "quantize" not in body and "from" not in body
    assert ollama.create_body("m", {"model.gguf": DIGEST}) == {"model": "m", "files": {"model.gguf": DIGEST},
                                                                "stream": True}
    for files in ({}, {"/abs.gguf": DIGEST}, {"../x.gguf": DIGEST}, {"model.gguf": "sha256:short"}):
        with pytest.raises(ValueError):
            ollama.create_body("m", files)
    with pytest.raises(ValueError, match=r"model name"):
        ollama.create_body("bad name", {"model.gguf": DIGEST})


def test_chat_body_is_bounded() -> None:
    body = ollama.chat_body("m", [{"role": "user", "content": "hi"}], num_predict=32)
    assert body == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False,
                    "options": {"num_predict": 32, "temperature": 0.0}}
    with pytest.raises(ValueError, match=r"num_predict"):
        ollama.chat_body("m", [], num_predict=0)


def test_parse_create_lines() -> None:
    seen: list[str] = []
    ok = ['{"status":"parsing GGUF"}', "", '{"status":"verifying conversion"}', '{"status":"writing manifest"}',
          '{"status":"success"}']
    assert ollama.parse_create_lines(ok, on_status=seen.append)[-1] == "success"
    assert seen == ["parsing GGUF", "verifying conversion", "writing manifest", "success"]

    with pytest.raises(OllamaError, match=r"after 'parsing GGUF'.*not in GGUF format") as e:
        ollama.parse_create_lines(['{"status":"parsing GGUF"}', '{"error":"not in GGUF format","status":400}'])
    assert e.value.status == 400 and not e.value.retryable
    with pytest.raises(OllamaError, match=r"status 500.*disk") as e:
        ollama.parse_create_lines(['{"status":"parsing GGUF"}', '{"error":"disk\\nfull"}', '{"status":"success"}'])
    assert e.value.server_error == "disk full" and e.value.retryable  # one line, and a 5xx can be retried
    with pytest.raises(OllamaError, match=r"without success.*'writing manifest'"):
        ollama.parse_create_lines(['{"status":"parsing GGUF"}', '{"status":"writing manifest"}'])
    with pytest.raises(OllamaError, match=r"without success.*nothing"):
        ollama.parse_create_lines([])
    with pytest.raises(OllamaError, match=r"unreadable"):
        ollama.parse_create_lines(["<html>"])


def test_parse_parameters_reads_ollama_show_text() -> None:
    text = ('num_ctx                        4096\nstop                           "<|im_end|>"\n'
            'stop                           "\\"quoted\\""\ntemperature                    0.7\n'
            "stop                           <unquoted>")
    assert ollama.parse_parameters(text) == {"num_ctx": ["4096"], "stop": ["<|im_end|>", '"quoted"', "<unquoted>"],
                                             "temperature": ["0.7"]}
    assert ollama.parse_parameters("") == {}


def good_show() -> dict[str, Any]:
    return {
        "details": {"format": "gguf"},
        "model_info": {"general.architecture": "qwen2"},
        "template": QWEN.ollama_template,
        "parameters": "\n".join(f"{'stop':<30} {json.dumps(s)}" for s in QWEN.stop),
    }


def test_verify_show_both_ways() -> None:
    kw: dict[str, Any] = {"architecture": "qwen2", "template": QWEN.ollama_template, "stops": QWEN.stop}
    assert ollama.verify_show(good_show(), **kw) == []
    assert ollama.verify_show(good_show(), **{**kw, "architecture": ("llama", "qwen2")}) == []
    assert ollama.verify_show(good_show(), **{**kw, "architecture": None}) == []

    bad = good_show()
    bad["details"]["format"] = "safetensors"
    assert ollama.verify_show(bad, **kw) == ["format is 'safetensors', expected 'gguf'"]
    bad = good_show()
    bad["model_info"]["general.architecture"] = "llama"
    assert ollama.verify_show(bad, **kw) == ["architecture is 'llama', expected 'qwen2'"]
    bad = good_show()
    bad["template"] = QWEN.ollama_template + " "
    (problem,) = ollama.verify_show(bad, **kw)
    assert problem.startswith("template differs") and f"character {len(QWEN.ollama_template)}" in problem
    bad = good_show()
    bad["parameters"] = f"{'stop':<30} \"<|im_end|>\""
    assert ollama.verify_show(bad, **kw) == ["stop parameters missing: '<|endoftext|>'"]
    assert len(ollama.verify_show({}, **kw)) == 4


def test_smoke_problems_both_ways() -> None:
    good = {"message": {"role": "assistant", "content": "Hi."}, "done": True, "done_reason": "stop"}
    assert ollama.smoke_problems(good, require_stop=True) == []
    cut = {**good, "done_reason": "length"}
    assert ollama.smoke_problems(cut, require_stop=False) == []
    (problem,) = ollama.smoke_problems(cut, require_stop=True)
    assert "done_reason 'length'" in problem
    assert ollama.smoke_problems({**good, "message": {"content": "  "}}, require_stop=False) == ["empty answer"]
    assert ollama.smoke_problems({}, require_stop=False) == ["empty answer"]


def test_http_error_mapping() -> None:
    e = ollama.http_error("POST /api/show", 404, b'{"error":"model \'x\' not found"}')
    assert type(e) is NotFound and str(e) == "Ollama POST /api/show: HTTP 404: model 'x' not found"
    e = ollama.http_error("POST /api/blobs/x", 400, b'{"error":"digest mismatch, expected \\"a\\", got \\"b\\""}')
    assert type(e) is DigestMismatch and not e.retryable
    e = ollama.http_error("GET /api/tags", 502, b"<html>\n<body>Bad gateway</body>\n</html>")
    assert type(e) is OllamaError and e.retryable and "\n" not in str(e) and "Bad gateway" in str(e)
    assert OllamaUnavailable("x").retryable


# ------------------------------------------------------------------------------------------ against the stand-in


def test_every_call_against_the_standin(client: OllamaClient, gguf: Path, srv: StandinServer) -> None:
    assert client.version() == "0.33.0"
    digest = ollama_client.file_sha256(gguf)
    assert client.blob_exists(digest) is False
    sent: list[tuple[int, int]] = []
    assert client.push_blob(gguf, digest, progress=lambda n, total: sent.append((n, total))) is True
    assert sent[-1] == (gguf.stat().st_size, gguf.stat().st_size)
    assert client.blob_exists(digest) is True
    assert client.push_blob(gguf, digest) is False  # present: nothing sent again
    assert client.ensure_blob(gguf) == digest

    statuses: list[str] = []
    out = client.create("chatos:v1", {"model.gguf": digest}, template=QWEN.ollama_template, system="be brief",
                        parameters={"stop": list(QWEN.stop), "temperature": 0.7}, on_status=statuses.append)
    assert out == statuses and out[0] == "parsing GGUF" and out[-1] == "success"

    show = client.show("chatos:v1")
    assert ollama.verify_show(show, architecture=QWEN.gguf_architectures, template=QWEN.ollama_template,
                              stops=QWEN.stop) == []
    assert show["system"] == "be brief"
    assert ollama.verify_show(show, architecture="llama", template="{{ .Prompt }}", stops=["</s>"]) != []

    client.copy("chatos:v1", "chatos:latest")
    tags = {m["name"]: m for m in client.tags()}
    assert set(tags) == {"chatos:v1", "chatos:latest"}
    assert tags["chatos:v1"]["digest"] == tags["chatos:latest"]["digest"]

    answer = client.chat("chatos:latest", [{"role": "user", "content": "Say hi."}], num_predict=64)
    assert answer["message"]["content"] == CANNED_REPLY
    assert ollama.smoke_problems(answer, require_stop=True) == []
    short = client.chat("chatos:latest", [{"role": "user", "content": "Say hi."}], num_predict=2)
    assert ollama.smoke_problems(short, require_stop=True) != []

    client.delete("chatos:v1")
    assert [m["name"] for m in client.tags()] == ["chatos:latest"]


def test_not_found_on_every_model_call(client: OllamaClient) -> None:
    for call in (lambda: client.show("ghost:v1"), lambda: client.copy("ghost:v1", "ghost:latest"),
                 lambda: client.delete("ghost:v1"), lambda: client.chat("ghost", [], num_predict=8)):
        with pytest.raises(NotFound, match=r"HTTP 404") as e:
            call()
        assert e.value.status == 404 and not e.value.retryable and "ghost" in str(e.value)


def test_create_http_error_before_the_first_line(client: OllamaClient) -> None:
    missing = "sha256:" + "0" * 64  # well formed, never uploaded: Ollama rejects it before streaming
    with pytest.raises(OllamaError, match=r"^Ollama POST /api/create: HTTP 400: blob not found") as e:
        client.create("chatos:v1", {"model.gguf": missing})
    assert e.value.status == 400 and not e.value.retryable


def test_create_error_line_inside_a_200(client: OllamaClient, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file")
    digest = client.ensure_blob(junk)
    want = r"HTTP 200 stream: error line after 'parsing GGUF' \(status 400\): unsupported content type: text/plain"
    with pytest.raises(OllamaError, match=want) as e:
        client.create("chatos:v1", {"model.gguf": digest})
    assert e.value.status == 400
    with pytest.raises(NotFound):
        client.show("chatos:v1")


def test_create_error_mid_stream_and_missing_success(client: OllamaClient, srv: StandinServer, gguf: Path) -> None:
    digest = client.ensure_blob(gguf)
    srv.set_faults(error_mid_stream=True)
    with pytest.raises(OllamaError, match=r"error line after 'parsing GGUF'.*injected") as e:
        client.create("chatos:v1", {"model.gguf": digest})
    assert e.value.retryable
    srv.set_faults(error_mid_stream=False, no_success=True)
    with pytest.raises(OllamaError, match=r"ended without success.*'writing manifest'"):
        client.create("chatos:v1", {"model.gguf": digest})


def test_digest_mismatch_is_a_hard_error(client: OllamaClient, srv: StandinServer, gguf: Path) -> None:
    wrong = "sha256:" + "1" * 64  # the file does not hash to this
    with pytest.raises(DigestMismatch, match=r'HTTP 400: digest mismatch, expected "sha256:1{64}", got') as e:
        client.push_blob(gguf, wrong)
    assert not e.value.retryable
    srv.set_faults(digest_mismatch=True)
    with pytest.raises(DigestMismatch):
        client.ensure_blob(gguf)


def test_disk_full_and_500(client: OllamaClient, srv: StandinServer, gguf: Path) -> None:
    srv.set_faults(disk_full=True)
    with pytest.raises(OllamaError, match=r"HTTP 500: write .* no space left on device") as e:
        client.ensure_blob(gguf)
    assert type(e.value) is OllamaError and e.value.retryable
    srv.set_faults(disk_full=False, status_500=True)
    for call in (client.version, client.tags, lambda: client.show("x"),
                 lambda: client.create("x", {"model.gguf": DIGEST})):
        with pytest.raises(OllamaError, match=r"HTTP 500: internal$") as e:
            call()
        assert type(e.value) is OllamaError and e.value.status == 500
    with pytest.raises(OllamaError, match=r"HEAD /api/blobs/sha256:(ab){32}: HTTP 500$"):  # a HEAD has no body
        client.blob_exists(DIGEST)


def test_down_is_unavailable_for_every_call(client: OllamaClient, srv: StandinServer, gguf: Path) -> None:
    digest = client.ensure_blob(gguf)
    srv.set_faults(down=True)
    calls = (client.version, client.tags, lambda: client.blob_exists(digest), lambda: client.push_blob(gguf, digest),
             lambda: client.create("x", {"model.gguf": digest}), lambda: client.show("x"),
             lambda: client.copy("x", "y"), lambda: client.delete("x"), lambda: client.chat("x", [], num_predict=4))
    for call in calls:
        with pytest.raises(OllamaUnavailable, match=f"^Ollama not reachable at {srv.url} .*cannot connect"):
            call()
    srv.set_faults(down=False)
    assert client.version() == "0.33.0"


def test_slow_server_times_out(srv: StandinServer, gguf: Path) -> None:
    srv.set_faults(slow_s=2.0)
    with OllamaClient(srv.url, timeout_s=0.3, long_timeout_s=0.3) as c:
        with pytest.raises(OllamaUnavailable, match=r"GET /api/version: timed out \(ReadTimeout\)"):
            c.version()
        with pytest.raises(OllamaUnavailable, match=r"timed out"):
            c.create("x", {"model.gguf": DIGEST})


def test_client_from_settings(make_settings: Any, srv: StandinServer) -> None:
    s = make_settings(ollama={"host": srv.url, "timeout_s": "7s"})
    with OllamaClient.from_settings(s.ollama) as c:
        assert (c.host, c.timeout_s) == (srv.url, 7.0)
        assert c.version() == "0.33.0"


def test_unknown_host_is_unavailable() -> None:
    with OllamaClient("http://ollama-standin.invalid:11434", timeout_s=2) as c, \
            pytest.raises(OllamaUnavailable, match=r"cannot connect"):
        c.version()
    with pytest.raises(ValueError, match=r"must look like"):
        OllamaClient("ftp://127.0.0.1:11434")


def test_redirects_are_never_followed(tmp_path: Path) -> None:
    hits: list[str] = []

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(307)
            self.send_header("Location", "http://198.51.100.7:11434/api/version")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        refused = r"HTTP 307 redirect to 'http://198\.51\.100\.7:11434/api/version' refused"
        with OllamaClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=2) as c, \
                pytest.raises(OllamaError, match=refused):
            c.version()
        assert hits == ["/api/version"]
    finally:
        server.shutdown()
        server.server_close()


def test_every_request_is_logged(client: OllamaClient) -> None:
    with capture_logs() as logs:
        client.version()
        with pytest.raises(NotFound):
            client.show("ghost")
        with pytest.raises(OllamaError):
            client.create("ghost:v1", {"model.gguf": DIGEST})
    reqs = [(e["method"], e["path"]) for e in logs if e["event"] == "ollama.request"]
    assert reqs == [("GET", "/api/version"), ("POST", "/api/show"), ("POST", "/api/create")]


def test_chat_with_the_engine_really_loads_the_gguf(tmp_path: Path, gguf: Path) -> None:
    """With the engine on (use_llama=True), the stand-in loads the GGUF in xllamacpp: our tiny one has no vocabulary,
    so the load fails the way an Ollama runner does (a 500), instead of answering a canned reply."""
    need_module("xllamacpp", "xllamacpp is not installed (.ci/train-setup.sh installs it)")
    srv = StandinServer(tmp_path / "ollama-engine", use_llama=True).start()
    try:
        with OllamaClient(srv.url, timeout_s=5, long_timeout_s=5) as client:
            register(client, gguf)
            with pytest.raises(OllamaError, match=r"HTTP 500: llama runner process has terminated"):
                client.chat("chatos:v1", [{"role": "user", "content": "hi"}], num_predict=8)
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------------- memory


_CLIENT = r"""
import json, sys
from pathlib import Path
from daemon.publish.ollama_client import OllamaClient

def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

url, path, digest = sys.argv[1:4]
with OllamaClient(url, timeout_s=30) as c:
    c.version()  # warm: imports, sockets, buffers
    before = hwm()
    stored = c.push_blob(path, digest)
    after = hwm()
print(json.dumps({"stored": stored, "hwm_before_kib": before, "hwm_after_kib": after}))
"""


def test_blob_upload_of_50mb_keeps_memory_flat(tmp_path: Path) -> None:
    size_mib = 50
    big = tmp_path / "big.gguf"
    with big.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    digest = ollama_client.file_sha256(big)
    proc = StandinProcess(tmp_path / "ollama").start()
    try:
        server_before = proc.status()["VmHWM"]
        out = subprocess.run([sys.executable, "-c", _CLIENT, proc.url, str(big), digest], capture_output=True,
                             text=True, timeout=120, check=False, cwd=Path(__file__).resolve().parents[2])
        assert out.returncode == 0, out.stderr[-2000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        server_after = proc.status()["VmHWM"]
    finally:
        proc.stop()
    stored = tmp_path / "ollama" / "blobs" / digest.replace(":", "-")
    assert result["stored"] is True and ollama_client.file_sha256(stored) == digest
    limit_kib = size_mib * 1024 // 5  # "flat": growth well under the file size (chunks are 1 MiB)
    client_growth = result["hwm_after_kib"] - result["hwm_before_kib"]
    server_growth = server_after - server_before
    assert client_growth < limit_kib, f"client peak RSS grew {client_growth} KiB for a {size_mib} MiB upload"
    assert server_growth < limit_kib, f"stand-in peak RSS grew {server_growth} KiB for a {size_mib} MiB upload"
    print(f"50 MiB upload: client peak RSS +{client_growth} KiB, stand-in peak RSS +{server_growth} KiB")
