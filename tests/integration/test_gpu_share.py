"""Sharing the GPU with Ollama (issue 14): before a training job the service asks the Ollama on this host to unload
what it holds (``GET /api/ps``, then ``keep_alive: 0`` for each), against the stand-in, which keeps models loaded the
way Ollama's scheduler does. Ollama down or refusing never stops the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from helpers import logs_file, rec, write_lines
from ollama_standin import StandinServer, make_tiny_gguf

from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.publish import gpu_share
from daemon.publish.ollama_client import OllamaClient
from daemon.state import State


def loaded_models(srv: StandinServer, tmp_path: Path, names: list[str]) -> None:
    gguf = make_tiny_gguf(tmp_path / "tiny.gguf", architecture="llama")
    with OllamaClient(srv.url, timeout_s=10) as c:
        digest = c.ensure_blob(gguf)
        for name in names:
            c.create(name, {"model.gguf": digest})
            c.chat(name, [{"role": "user", "content": "hi"}], num_predict=2)  # loaded, as a user's chat leaves it
        assert sorted(m["name"] for m in c.ps()) == sorted(names)


def test_unload_frees_what_ollama_holds_and_says_so(make_settings: Any, tmp_path: Path) -> None:
    srv = StandinServer(tmp_path / "ollama").start()
    try:
        loaded_models(srv, tmp_path, ["chat:v1", "other:latest"])
        s = make_settings(ollama={"host": srv.url})
        freed = gpu_share.free_gpu(s)
        assert sorted(freed.unloaded) == ["chat:v1", "other:latest"] and all(freed.unloaded.values())
        assert freed.line().startswith("ollama unloaded chat:v1, other:latest (")
        assert httpx.get(srv.url + "/api/ps", timeout=10).json() == {"models": []}
        assert gpu_share.free_gpu(s).line() == "ollama holds no model"
        loaded_models(srv, tmp_path, ["chat:v1"])
        off = make_settings(ollama={"host": srv.url}, training={"unload_ollama": False})
        assert gpu_share.free_gpu(off).line() == "ollama left as it is: training.unload_ollama is false"
        assert len(httpx.get(srv.url + "/api/ps", timeout=10).json()["models"]) == 1  # left loaded
        srv.set_faults(status_500=True)
        failed = gpu_share.free_gpu(s)
        assert failed.unloaded == {} and failed.error and "500" in failed.error and not failed.unreachable
        assert failed.line().startswith("could not ask Ollama to unload its models: ")
    finally:
        srv.stop()
    down = gpu_share.free_gpu(make_settings(ollama={"host": srv.url}))  # nothing listens: Ollama is not running
    assert down.unreachable and down.line().startswith("ollama holds nothing: Ollama not reachable")


def test_auto_unloads_only_an_ollama_on_this_host(make_settings: Any) -> None:
    assert gpu_share.wanted(make_settings(ollama={"host": "http://127.0.0.1:11434"})) == \
        (True, "auto: Ollama runs on this host")
    remote = make_settings(ollama={"host": "http://10.0.0.5:11434", "allow_remote": True})
    assert gpu_share.wanted(remote) == (False, "auto: Ollama runs on another host (http://10.0.0.5:11434)")
    forced = make_settings(ollama={"host": "http://10.0.0.5:11434", "allow_remote": True},
                           training={"unload_ollama": True})
    assert gpu_share.wanted(forced)[0] is True
    on_ray = make_settings(training={"executor": "ray"}, ray={"storage": "/srv/ray-storage"})
    assert gpu_share.wanted(on_ray) == (False, "auto: the job runs on the ray cluster, not beside Ollama")


def test_a_cycle_unloads_ollama_before_its_job_and_trains_when_ollama_is_down(
    make_settings: Any, store: Path, fake_python: Path, base_model: Path, tmp_path: Path
) -> None:
    write_lines(logs_file(store), [rec(f"u0000000000{i}", quality="good", answer=f"u{i}") for i in range(4)])
    srv = StandinServer(tmp_path / "ollama").start()
    try:
        loaded_models(srv, tmp_path, ["chatos-retrained:v1"])
        s = make_settings(
            training={"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                      "max_steps": 3, "env": {"FAKE_TRAINER_MODE": "ok"}},
            policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0, "max_runs_per_day": 10},
            dataset={"min_train_examples": 1, "min_eval_examples": 1},
            export={"enabled": False}, ollama={"host": srv.url})
        with State(s.state_dir()) as st:
            r = run_cycle(s, st, CycleRequest(None))
            assert r.outcome == "promoted", r.reason
            assert list(r.counts["ollama_unload"]["unloaded"]) == ["chatos-retrained:v1"]
            assert httpx.get(srv.url + "/api/ps", timeout=10).json() == {"models": []}
    finally:
        srv.stop()
    write_lines(logs_file(store, "2026-11-27"), [rec(f"w0000000000{i}", quality="good", answer=f"w{i}")
                                                 for i in range(2)])
    with State(s.state_dir()) as st:
        r2 = run_cycle(s, st, CycleRequest(None))  # Ollama is down now: the job runs all the same
        assert r2.job_id and r2.outcome in ("promoted", "rejected"), r2.reason
        assert r2.counts["ollama_unload"]["line"].startswith("ollama holds nothing: Ollama not reachable")
