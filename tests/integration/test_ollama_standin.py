"""The Ollama stand-in's own contract, at the HTTP level (raw httpx, not our adapter): digest rules and codes, the
NDJSON create stream and where its errors go, show/tags/copy/delete/chat/version, persistence across a restart,
LoRA adapters and create-time quantize rejected, each fault switch, and the stand-in as a subprocess."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ollama_standin import (
    CANNED_REPLY,
    ERR_ADAPTERS,
    ERR_NOT_GGUF,
    Faults,
    Name,
    StandinProcess,
    StandinServer,
    go_template_error,
    make_tiny_gguf,
)

HEX_RE = r"[0-9a-f]{64}"


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[StandinServer]:
    s = StandinServer(tmp_path / "data").start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def http(srv: StandinServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=10, trust_env=False) as c:
        yield c


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def upload(http: httpx.Client, data: bytes) -> str:
    d = digest_of(data)
    r = http.post(f"/api/blobs/{d}", content=data)
    assert r.status_code in (200, 201), r.text
    return d


@pytest.fixture
def gguf_bytes(tmp_path: Path) -> bytes:
    return make_tiny_gguf(tmp_path / "tiny.gguf", architecture="llama").read_bytes()


def create(http: httpx.Client, body: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    r = http.post("/api/create", json=body)
    lines = [json.loads(x) for x in r.text.splitlines() if x.strip()]
    return r.status_code, lines


def make_model(http: httpx.Client, gguf: bytes, name: str = "chatos:v1", **extra: Any) -> str:
    d = upload(http, gguf)
    code, lines = create(http, {"model": name, "files": {"model.gguf": d}, **extra})
    assert code == 200 and lines[-1] == {"status": "success"}, lines
    return d


# --------------------------------------------------------------------------------------------------- blobs


@pytest.mark.parametrize("bad", ["sha256:abc", "md5:" + "0" * 64, "sha256:" + "g" * 64, "sha256_" + "0" * 64,
                                 "sha256:" + "0" * 65])
def test_bad_digest_format_is_400(http: httpx.Client, bad: str) -> None:
    assert http.head(f"/api/blobs/{bad}").status_code == 400
    r = http.post(f"/api/blobs/{bad}", content=b"x")
    assert r.status_code == 400 and r.json() == {"error": "invalid digest format"}


def test_blob_upload_codes_and_storage(srv: StandinServer, http: httpx.Client) -> None:
    data = b"GGUF" + os.urandom(3000)
    d = digest_of(data)
    assert http.head(f"/api/blobs/{d}").status_code == 404
    assert http.post(f"/api/blobs/{d}", content=data).status_code == 201
    assert http.head(f"/api/blobs/{d}").status_code == 200
    # the dash form and uppercase hex are accepted by the regex too (same blob for the dash form)
    assert http.head(f"/api/blobs/{d.replace(':', '-')}").status_code == 200
    assert http.head(f"/api/blobs/{d.upper().replace('SHA256', 'sha256')}").status_code == 404
    assert http.post(f"/api/blobs/{d}", content=data).status_code == 200
    stored = srv.data_dir / "blobs" / d.replace(":", "-")
    assert stored.read_bytes() == data
    assert [p.name for p in (srv.data_dir / "blobs").iterdir()] == [stored.name]


def test_blob_present_is_answered_without_reading_a_big_upload(http: httpx.Client) -> None:
    data = os.urandom(4096)
    d = upload(http, data)
    r = http.post(f"/api/blobs/{d}", content=os.urandom(2 << 20))  # other bytes: never read, like Ollama
    assert r.status_code == 200


def test_blob_digest_mismatch_is_400_and_leaves_nothing(srv: StandinServer, http: httpx.Client) -> None:
    claimed = digest_of(b"something else")
    data = b"actual bytes"
    r = http.post(f"/api/blobs/{claimed}", content=data)
    assert r.status_code == 400
    assert r.json() == {"error": f'digest mismatch, expected "{claimed}", got "{digest_of(data)}"'}
    assert list((srv.data_dir / "blobs").iterdir()) == []


def test_blob_chunked_upload_is_decoded(http: httpx.Client) -> None:
    parts = [os.urandom(70_000) for _ in range(5)]
    d = digest_of(b"".join(parts))
    r = http.post(f"/api/blobs/{d}", content=iter(parts))  # a generator without length: chunked encoding
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 201
    assert http.head(f"/api/blobs/{d}").status_code == 200


# --------------------------------------------------------------------------------------------------- create


def test_create_streams_the_ollama_status_lines(http: httpx.Client, gguf_bytes: bytes) -> None:
    d = upload(http, gguf_bytes)
    r = http.post("/api/create", json={"model": "chatos:v1", "files": {"model.gguf": d}, "template": "{{ .Prompt }}",
                                       "system": "be brief", "parameters": {"stop": ["<|eot_id|>"]}})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    statuses = [json.loads(x)["status"] for x in r.text.splitlines()]
    assert statuses[0] == "parsing GGUF"
    assert statuses[1] == f"using existing layer {d}"
    assert [s.split(" sha256:")[0] for s in statuses[2:5]] == ["creating new layer"] * 3
    assert statuses[-2:] == ["writing manifest", "success"]
    # the same template/system/params again: layers exist now
    _, lines = create(http, {"model": "chatos:v2", "files": {"model.gguf": d}, "template": "{{ .Prompt }}",
                             "system": "be brief", "parameters": {"stop": ["<|eot_id|>"]}})
    assert [x["status"].split(" sha256:")[0] for x in lines[2:5]] == ["using existing layer"] * 3


def test_create_stream_false_answers_one_object(http: httpx.Client, gguf_bytes: bytes) -> None:
    d = upload(http, gguf_bytes)
    r = http.post("/api/create", json={"model": "m", "files": {"model.gguf": d}, "stream": False})
    assert r.status_code == 200 and r.json() == {"status": "success"}
    bad = upload(http, b"not a gguf at all")
    r = http.post("/api/create", json={"model": "m2", "files": {"model.gguf": bad}, "stream": False})
    assert r.status_code == 400 and r.json() == {"error": "unsupported content type: text/plain; charset=utf-8"}
    bad = upload(http, b"\x00\x01\x02 binary, not a gguf")
    r = http.post("/api/create", json={"model": "m2", "files": {"model.gguf": bad}, "stream": False})
    assert r.status_code == 400 and r.json() == {"error": ERR_NOT_GGUF}
    assert ERR_NOT_GGUF == "unsupported content type: unknown"  # server/create.go detectContentType


@pytest.mark.parametrize(("body", "message"), [
    ({"model": "bad name!"}, "invalid model name"),
    ({"model": "-leading-dash"}, "invalid model name"),
    ({"model": "a/b/c/d"}, "invalid model name"),
    ({"files": {"/etc/model.gguf": "D"}}, "file path must be relative: /etc/model.gguf"),
    ({"files": {"../model.gguf": "D"}}, "file path must be relative: ../model.gguf"),
    ({"files": {"model.gguf": "sha256:nope"}}, "invalid digest for model.gguf: invalid digest format"),
    ({"files": {"model.gguf": "sha256:" + "0" * 64}}, "blob not found for model.gguf"),
    ({"adapters": {"adapter.gguf": "D"}}, ERR_ADAPTERS),
    ({"quantize": "q4_K_M"}, "create-time quantization is only supported for safetensors imports"),
])
def test_create_request_errors_are_http_errors_before_any_line(http: httpx.Client, gguf_bytes: bytes,
                                                              body: dict[str, Any], message: str) -> None:
    d = upload(http, gguf_bytes)
    req: dict[str, Any] = {"model": "chatos:v1", "files": {"model.gguf": d}}
    req.update(body)
    if "files" in body:
        req["files"] = {k: (d if v == "D" else v) for k, v in body["files"].items()}
    if "adapters" in body:
        req["adapters"] = {"adapter.gguf": d}
    r = http.post("/api/create", json=req)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"].startswith(message)


def test_create_errors_after_the_first_line_are_error_lines_in_a_200(http: httpx.Client, tmp_path: Path) -> None:
    not_gguf = upload(http, b"PK\x03\x04 a zip, not a gguf")
    code, lines = create(http, {"model": "x", "files": {"model.gguf": not_gguf}})
    assert code == 200
    assert lines == [{"status": "parsing GGUF"}, {"error": "unsupported content type: application/zip", "status": 400}]

    adapter = upload(http, make_tiny_gguf(tmp_path / "lora.gguf", general_type="adapter").read_bytes())
    code, lines = create(http, {"model": "x", "files": {"model.gguf": adapter}})
    assert code == 200 and lines[-1]["error"] == f"{ERR_ADAPTERS}: model.gguf is a LoRA adapter"

    code, lines = create(http, {"model": "x", "from": "qwen2.5:7b"})  # would need a pull: fails offline
    assert code == 200 and "error" in lines[-1] and "pull model manifest" in lines[-1]["error"]
    assert http.post("/api/show", json={"model": "x"}).status_code == 404  # nothing half-created


def test_create_from_a_local_model_and_recreate_overwrites(http: httpx.Client, gguf_bytes: bytes) -> None:
    d = make_model(http, gguf_bytes, "base:1", template="T1")
    code, lines = create(http, {"model": "derived", "from": "base:1", "template": "T2"})
    assert code == 200 and lines[-1] == {"status": "success"}
    show = http.post("/api/show", json={"model": "derived"}).json()
    assert show["template"] == "T2" and show["model_info"]["general.architecture"] == "llama"
    make_model(http, gguf_bytes, "base:1", template="T3")
    assert http.post("/api/show", json={"model": "base:1"}).json()["template"] == "T3"
    assert http.head(f"/api/blobs/{d}").status_code == 200


# ------------------------------------------------------------------------------------ show, tags, copy, delete


def test_show_reports_what_was_created(http: httpx.Client, gguf_bytes: bytes) -> None:
    make_model(http, gguf_bytes, "chatos:v1", template="{{ .Prompt }}", system="sys",
               parameters={"stop": ["<|eot_id|>", "<|start_header_id|>"], "temperature": 0.7, "num_ctx": 4096})
    r = http.post("/api/show", json={"model": "chatos:v1"})
    assert r.status_code == 200
    show = r.json()
    assert show["template"] == "{{ .Prompt }}" and show["system"] == "sys"
    assert show["details"]["format"] == "gguf" and show["details"]["family"] == "llama"
    assert show["details"]["quantization_level"] == "F16"
    assert show["model_info"]["general.architecture"] == "llama"
    assert show["model_info"]["general.parameter_count"] == 16 * 8 + 8
    assert show["parameters"].splitlines() == [
        "num_ctx                        4096",
        'stop                           "<|eot_id|>"',
        'stop                           "<|start_header_id|>"',
        "temperature                    0.7",
    ]
    assert "PARAMETER stop <|eot_id|>" in show["modelfile"] and "FROM " in show["modelfile"]
    # names without a tag mean :latest; lookups ignore case
    assert http.post("/api/show", json={"model": "CHATOS:V1"}).status_code == 200
    r = http.post("/api/show", json={"model": "chatos"})
    assert r.status_code == 404 and r.json() == {"error": "model 'chatos' not found"}


def test_tags_copy_delete(srv: StandinServer, http: httpx.Client, gguf_bytes: bytes) -> None:
    d = make_model(http, gguf_bytes, "chatos:v1", template="T")
    blobs_before = sorted(p.name for p in (srv.data_dir / "blobs").iterdir())
    assert http.post("/api/copy", json={"source": "chatos:v1", "destination": "chatos:latest"}).status_code == 200
    assert sorted(p.name for p in (srv.data_dir / "blobs").iterdir()) == blobs_before  # no extra disk
    models = http.get("/api/tags").json()["models"]
    assert {m["name"] for m in models} == {"chatos:v1", "chatos:latest"}
    assert len({m["digest"] for m in models}) == 1  # same manifest
    m = models[0]
    assert set(m) >= {"name", "model", "modified_at", "size", "digest", "details"}
    assert m["details"]["format"] == "gguf" and m["size"] > len(gguf_bytes)

    r = http.post("/api/copy", json={"source": "nope:v9", "destination": "chatos:latest"})
    assert r.status_code == 404 and r.json() == {"error": 'model "nope:v9" not found'}
    r = http.request("DELETE", "/api/delete", json={"model": "nope"})
    assert r.status_code == 404 and r.json() == {"error": "model 'nope' not found"}

    # deleting one tag keeps the blobs the other uses; deleting the last one prunes them (default Ollama)
    assert http.request("DELETE", "/api/delete", json={"model": "chatos:v1"}).status_code == 200
    assert http.head(f"/api/blobs/{d}").status_code == 200
    assert http.request("DELETE", "/api/delete", json={"model": "chatos:latest"}).status_code == 200
    assert http.head(f"/api/blobs/{d}").status_code == 404
    assert http.get("/api/tags").json() == {"models": []}


@pytest.mark.parametrize(("template", "error"), [
    ("{{ .Prompt", "template error: template: :1: unclosed action"),
    ("{{ if .System }}{{ .System }}", "template error: template: :1: unexpected EOF"),
    ("{{ .Prompt }}\n{{ end }}", "template error: template: :2: unexpected {{end}}"),
    ("{{ range .Messages }}{{ else }}{{ else }}", "template error: template: :1: unexpected EOF"),
    ("{{ bogus .Prompt }}", 'template error: template: :1: function "bogus" not defined'),
    ("{{ }}", "template error: template: :1: missing value for command"),
    ("{{ if }}x{{ end }}", "template error: template: :1: missing value for if"),
    ("{{ else }}", "template error: template: :1: unexpected {{else}}"),
])
def test_create_with_a_template_that_does_not_parse_is_ollamas_400(http: httpx.Client, gguf_bytes: bytes,
                                                                   template: str, error: str) -> None:
    d = upload(http, gguf_bytes)
    r = http.post("/api/create", json={"model": "m", "files": {"model.gguf": d}, "template": template,
                                       "stream": False})
    assert r.status_code == 400 and r.json() == {"error": error}
    code, lines = create(http, {"model": "m", "files": {"model.gguf": d}, "template": template})
    assert code == 200 and lines[0] == {"status": "parsing GGUF"} and lines[-1] == {"error": error, "status": 400}
    assert http.post("/api/show", json={"model": "m"}).status_code == 404  # nothing was created


def test_every_project_template_parses_and_capabilities_follow_the_template(http: httpx.Client,
                                                                           gguf_bytes: bytes) -> None:
    from daemon.train import templates  # the test may import the project; the stand-in may not

    for name in templates.names():
        assert go_template_error(templates.get(name).ollama_template) is None, name
    make_model(http, gguf_bytes, "plain", template="{{ .Prompt }}")
    assert http.post("/api/show", json={"model": "plain"}).json()["capabilities"] == ["completion"]
    tools = "{{ if .Tools }}{{ json .Tools }}{{ end }}{{ range .Messages }}{{ .Content }}{{ end }}"
    make_model(http, gguf_bytes, "tooly", template=tools)
    assert http.post("/api/show", json={"model": "tooly"}).json()["capabilities"] == ["completion", "tools"]


def test_chat_canned_reply_and_num_predict(http: httpx.Client, gguf_bytes: bytes) -> None:
    make_model(http, gguf_bytes, "chatos:v1")
    msgs = [{"role": "user", "content": "hi"}]
    r = http.post("/api/chat", json={"model": "chatos:v1", "messages": msgs, "stream": False,
                                     "options": {"num_predict": 64, "temperature": 0}})
    assert r.status_code == 200
    out = r.json()
    assert out["message"] == {"role": "assistant", "content": CANNED_REPLY}
    assert out["done"] is True and out["done_reason"] == "stop"
    # canned either way: without xllamacpp, or because this GGUF has no transformer blocks to run
    engine = importlib.util.find_spec("xllamacpp") is not None
    assert out["standin"] == ("not a runnable model (no transformer blocks): canned reply" if engine
                              else "no xllamacpp: canned reply")
    r = http.post("/api/chat", json={"model": "chatos:v1", "messages": msgs, "stream": False,
                                     "options": {"num_predict": 3}})
    assert r.json()["done_reason"] == "length" and r.json()["message"]["content"] == "Hello! This is"
    r = http.post("/api/chat", json={"model": "chatos:v1", "messages": msgs})  # streamed by default
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert lines[-1]["done"] is True and all(not x["done"] for x in lines[:-1])
    assert "".join(x["message"]["content"] for x in lines).strip() == CANNED_REPLY
    r = http.post("/api/chat", json={"model": "ghost", "messages": msgs, "stream": False})
    assert r.status_code == 404 and r.json() == {"error": "model 'ghost' not found"}


def test_ps_lists_what_a_chat_loaded_and_keep_alive_zero_unloads(http: httpx.Client, gguf_bytes: bytes) -> None:
    """Ollama's scheduler as its API shows it: a chat loads the model for keep_alive (default 5m), /api/ps lists it,
    keep_alive 0 (on a chat, or a prompt-less /api/generate) unloads it; a prompt-less generate without it loads."""
    make_model(http, gguf_bytes, "chatos:v1")
    make_model(http, gguf_bytes, "chatos:v2")
    assert http.get("/api/ps").json() == {"models": []}
    msgs = [{"role": "user", "content": "hi"}]
    assert http.post("/api/chat", json={"model": "chatos:v1", "messages": msgs, "stream": False}).status_code == 200
    r = http.post("/api/generate", json={"model": "chatos:v2"})
    assert r.status_code == 200 and r.json()["done_reason"] == "load" and r.json()["response"] == ""
    loaded = {m["name"]: m for m in http.get("/api/ps").json()["models"]}
    assert set(loaded) == {"chatos:v1", "chatos:v2"}
    v1 = loaded["chatos:v1"]
    assert v1["size"] > 0 and v1["size_vram"] == v1["size"] and re.fullmatch(HEX_RE, v1["digest"])
    assert set(v1) >= {"name", "model", "size", "digest", "details", "expires_at", "size_vram", "context_length"}
    r = http.post("/api/generate", json={"model": "chatos:v1", "keep_alive": 0})
    assert r.json()["done_reason"] == "unload" and r.json()["done"] is True
    assert [m["name"] for m in http.get("/api/ps").json()["models"]] == ["chatos:v2"]
    http.post("/api/chat", json={"model": "chatos:v2", "messages": msgs, "stream": False, "keep_alive": "0s"})
    assert http.get("/api/ps").json() == {"models": []}
    http.post("/api/chat", json={"model": "chatos:v1", "messages": msgs, "stream": False, "keep_alive": 0.2})
    assert len(http.get("/api/ps").json()["models"]) == 1
    time.sleep(0.4)  # its keep-alive ran out
    assert http.get("/api/ps").json() == {"models": []}
    r = http.post("/api/generate", json={"model": "ghost", "keep_alive": 0})
    assert r.status_code == 404 and r.json() == {"error": "model 'ghost' not found"}
    r = http.post("/api/generate", json={"model": "chatos:v1", "keep_alive": "soon"})
    assert r.status_code == 400 and "invalid duration" in r.json()["error"]
    r = http.post("/api/generate", json={"model": "chatos:v1", "prompt": "hi", "stream": False,
                                         "options": {"num_predict": 3}})
    assert r.json()["response"] == "Hello! This is" and r.json()["done_reason"] == "length"


def test_version_and_unknown_paths(http: httpx.Client) -> None:
    assert http.get("/api/version").json() == {"version": "0.33.0"}
    assert http.get("/").text == "Ollama is running"
    assert http.get("/api/nope").status_code == 404


# --------------------------------------------------------------------------------------------------- persistence


def test_state_survives_a_restart(tmp_path: Path, gguf_bytes: bytes) -> None:
    srv = StandinServer(tmp_path / "data").start()
    try:
        port = srv.port
        with httpx.Client(base_url=srv.url, timeout=10) as http:
            d = make_model(http, gguf_bytes, "chatos:v1", template="T", parameters={"stop": ["</s>"]})
            orphan = upload(http, b"uploaded but never used by a create")
        srv.restart()
        assert srv.port == port
        with httpx.Client(base_url=srv.url, timeout=10) as http:
            assert [m["name"] for m in http.get("/api/tags").json()["models"]] == ["chatos:v1"]
            show = http.post("/api/show", json={"model": "chatos:v1"}).json()
            assert show["template"] == "T" and '"</s>"' in show["parameters"]
            assert http.head(f"/api/blobs/{d}").status_code == 200
            assert http.head(f"/api/blobs/{orphan}").status_code == 404  # pruned at start, like Ollama
    finally:
        srv.stop()
    with StandinServer(tmp_path / "data2", noprune=True) as keep, httpx.Client(base_url=keep.url) as http:
        orphan = upload(http, b"kept with OLLAMA_NOPRUNE")
        keep.restart()
        assert http.head(f"/api/blobs/{orphan}").status_code == 200


# --------------------------------------------------------------------------------------------------- faults


def test_fault_down_refuses_and_comes_back(srv: StandinServer, http: httpx.Client) -> None:
    srv.set_faults(down=True)
    with pytest.raises(httpx.ConnectError):
        http.get("/api/version")
    # the admin port still answers and brings the API back on the same port
    r = httpx.post(srv.admin_url + "/_standin/faults", json={"down": False})
    assert r.status_code == 200 and r.json()["down"] is False
    assert http.get("/api/version").status_code == 200


def test_fault_status_500_and_slow(srv: StandinServer, http: httpx.Client) -> None:
    srv.set_faults(status_500=True)
    for method, path in (("GET", "/api/version"), ("GET", "/api/tags"), ("POST", "/api/show")):
        r = http.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 500 and r.json() == {"error": "internal"}
    srv.set_faults(status_500=False, slow_s=1.0)
    with pytest.raises(httpx.ReadTimeout):
        http.get("/api/version", timeout=0.2)
    srv.reset_faults()
    assert http.get("/api/version").status_code == 200


def test_fault_switches_on_blobs_and_create(srv: StandinServer, http: httpx.Client, gguf_bytes: bytes) -> None:
    data = b"blob bytes"
    d = digest_of(data)
    srv.set_faults(digest_mismatch=True)
    r = http.post(f"/api/blobs/{d}", content=data)
    assert r.status_code == 400 and r.json()["error"].startswith(f'digest mismatch, expected "{d}", got "sha256:')
    srv.set_faults(digest_mismatch=False, disk_full=True)
    r = http.post(f"/api/blobs/{d}", content=data)
    assert r.status_code == 500 and "no space left on device" in r.json()["error"]
    assert list((srv.data_dir / "blobs").iterdir()) == []
    srv.set_faults(disk_full=False, error_mid_stream=True)
    g = upload(http, gguf_bytes)
    code, lines = create(http, {"model": "m", "files": {"model.gguf": g}})
    assert code == 200 and lines[0] == {"status": "parsing GGUF"} and "error" in lines[-1]
    srv.set_faults(error_mid_stream=False, no_success=True)
    code, lines = create(http, {"model": "m", "files": {"model.gguf": g}})
    assert code == 200 and lines[-1] == {"status": "writing manifest"}


def test_admin_endpoint_validates_and_reports(srv: StandinServer, http: httpx.Client) -> None:
    r = http.post("/_standin/faults", json={"slow_s": 0.5, "status_500": True})
    assert r.status_code == 200 and r.json() == {**Faults().__dict__, "slow_s": 0.5, "status_500": True}
    assert srv.faults.status_500 is True
    assert http.post("/_standin/faults", json={"explode": True}).status_code == 400
    assert http.post("/_standin/faults", json={"slow_s": "fast"}).status_code == 400
    assert http.post("/_standin/reset").json() == Faults().__dict__
    assert StandinServer(srv.data_dir, slow_s=2).faults.slow_s == 2.0
    with pytest.raises(ValueError, match="unknown fault"):
        StandinServer(srv.data_dir, nope=True)


def test_name_parsing() -> None:
    assert Name.parse("m") == Name("registry.ollama.ai", "library", "m", "latest")
    assert Name.parse("user/m:v1") == Name("registry.ollama.ai", "user", "m", "v1")
    assert Name.parse("localhost:5000/ns/m:v1") == Name("localhost:5000", "ns", "m", "v1")
    assert Name.parse("user/m:v1").display() == "user/m:v1"  # type: ignore[union-attr]
    for bad in ("", "a b", "m:", ":v1", "a/b/c/d", "-m", "m:-t"):
        assert Name.parse(bad) is None, bad


# --------------------------------------------------------------------------------------------------- subprocess


def test_standin_as_a_subprocess(tmp_path: Path, gguf_bytes: bytes) -> None:
    proc = StandinProcess(tmp_path / "data").start()
    try:
        with httpx.Client(base_url=proc.url, timeout=10) as http:
            make_model(http, gguf_bytes, "chatos:v1")
            assert proc.set_faults(status_500=True)["status_500"] is True
            assert http.get("/api/tags").status_code == 500
            proc.set_faults(status_500=False, down=True)
            with pytest.raises(httpx.ConnectError):
                http.get("/api/tags")
            proc.set_faults(down=False)
            port = proc.port
            proc.restart()
            assert proc.port == port
            assert [m["name"] for m in http.get("/api/tags").json()["models"]] == ["chatos:v1"]
            assert proc.status()["VmRSS"] > 0
    finally:
        assert proc.stop() == 0  # SIGTERM: a clean exit
