"""Every vote is learned (issue 19), for real on the CPU through the CLI: v1 is a full retrain from the base; new
thumbs-up chats make v2 a warm start from v1 on every new example plus replay, with the learned_new check in its gate;
a vote retracted on a chat v1 trained on stops warm starts (status says the model still holds it) until a full
retrain from the base leaves it out of the new model's lineage."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from helpers import need
from ollama_standin import StandinServer
from trainjobs import UNSLOTH_PYTHON

from daemon.dataset.builder import read_train_ids
from daemon.demo import storegen
from daemon.state import State
from daemon.train import gate

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ANSWER = "Purple giraffes hum seventeen quiet lullabies."


def cli(config: Path, *args: str) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-m", "daemon", "--config", str(config), *args, "--json"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def add_voted_chats(store: Path, n: int) -> list[str]:
    """``n`` new chats with one distinctive answer, each with a thumbs-up."""
    when = datetime(2026, 11, 28, 10, 0, 0)
    ids = []
    with (store / "logs" / "conversations_2026-11-28.jsonl").open("a") as f, \
            (store / "feedback" / "feedback_2026-11-28.jsonl").open("a") as g:
        for i in range(n):
            cid = f"voted{i:04d}"
            rec = storegen.full_record(random.Random(i), cid, when + timedelta(seconds=i), assistant_words=(6, 12))
            rec["messages"][1]["content"] = ANSWER
            f.write(storegen.line(rec))
            g.write(json.dumps({"conversation_id": cid, "thumbs_up": True, "feedback": None,
                                "timestamp": (when + timedelta(minutes=5)).isoformat()}) + "\n")
            ids.append(cid)
    return ids


def write_config(tmp_path: Path, model: Path, *, training: dict[str, Any], gate: dict[str, Any],
                 ollama_url: str | None = None) -> Path:
    """The service's config for a real CPU run on the tiny model; ``training``/``gate`` add to it. Export is off
    unless ``ollama_url`` names an Ollama (stand-in) to register with."""
    overrides = tmp_path / "job-overrides.yaml"
    overrides.write_text("training:\n  learning_rate: 0.01\n  eval_steps: null\nlora:\n  r: 8\n")
    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump({
        "store": {"root": str(tmp_path / "ChatOS-Memory")}, "state": {"dir": str(tmp_path / "state")},
        "training": {"python": sys.executable, "base_model": str(model), "backend": "transformers",
                     "timeout": "10m", "env": {"OMP_NUM_THREADS": "1"}, "config_template": str(overrides),
                     **training},
        "policy": {"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0, "max_runs_per_day": 10},
        "dataset": {"min_train_examples": 4, "min_eval_examples": 4},
        "gate": gate,
        "export": {"enabled": False} if ollama_url is None else {"quantization": "q8_0",
                                                                 "smoke": {"require_stop": False}},
        **({} if ollama_url is None else {"ollama": {"host": ollama_url, "model_name": "chatos-pref",
                                                     "timeout_s": 60}}),
    }))
    return config


def test_votes_reach_the_model_and_a_retracted_one_leaves_it(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    store, state_dir = tmp_path / "ChatOS-Memory", tmp_path / "state"
    storegen.generate_store(store, 160, days=2, seed=31, assistant_words=(6, 20), feedback_fraction=0.6)
    config = write_config(tmp_path, tiny_models["qwen2"],
                          training={"replay_ratio": 1.0, "new_epochs": 2, "warm_lr_scale": 0.5},
                          gate={"tolerance": 0.5, "min_new_gain": 0.005,  # a tiny random model moves little
                                "max_canary_increase": 0.5})

    first = cli(config, "trigger")
    plan1 = first["counts"]["plan"]
    assert first["outcome"] == "promoted", first["reason"]
    assert plan1["init"] == "base" and plan1["why"] == "no champion yet"
    canary1 = {c["name"]: c for c in first["counts"]["gate"]["checks"]}["canary"]  # against the base model
    assert canary1["passed"] and canary1["candidate_ppl"] == pytest.approx(math.exp(canary1["candidate_loss"]))
    assert plan1["examples"] == plan1["split"] and plan1["steps"] == -(-plan1["split"] // 8)
    j1 = first["job_id"]

    voted = add_voted_chats(store, 12)
    second = cli(config, "trigger")
    plan2, gate2 = second["counts"]["plan"], second["counts"]["gate"]
    assert plan2["init"] == "champion" and plan2["parent_job"] == j1, plan2
    with State(state_dir) as st:
        dataset2 = Path(st.datasets.get(second["dataset_version"], manifest=False).path)  # type: ignore[union-attr]
        trained2 = st.jobs.trained([second["job_id"]])
        row2 = st.jobs.get(second["job_id"])
    train2 = dict(read_train_ids(dataset2))  # the version where each training example first appeared
    voted_train = [cid for cid in voted if cid in train2]
    assert len(voted_train) >= 8 and all(train2[cid] == second["dataset_version"] for cid in voted_train)
    assert plan2["new"] == len(voted_train) and all(cid in trained2 for cid in voted_train)  # every one of them
    assert plan2["replay"] == plan2["new"] and plan2["examples"] == 3 * plan2["new"]
    assert plan2["learning_rate"] == pytest.approx(0.005) and "warm start" in plan2["lr_note"]
    cfg2 = yaml.safe_load(Path(row2.config_path).read_text())  # type: ignore[union-attr]
    assert cfg2["init"]["adapter"].endswith(f"{j1}/output/adapter") and cfg2["dataset"]["new_path"]
    assert cfg2["dataset"]["canary_path"] == str(gate.CANARY_PATH)
    res2 = row2.result  # type: ignore[union-attr]
    assert res2["eval_loss_before"] == pytest.approx(res2["champion_eval_loss"])  # it started from the champion
    # the canary set, evaluated for real on the starting weights (the champion's), the candidate and the champion
    assert res2["canary_examples"] == 40 and res2["canary_loss_before"] == pytest.approx(res2["champion_canary_loss"])
    assert all(math.isfinite(res2[k]) for k in ("canary_loss_before", "canary_loss_after", "champion_canary_loss"))
    assert [c["name"] for c in gate2["checks"]] == ["loss", "learned_new", "preference", "canary", "regressions"]
    canary = gate2["checks"][3]
    assert canary["candidate_loss"] == res2["canary_loss_after"] and canary["champion_loss"] == res2[
        "champion_canary_loss"]
    assert canary["candidate_ppl"] == pytest.approx(math.exp(res2["canary_loss_after"]))
    assert canary["passed"] and canary["max_increase"] == 0.5 and canary["detail"].startswith("canary: perplexity")
    assert gate2["checks"][2]["skipped"] and gate2["checks"][4]["skipped"]  # sft: no preference data; no file
    assert gate2["candidate_new_loss"] < gate2["champion_new_loss"] * 0.995, gate2  # it learned the new votes
    assert gate2["checks"][1]["passed"] and gate2["checks"][1]["detail"].startswith("learned_new: new-example loss")
    assert second["counts"]["learned"].startswith("learned: new ")
    assert second["outcome"] == "promoted", second["reason"]
    full_status = cli(config, "status")["store"]
    status = full_status["model"]
    assert full_status["gate"]["champion"]["job_id"] == second["job_id"]
    assert [c["name"] for c in full_status["gate"]["champion"]["checks"]] == [c["name"] for c in gate2["checks"]]
    assert status["init"] == "champion" and status["lineage"] == [second["job_id"], j1]
    assert status["deleted_in_model"] == 0 and "; full retrain from the base (nothing new" in status["next_plan"]

    # the user deletes one chat v1 trained on (for good) and takes back the vote on another (a thumbs-down now)
    with State(state_dir) as st:
        trained1 = sorted(st.jobs.trained([j1]))
    deleted, unvoted = trained1[0], trained1[1]
    forgot = cli(config, "forget", deleted)
    # exactly the jobs whose plans held it: v1's, and v2's when its replay drew it
    assert forgot["jobs_trained_on_it"] == sorted([j1, *([second["job_id"]] if deleted in trained2 else [])])
    with (store / "feedback" / "feedback_2026-11-29.jsonl").open("a") as g:
        g.write(json.dumps({"conversation_id": unvoted, "thumbs_up": False, "feedback": None,
                            "timestamp": "2026-11-29T10:00:00"}) + "\n")
    cli(config, "ingest")
    status = cli(config, "status")["store"]["model"]
    assert status["deleted_in_model"] == 2 and "deleted chat(s) still in the current model" in status["note"]
    assert "; full retrain from the base (2 chat(s) the current model learned" in status["next_plan"]

    third = cli(config, "trigger")
    plan3 = third["counts"]["plan"]
    assert plan3["init"] == "base" and "deleted or their votes retracted" in plan3["why"], plan3
    assert third["outcome"] == "promoted", third["reason"]
    with State(state_dir) as st:
        trained3 = st.jobs.trained([third["job_id"]])
    assert deleted not in trained3 and unvoted not in trained3 and voted_train[0] in trained3
    status = cli(config, "status")["store"]["model"]
    assert status["lineage"] == [third["job_id"]] and status["deleted_in_model"] == 0


@pytest.mark.parametrize(("objective", "backend"), [("kto", "transformers"), ("dpo", "transformers"),
                                                   ("kto", "unsloth"), ("auto", "unsloth")])
def test_a_preference_objective_trains_exports_and_registers(
        objective: str, backend: str, tiny_models: dict[str, Path], tmp_path: Path,
        ollama_standin: StandinServer) -> None:
    """Issue 12: thumbs-down (and corrections given through the CLI and as ChatOS writes them) reach the trainer as
    the preference files of the plan; the job trains that objective through the runner, the gate judges it, and the
    adapter is merged, converted and registered like any other, on both backends (Unsloth: its patched trainers,
    Unsloth imported before TRL). ``auto`` with corrections picks DPO and says why."""
    python = sys.executable
    if backend == "unsloth":
        need(UNSLOTH_PYTHON.exists(), f"no Unsloth trainer venv at {UNSLOTH_PYTHON}: run .ci/train-setup.sh")
        python = str(UNSLOTH_PYTHON)
    store, state_dir = tmp_path / "ChatOS-Memory", tmp_path / "state"
    storegen.generate_store(store, 160, days=2, seed=41, assistant_words=(6, 20), feedback_fraction=0.7)
    config = write_config(tmp_path, tiny_models["qwen2"], gate={"tolerance": 10.0, "min_new_gain": 0.0,
                                                               "required": ["loss"]},
                          training={"objective": objective, "dpo_min_pairs": 2, "backend": backend, "python": python},
                          ollama_url=ollama_standin.url)
    trains = "kto" if objective == "kto" else "dpo"
    if trains == "dpo":  # corrections for down-voted chats, as a user gives them
        events = [json.loads(line) for f in sorted((store / "feedback").glob("*.jsonl"))
                  for line in f.read_text().splitlines()]
        down = sorted({e["conversation_id"] for e in events if e.get("thumbs_up") is False})
        assert len(down) >= 20
        for i, cid in enumerate(down[:2]):  # through the CLI ...
            cli(config, "feedback", cid, "--down", "--better", f"A better answer, number {i}.")
        with (store / "feedback" / "feedback_2026-11-30.jsonl").open("a") as g:  # ... and as ChatOS writes them
            for i, cid in enumerate(down[2:], 2):
                g.write(json.dumps({"conversation_id": cid, "thumbs_up": False, "better": f"A better answer, "
                                    f"number {i}.", "timestamp": "2026-11-30T10:00:00"}) + "\n")
    built = cli(config, "dataset", "build")
    assert built["undesirable"] > 0 and built["desirable"] > 0 and (built["pairs"] >= 4) == (trains == "dpo"), built
    out = cli(config, "trigger")
    plan_ = out["counts"]["plan"]
    why = "auto: " if objective == "auto" else f"training.objective is {objective}"
    assert plan_["objective"] == trains and plan_["line"].startswith(f"{trains} ({why}"), plan_
    with State(state_dir) as st:
        row = st.jobs.get(out["job_id"])
        model = st.models.get(1)
    assert row is not None and row.result is not None, out["reason"]
    cfg = yaml.safe_load(Path(row.config_path).read_text())
    assert cfg["objective"] == trains and cfg["backend"] == backend and cfg["dataset"]["pref_train_path"].endswith(
        f"plan/{'prefs' if trains == 'kto' else 'pairs'}_train.jsonl")
    res = row.result
    assert res["objective"] == trains and res["backend"] == backend and res["pref_eval_examples"] > 0
    assert isinstance(res["pref_accuracy_after"], float) and isinstance(res["eval_loss_after"], float)
    assert out["outcome"] == "registered" and out["model_tag"] == "chatos-pref:v1", out["reason"]
    assert model is not None and model.job_id == out["job_id"] and Path(model.gguf_path).stat().st_size > 0
    show = httpx.post(ollama_standin.url + "/api/show", json={"model": "chatos-pref:latest"}, timeout=120).json()
    assert show["model_info"]["general.architecture"] == "qwen2"
