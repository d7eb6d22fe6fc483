"""End to end for real on the CPU: tiny model with the real vocabulary -> trained adapter -> merged -> the real
converter -> GGUF checked with the reader -> registered in the Ollama stand-in; three cycles make v1..v3, latest
moves, retention deletes per config, rollback moves latest back. Plus the Llama-3 template path."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import modelfile_parser
import pytest
from helpers import need
from ollama_standin import StandinServer

from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.demo.storegen import append_records, generate_store
from daemon.publish import ollama, registry
from daemon.publish.converter import default_cache_dir, installed
from daemon.state import State
from daemon.train import templates

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _converter() -> None:
    need(installed(default_cache_dir()) is not None,
         f"the converter is not set up in {default_cache_dir()}: run .ci/train-setup.sh")


def make(make_settings: Any, model: Path, url: str, template: str = "qwen-2.5") -> Any:
    overrides = model.parent / "export-job-overrides.yaml"
    overrides.write_text("training:\n  learning_rate: 0.01\n  eval_steps: null\nlora:\n  r: 8\n")
    return make_settings(
        training={"python": sys.executable, "base_model": str(model), "backend": "transformers",
                  "chat_template": template, "max_steps": 8, "timeout": "10m", "env": {"OMP_NUM_THREADS": "1"},
                  "config_template": str(overrides)},
        policy={"min_new_examples": 5, "min_total_examples": 5, "cooldown": 0, "max_runs_per_day": 20},
        dataset={"min_train_examples": 4, "min_eval_examples": 2},
        # promote every candidate (the other checks run and report): this is about export and registry
        gate={"tolerance": 10.0, "min_new_gain": 0.0, "required": ["loss"]},
        export={"quantization": "q8_0", "smoke": {"require_stop": False}},
        ollama={"host": url, "model_name": "chatos-e2e", "keep_versions": 1, "timeout_s": 30},
    )


def tags(srv: StandinServer) -> dict[str, str]:
    return {m["name"]: m["digest"] for m in httpx.get(srv.url + "/api/tags", timeout=120).json()["models"]}


def test_three_cycles_register_versions_move_latest_retention_and_rollback(
    tiny_models: dict[str, Path], make_settings: Any, store: Path, ollama_standin: StandinServer
) -> None:
    generate_store(store, 80, days=2, seed=31, assistant_words=(6, 20), feedback_fraction=0.7)
    s = make(make_settings, tiny_models["qwen2"], ollama_standin.url)
    with State(s.state_dir()) as st:
        r1 = run_cycle(s, st, CycleRequest(None))
        assert r1.outcome == "registered" and r1.model_tag == "chatos-e2e:v1", r1.reason
        m1 = st.models.get(1)
        assert m1 is not None and m1.architecture == "qwen2" and m1.gguf_size > 0
        assert Path(m1.gguf_path).name == "chatos-e2e-v1.q8_0.gguf"
        assert not (Path(m1.gguf_path).parent / "merged").exists()  # intermediates removed
        show = httpx.post(ollama_standin.url + "/api/show", json={"model": "chatos-e2e:latest"}, timeout=120).json()
        assert show["template"] == templates.get("qwen-2.5").ollama_template
        assert '"<|im_end|>"' in show["parameters"] and show["model_info"]["general.architecture"] == "qwen2"
        # the Modelfile beside the GGUF (for an Ollama on another host) says what the registration said
        mf = modelfile_parser.create_request(modelfile_parser.parse((Path(m1.gguf_path).parent / "Modelfile")
                                                                   .read_text(encoding="utf-8")))
        assert mf["from"] == "./chatos-e2e-v1.q8_0.gguf" and mf["template"] == show["template"]
        assert mf["parameters"]["stop"] == ollama.parse_parameters(show["parameters"])["stop"]
        for n in (2, 3):
            append_records(store, 8, seed=40 + n, quality="excellent")
            r = run_cycle(s, st, CycleRequest(None))
            assert r.outcome == "registered" and r.model_tag == f"chatos-e2e:v{n}", r.reason
            t = tags(ollama_standin)
            assert t["chatos-e2e:latest"] == t[f"chatos-e2e:v{n}"]
        # keep_versions 1: v3 is latest, v2 was the previous latest (kept), v1 is gone
        assert set(tags(ollama_standin)) == {"chatos-e2e:v2", "chatos-e2e:v3", "chatos-e2e:latest"}
        assert [m.status for m in st.models.all()] == ["deleted", "registered", "registered"]
        lineage = {m["version"]: m for m in registry.lineage(st)}
        assert lineage[3]["latest"] and lineage[3]["dataset_version"] == 3 and lineage[3]["manifest_hash"]
        # rollback serves a version again only when its GGUF still loads in llama.cpp: a truncated v2 is refused
        v2 = Path(st.models.get(2).gguf_path)  # type: ignore[union-attr]
        whole = v2.read_bytes()
        v2.write_bytes(whole[: len(whole) * 2 // 3])
        with pytest.raises(ValueError, match=r"v2's GGUF no longer passes llama.cpp's load check \(llama.cpp could "
                                             r"not load it: .*\); use --force"):
            registry.rollback(s, st)
        assert st.service.get().latest_model == 3
        v2.write_bytes(whole)
        out = registry.rollback(s, st)
        assert out["latest"] == 2 and out["engine"].startswith("llama.cpp loaded it in "), out
        t = tags(ollama_standin)
        assert t["chatos-e2e:latest"] == t["chatos-e2e:v2"] != t["chatos-e2e:v3"]


def test_llama3_template_exports_and_registers(tiny_models: dict[str, Path], make_settings: Any, store: Path,
                                               ollama_standin: StandinServer) -> None:
    generate_store(store, 60, days=2, seed=32, assistant_words=(6, 20), feedback_fraction=0.7)
    s = make(make_settings, tiny_models["llama"], ollama_standin.url, "llama-3.1")
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "registered", r.reason
        show = httpx.post(ollama_standin.url + "/api/show", json={"model": "chatos-e2e:v1"}, timeout=120).json()
        assert '"<|eot_id|>"' in show["parameters"] and show["model_info"]["general.architecture"] == "llama"


def test_ollama_down_keeps_the_artifact_and_a_later_cycle_registers_it(
    tiny_models: dict[str, Path], make_settings: Any, store: Path, ollama_standin: StandinServer
) -> None:
    generate_store(store, 60, days=2, seed=33, assistant_words=(6, 20), feedback_fraction=0.7)
    s = make(make_settings, tiny_models["qwen2"], ollama_standin.url)
    ollama_standin.set_faults(down=True)
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "pending_registration" and "artifact kept, will retry" in r.reason, r.reason
        assert st.models.get(1).status == "pending" and Path(st.models.get(1).gguf_path).exists()  # type: ignore[union-attr]
        ollama_standin.reset_faults()
        again = run_cycle(s, st, CycleRequest(None, forced=True))  # a trigger retries pending registrations now
        assert "v1:registered" in again.counts["registrations_retried"], again.counts
        assert st.service.get().latest_model in (1, 2)


def test_a_regression_prompt_the_exported_gguf_fails_keeps_the_champion(
    tiny_models: dict[str, Path], make_settings: Any, store: Path, ollama_standin: StandinServer, tmp_path: Path
) -> None:
    """Issue 13: the operator's regression prompts run on the exported GGUF in llama.cpp's engine (the export
    child). A candidate that passes loss but fails a required prompt is not promoted, the reason names the prompt and
    what came back, nothing reaches Ollama and the champion stays; one that meets every expectation is registered
    with every check's numbers recorded."""
    generate_store(store, 60, days=2, seed=34, assistant_words=(6, 20), feedback_fraction=0.7)
    cases = tmp_path / "regressions.yaml"
    cases.write_text(
        "- id: capital\n  prompt: What is the capital of France?\n  max_tokens: 8\n  expect: {contains: Paris}\n"
        "- id: short\n  prompt: Say hi.\n  max_tokens: 8\n  expect: {max_words: 200}\n")
    s = make(make_settings, tiny_models["qwen2"], ollama_standin.url)
    s = s.model_copy(update={"gate": s.gate.model_copy(update={"regressions_file": cases,
                                                               "required": ["loss", "regressions"]})})
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "rejected" and "rejected on its exported GGUF" in r.reason, r.reason
        assert "capital: " in r.reason and "Paris" in r.reason and "got '" in r.reason, r.reason
        assert "short" not in r.reason.split("regressions", 1)[1]  # the prompt it met is not named
        checks = {c["name"]: c for c in r.counts["gate"]["checks"]}
        assert not checks["regressions"]["passed"] and checks["loss"]["passed"]
        assert st.models.all() == [] and st.service.get().champion_job is None
        assert tags(ollama_standin) == {}
        job = st.jobs.get(r.job_id)  # type: ignore[arg-type]
        assert job is not None and job.status == "rejected" and "capital" in (job.error or "")

        cases.write_text("- id: short\n  prompt: Say hi.\n  max_tokens: 8\n  expect: {max_words: 200}\n")
        append_records(store, 8, seed=44, quality="excellent")
        r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "registered" and r.model_tag == "chatos-e2e:v1", r.reason
        checks = {c["name"]: c for c in r.counts["gate"]["checks"]}
        assert set(checks) == {"loss", "learned_new", "preference", "canary", "regressions"}
        assert checks["regressions"]["passed"] and not checks["regressions"].get("pending"), checks["regressions"]
        assert isinstance(checks["canary"]["candidate_ppl"], float) and isinstance(checks["canary"]["champion_ppl"],
                                                                                   float), checks["canary"]
        assert st.service.get().champion_job == r.job_id
