"""The registry against the Ollama stand-in: versions, latest, verification, retention, rollback, every fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from ollama_standin import StandinServer, make_tiny_gguf

from daemon.publish import ollama_client, registry
from daemon.state import State
from daemon.train import templates


def gguf(tmp_path: Path, n: int, architecture: str = "qwen2", template: str = "qwen-2.5") -> tuple[Path, str, int]:
    p = make_tiny_gguf(tmp_path / f"m{n}.gguf", architecture=architecture,
                       chat_template=templates.get(template).jinja, pad_mb=0.01 * n)
    return p, ollama_client.file_sha256(p).split(":")[-1], p.stat().st_size


def add(state: State, s: Any, tmp_path: Path, n: int, **kw: Any) -> int:
    p, sha, size = gguf(tmp_path, n, **kw)
    return registry.add_version(state, job_id=f"j-{n}", dataset_version=n, manifest_hash=f"h{n}", gguf_path=str(p),
                                gguf_sha256=f"sha256:{sha}", gguf_size=size, architecture=kw.get("architecture",
                                                                                                  "qwen2"),
                                chat_template=kw.get("template", "qwen-2.5"), eval_numbers={"candidate": 1.0},
                                settings=s)


def names(srv: StandinServer) -> set[str]:
    return set(digests(srv))


def digests(srv: StandinServer) -> dict[str, str]:
    return {m["name"]: m["digest"] for m in httpx.get(srv.url + "/api/tags").json()["models"]}


@pytest.fixture
def s(make_settings: Any, ollama_standin: StandinServer) -> Any:
    return make_settings(ollama={"host": ollama_standin.url, "model_name": "chatos", "keep_versions": 2,
                                 "timeout_s": 5, "retry_backoff": 60},
                         # these GGUFs have no transformer blocks: llama.cpp cannot load them, so rollback's load
                         # check is off here (tests/e2e/test_cycle_export_cpu.py runs it on real exports)
                         export={"smoke": {"require_stop": True}, "engine": {"enabled": False}})


def test_register_moves_latest_after_every_check(s: Any, state: State, tmp_path: Path,
                                                 ollama_standin: StandinServer) -> None:
    v = add(state, s, tmp_path, 1)
    row = registry.register(s, state, v)
    assert row["status"] == "registered" and row["ollama_digest"], row
    assert names(ollama_standin) >= {"chatos:v1", "chatos:latest"}
    show = httpx.post(ollama_standin.url + "/api/show", json={"model": "chatos:latest"}).json()
    assert show["template"] == templates.get("qwen-2.5").ollama_template
    assert '"<|im_end|>"' in show["parameters"] and show["details"]["format"] == "gguf"
    assert state.service.get().latest_model == 1
    lin = registry.lineage(state)
    assert lin[0]["latest"] and lin[0]["job_id"] == "j-1" and lin[0]["manifest_hash"] == "h1"


@pytest.mark.parametrize("fault", [{"down": True}, {"status_500": True}, {"error_mid_stream": True},
                                   {"no_success": True}, {"disk_full": True}, {"slow_s": 8}])
def test_every_ollama_fault_leaves_no_half_registered_model_and_retries(
    s: Any, state: State, tmp_path: Path, ollama_standin: StandinServer, fault: dict[str, Any]
) -> None:
    registry.register(s, state, add(state, s, tmp_path, 1))
    v2 = add(state, s, tmp_path, 2)
    ollama_standin.set_faults(**fault)
    row = registry.register(s, state, v2)
    assert row["status"] == "pending" and row["next_attempt_at"] and row["last_error"], row
    assert "\n" not in row["last_error"]
    ollama_standin.reset_faults()
    assert "chatos:v2" not in names(ollama_standin)  # nothing half-registered
    d = digests(ollama_standin)
    assert d["chatos:latest"] == d["chatos:v1"] and state.service.get().latest_model == 1
    assert registry.retry_pending(s, state) == []  # backoff: not yet
    done = registry.retry_pending(s, state, force=True)
    assert [d["status"] for d in done] == ["registered"] and state.service.get().latest_model == 2


def test_digest_mismatch_is_a_hard_failure(s: Any, state: State, tmp_path: Path,
                                           ollama_standin: StandinServer) -> None:
    v = add(state, s, tmp_path, 1)
    ollama_standin.set_faults(digest_mismatch=True)
    row = registry.register(s, state, v)
    assert row["status"] == "failed" and "digest mismatch" in row["last_error"]
    assert state.service.get().latest_model is None and "chatos:latest" not in names(ollama_standin)


def test_verification_failure_removes_the_new_tag(s: Any, state: State, tmp_path: Path,
                                                  ollama_standin: StandinServer) -> None:
    p, sha, size = gguf(tmp_path, 1, architecture="llama")
    v = registry.add_version(state, job_id="j", dataset_version=1, manifest_hash=None, gguf_path=str(p),
                             gguf_sha256=f"sha256:{sha}", gguf_size=size, architecture="qwen2",
                             chat_template="qwen-2.5", eval_numbers={}, settings=s)
    row = registry.register(s, state, v)
    assert row["status"] == "failed" and "does not verify" in row["last_error"] and "architecture" in row["last_error"]
    assert "chatos:v1" not in names(ollama_standin)


def test_retention_keeps_k_and_never_the_current_or_previous_latest(s: Any, state: State, tmp_path: Path,
                                                                    ollama_standin: StandinServer) -> None:
    for n in range(1, 5):
        registry.register(s, state, add(state, s, tmp_path, n))
    assert {m.version: m.status for m in state.models.all()} == {1: "deleted", 2: "deleted", 3: "registered",
                                                                    4: "registered"}
    assert names(ollama_standin) == {"chatos:v3", "chatos:v4", "chatos:latest"}
    # roll back to v3, register v5: v4 stays because it was the latest before the rollback
    assert registry.rollback(s, state)["latest"] == 3
    registry.register(s, state, add(state, s, tmp_path, 5))
    assert state.service.get().latest_model == 5
    # the newest two (4, 5) are kept, and 3 as the previous latest
    assert {m.version for m in state.models.all(status="registered")} == {3, 4, 5}
    registry.register(s, state, add(state, s, tmp_path, 6))
    assert {m.version for m in state.models.all(status="registered")} == {5, 6}
    assert "chatos:latest" in names(ollama_standin)


def test_rollback(s: Any, state: State, tmp_path: Path, ollama_standin: StandinServer) -> None:
    with pytest.raises(ValueError, match="no registered version"):
        registry.rollback(s, state)
    registry.register(s, state, add(state, s, tmp_path, 1))
    registry.register(s, state, add(state, s, tmp_path, 2))
    out = registry.rollback(s, state)
    assert out == {"latest": 1, "previous": 2, "tag": "chatos:latest",
                   "engine": "skipped (export.engine.enabled: false)"}
    d = digests(ollama_standin)
    assert d["chatos:latest"] == d["chatos:v1"] != d["chatos:v2"]
    assert registry.rollback(s, state, to=2)["latest"] == 2
    with pytest.raises(ValueError, match="not a registered version"):
        registry.rollback(s, state, to=9)
    # every move of latest is kept, for the report's history: two registrations, then two rollbacks
    moves = [(m.version, m.previous, m.how) for m in state.service.latest_moves()]
    assert moves == [(1, None, "registered"), (2, 1, "registered"), (1, 2, "rollback"), (2, 1, "rollback")]


def test_llama3_template_path(s: Any, state: State, tmp_path: Path, ollama_standin: StandinServer) -> None:
    v = add(state, s, tmp_path, 1, architecture="llama", template="llama-3.1")
    row = registry.register(s, state, v)
    assert row["status"] == "registered", row
    show = httpx.post(ollama_standin.url + "/api/show", json={"model": "chatos:v1"}).json()
    assert '"<|eot_id|>"' in show["parameters"]


def test_rollback_to_a_version_that_learned_a_deleted_chat_needs_force(
    s: Any, state: State, tmp_path: Path, ollama_standin: StandinServer
) -> None:
    """Issue 19: v1's job trained on a chat the user has since deleted (it is no longer eligible); v2's did not."""
    from daemon.state import JobRow

    for n in (1, 2):
        with state.transaction():
            state.jobs.add(JobRow(job_id=f"j-{n}", dataset_version=n, status="promoted", job_dir="/j",
                                  config_path="/j/c", log_path="/j/l", metrics_path="/j/m", result_path="/j/r",
                                  params={"plan": {"init": "base"}}, created_at=f"2026-12-0{n}T00:00:00"))
            state.jobs.add_trained(f"j-{n}", ["deleted-chat"] if n == 1 else [])
        registry.register(s, state, add(state, s, tmp_path, n))
    with pytest.raises(ValueError, match=r"v1 learned 1 chat\(s\) that were since deleted or un-voted .*--force"):
        registry.rollback(s, state)
    assert state.service.get().latest_model == 2
    assert registry.rollback(s, state, force=True)["latest"] == 1
