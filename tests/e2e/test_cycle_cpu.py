"""The whole cycle for real on the CPU: generated ChatOS store -> dataset -> the runner spawning the real trainer ->
gate, twice (the second candidate is measured against the first as champion). Both backends."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import need
from trainjobs import UNSLOTH_PYTHON

from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.demo.storegen import append_records, generate_store
from daemon.state import State

pytestmark = pytest.mark.slow


def settings_for(make_settings: Any, model: Path, python: Path, backend: str, template: str = "qwen-2.5") -> Any:
    # a tiny random model needs a large learning rate to move in 24 steps (training.config_template carries it)
    overrides = model.parent / "job-overrides.yaml"
    overrides.write_text("training:\n  learning_rate: 0.01\n  eval_steps: null\nlora:\n  r: 8\n")
    return make_settings(
        training={"python": str(python), "base_model": str(model), "backend": backend, "chat_template": template,
                  "max_steps": 24, "timeout": "10m", "env": {"OMP_NUM_THREADS": "1"},
                  "config_template": str(overrides)},
        policy={"min_new_examples": 5, "min_total_examples": 5, "cooldown": 0, "max_runs_per_day": 10},
        dataset={"min_train_examples": 4, "min_eval_examples": 4},
        export={"enabled": False},
    )


def check_job(st: State, job_id: str) -> dict[str, Any]:
    found = st.jobs.get(job_id)
    row = found.as_dict() if found else None
    assert row is not None
    lines = [json.loads(x) for x in Path(row["metrics_path"]).read_text().splitlines()]
    assert lines[0]["event"] == "job_started" and lines[-1]["event"] == "job_finished"
    assert lines[-1]["status"] == "completed"
    steps = [x for x in lines if "step" in x and "event" not in x]
    assert steps and all(s["job_id"] == job_id for s in steps)
    plan = row["params"]["plan"]  # the steps follow from the run's plan (issue 19)
    assert [s["step"] for s in steps] == sorted(s["step"] for s in steps) and steps[-1]["step"] == plan["steps"]
    res = row["result"]
    assert res["steps"] == plan["steps"] and lines[-1]["total_steps"] == plan["steps"]
    cfg = Path(row["config_path"]).read_text()
    assert "r: 8" in cfg  # training.config_template reached the job
    assert f"learning_rate: {plan['learning_rate']}" in cfg  # 0.01, halved for a warm start
    if plan["init"] == "base":
        first, last = [s["train_loss"] for s in steps[:4]], [s["train_loss"] for s in steps[-4:]]
        assert sum(last) / 4 < sum(first) / 4, "training loss went down"
        assert res["eval_loss_after"] < res["eval_loss_before"], "eval loss went down"
    assert Path(res["adapter_dir"], "adapter_config.json").is_file()
    return row


def load_adapter(model: Path, adapter: str) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():  # library deprecation chatter (transformers 5 renames), not ours
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, adapter)
    assert any("lora_" in n for n, _ in peft_model.named_parameters())


@pytest.mark.parametrize("backend", ["transformers", "unsloth"])
def test_cycle_trains_gates_and_then_compares_with_the_champion(
    backend: str, tiny_models: dict[str, Path], make_settings: Any, store: Path
) -> None:
    python = Path(sys.executable) if backend == "transformers" else UNSLOTH_PYTHON
    need(python.exists(), f"{python} missing: run .ci/train-setup.sh (builds the Unsloth venv)")
    generate_store(store, 160, days=2, seed=21, assistant_words=(6, 20), feedback_fraction=0.6)
    s = settings_for(make_settings, tiny_models["qwen2"], python, backend)
    with State(s.state_dir()) as st:
        r1 = run_cycle(s, st, CycleRequest(None))
        assert r1.decision and r1.job_id and r1.outcome in ("promoted", "rejected"), r1.reason
        row = check_job(st, r1.job_id)
        assert row["result"]["backend"] == backend
        assert r1.counts["gate"]["champion"] == "the base model"
        # against the base model, a trained candidate wins
        assert r1.outcome == "promoted" and st.service.get().champion_job == r1.job_id
        load_adapter(tiny_models["qwen2"], row["result"]["adapter_dir"])
        append_records(store, 20, seed=22, quality="excellent")
        r2 = run_cycle(s, st, CycleRequest(None))
        assert r2.job_id and r2.dataset_version == 2, r2.reason
        row2 = check_job(st, r2.job_id)
        assert isinstance(row2["result"]["champion_eval_loss"], float)
        assert r2.counts["gate"]["champion"] == f"champion {r1.job_id}"
        assert r2.counts["plan"]["init"] == "champion" and r2.counts["plan"]["new"] > 0  # built on v1
        assert row2["result"]["init_adapter"] == row["result"]["adapter_dir"]
        assert r2.outcome in ("promoted", "rejected") and r2.job_status == r2.outcome


def test_llama3_template_through_the_runner(tiny_models: dict[str, Path], make_settings: Any, store: Path) -> None:
    generate_store(store, 120, days=2, seed=23, assistant_words=(6, 20), feedback_fraction=0.6)
    s = settings_for(make_settings, tiny_models["llama"], Path(sys.executable), "transformers", "llama-3.1")
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None))
        assert r.outcome == "promoted", r.reason
        check_job(st, r.job_id)  # type: ignore[arg-type]
