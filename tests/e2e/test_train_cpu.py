"""Real training, end to end: tiny models with real vocabularies and chat templates, the real trainer script run by
absolute path as a subprocess, both backends. Unchanged on a GPU machine (the trainer picks the device itself)."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import need
from trainjobs import TIMEOUT_S, TRAINER, UNSLOTH_PYTHON, Job, conversation, make_job, make_pref_job, trainer_env

from daemon.train import templates

pytestmark = pytest.mark.slow

STEP_KEYS = {"job_id", "step", "train_loss", "epoch", "learning_rate", "tokens_per_s", "timestamp"}
RESULT_KEYS = {
    "job_id", "status", "backend", "base_model", "chat_template", "adapter_dir", "first_train_loss",
    "final_train_loss", "train_loss_mean", "eval_loss_before", "eval_loss_after", "champion_adapter",
    "champion_eval_loss", "champion_error", "steps", "epochs", "runtime_seconds", "train_runtime_seconds",
    "tokens_per_s", "train_examples", "eval_examples", "device", "dtype", "load_in_4bit", "peak_rss_bytes",
    "peak_gpu_memory_bytes", "versions", "python", "finished_at",
    "init_adapter", "new_examples", "new_loss_before", "new_loss_after", "champion_new_loss",
    "canary_examples", "canary_loss_before", "canary_loss_after", "champion_canary_loss",
    "objective", "pref_train_examples", "pref_eval_examples", "pref_accuracy_before", "pref_accuracy_after",
    "champion_pref_accuracy", "pref_reward_desirable_before", "pref_reward_desirable_after",
    "pref_reward_undesirable_before", "pref_reward_undesirable_after", "pref_desirable_weight",
    "pref_undesirable_weight",
    "timings", "tokenize_seconds", "token_cache_hits", "train_tokens", "train_trained_tokens", "dropped_examples",
    "param_dtypes", "attn_implementation", "gradient_checkpointing", "padding", "padding_why", "precision",
}  # fmt: skip
TIMING_KEYS = {"imports", "model_load", "tokenize", "train", "first_step", "steady_tokens_per_s", "eval", "save"}
PREF_KEYS = {k for k in RESULT_KEYS if k.startswith(("pref_", "champion_pref_"))}

# Loads an adapter onto its base with PEFT, in the training venv, and reports what it found.
PEFT_CHECK = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
base_dir, adapter_dir = sys.argv[1:3]
base = AutoModelForCausalLM.from_pretrained(base_dir)
ids = torch.tensor([[151644, 872, 198, 14990, 1879, 151645]]) % base.config.vocab_size
with torch.no_grad():
    ref = base(ids).logits
model = PeftModel.from_pretrained(base, adapter_dir)
with torch.no_grad():
    out = model(ids).logits
cfg = model.peft_config["default"]
lora_b = max(p.abs().max().item() for n, p in model.named_parameters() if "lora_B" in n)
tok = AutoTokenizer.from_pretrained(adapter_dir)
print(json.dumps({"r": cfg.r, "targets": sorted(cfg.target_modules), "lora_b_max": lora_b,
                  "logit_delta": (out - ref).abs().max().item(), "chat_template": tok.chat_template}))
"""


def run_job(job: Job, python: Path | str = sys.executable) -> Job:
    job.run(python)
    assert job.proc is not None
    assert job.proc.returncode == 0, job.log[-6000:]
    return job


def check_job(job: Job, backend: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The metrics/result contract of a successful job; returns (step lines, result)."""
    lines = job.metrics()
    cfg = job.config
    max_steps = cfg["training"]["max_steps"]
    assert lines[0]["event"] == "job_started" and lines[-1]["event"] == "job_finished"
    assert all(line["job_id"] == cfg["job_id"] for line in lines)
    assert sum(1 for line in lines if line.get("event") in ("job_started", "job_finished")) == 2

    steps = [line for line in lines if "event" not in line]
    assert steps and all(set(s) >= STEP_KEYS for s in steps)
    numbers = [s["step"] for s in steps]
    assert numbers == sorted(set(numbers)) and numbers[-1] == max_steps
    assert [s["epoch"] for s in steps] == sorted(s["epoch"] for s in steps)
    assert all(s["learning_rate"] > 0 and math.isfinite(s["train_loss"]) for s in steps)
    assert all(s["tokens_per_s"] is None or s["tokens_per_s"] > 0 for s in steps)
    evals_every = cfg["training"]["eval_steps"]
    assert [s["step"] for s in steps if "eval_loss" in s] == [n for n in numbers if n % evals_every == 0]

    evaluated = {line["phase"]: line["eval_loss"] for line in lines if line.get("event") == "evaluated"}
    phases = [line["phase"] for line in lines if line.get("event") == "evaluated"]
    assert all(line["seconds"] > 0 for line in lines if line.get("event") == "evaluated")  # what each one took
    assert [p for p in phases if p in ("base", "candidate")] == ["base", "candidate"]
    first_step = next(i for i, line in enumerate(lines) if "event" not in line)
    assert lines.index(next(x for x in lines if x.get("phase") == "base")) < first_step

    end = lines[-1]
    assert end["status"] == "completed" and end["exit_code"] == 0 and "error" not in end
    assert end["total_steps"] == max_steps and end["final_loss"] == steps[-1]["train_loss"]
    assert end["runtime_seconds"] > 0

    assert job.result_path.stat().st_mtime >= job.metrics_path.stat().st_mtime  # result.json comes last
    result = job.result()
    assert set(result) == RESULT_KEYS
    assert result["status"] == "completed" and result["backend"] == backend and result["steps"] == max_steps
    assert result["chat_template"] == cfg["model"]["chat_template"] and result["base_model"] == cfg["model"]["name"]
    assert result["final_train_loss"] == end["final_loss"] and result["first_train_loss"] == steps[0]["train_loss"]
    assert result["eval_loss_before"] == evaluated["base"] and result["eval_loss_after"] == evaluated["candidate"]
    assert result["train_examples"] == 32 and result["eval_examples"] == 4
    # Where the time went, read from the run (not the request): every part measured, the parts within the whole.
    timings = result["timings"]
    assert set(timings) == TIMING_KEYS and all(timings[k] > 0 for k in TIMING_KEYS), timings
    assert sum(timings[k] for k in ("imports", "model_load", "tokenize", "train", "eval", "save")) \
        <= result["runtime_seconds"]
    assert result["tokens_per_s"] > 0 and steps[-1]["max_steps"] == max_steps
    assert result["train_tokens"] >= result["train_trained_tokens"] > 0 and result["dropped_examples"] == 0
    assert result["precision"] == "fp32"  # no mixed precision on a CPU
    if backend == "transformers":  # (Unsloth's CPU fallback keeps some weights in bfloat16: reported as it is)
        assert result["param_dtypes"] == ["float32"]
    assert result["param_dtypes"] and set(result["param_dtypes"]) <= {"float32", "bfloat16", "float16"}
    assert result["load_in_4bit"] is False and result["gradient_checkpointing"] is False
    assert result["padding"] == "free" and result["attn_implementation"] in ("sdpa", "eager")
    versions = result["versions"]
    assert all(versions[k] for k in ("torch", "transformers", "trl", "peft"))
    assert (versions["unsloth"] is not None) == (backend == "unsloth")
    adapter = Path(result["adapter_dir"])
    assert adapter == Path(cfg["training"]["output_dir"], "adapter")
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    # It learned: the loss went down, in training and on the held-out split.
    assert steps[-1]["train_loss"] < steps[0]["train_loss"]
    assert result["eval_loss_after"] < result["eval_loss_before"]
    assert "may not learn to stop" not in job.log  # TRL's warning when the end-of-turn token is not trained
    return steps, result


def check_adapter_loads(job: Job, base: Path) -> dict[str, Any]:
    result = job.result()
    proc = subprocess.run(
        [sys.executable, "-c", PEFT_CHECK, str(base), result["adapter_dir"]],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=trainer_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    info: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["r"] == job.config["lora"]["r"]
    assert info["targets"] == sorted(job.config["lora"]["target_modules"])
    assert info["lora_b_max"] > 0 and info["logit_delta"] > 1e-4  # trained weights that change the output
    assert info["chat_template"] == templates.get(job.config["model"]["chat_template"]).jinja  # for export
    return info


@pytest.fixture(scope="module")
def qwen_job(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Job:
    return run_job(make_job(tmp_path_factory.mktemp("qwen") / "job-a", tiny_models["qwen2"]))


def test_transformers_backend_trains_and_reports(qwen_job: Job, tiny_models: dict[str, Path]) -> None:
    _, result = check_job(qwen_job, "transformers")
    assert result["device"] in ("cpu",) or result["device"].startswith("cuda")
    assert result["champion_adapter"] is None and result["champion_eval_loss"] is None
    assert result["init_adapter"] is None and result["new_examples"] is None
    assert result["new_loss_before"] is result["new_loss_after"] is result["champion_new_loss"] is None
    assert all(result[k] is None for k in RESULT_KEYS if k.startswith(("canary_", "champion_canary")))
    assert result["objective"] == "sft" and all(result[k] is None for k in PREF_KEYS)
    check_adapter_loads(qwen_job, tiny_models["qwen2"])


def test_champion_adapter_is_evaluated_on_the_same_split(
    qwen_job: Job, tiny_models: dict[str, Path], job_factory: Callable[..., Job]
) -> None:
    champion = qwen_job.result()
    job = job_factory("job-b", tiny_models["qwen2"], gate={"champion_adapter": champion["adapter_dir"]})
    job.config["training"]["seed"] = 8  # a different candidate, the same data and split
    _, result = check_job(run_job(job), "transformers")
    assert result["champion_adapter"] == champion["adapter_dir"] and result["champion_error"] is None
    # Same base, same eval split, same masking: the champion scores what it scored when it was the candidate.
    assert result["champion_eval_loss"] == pytest.approx(champion["eval_loss_after"], abs=2e-3)
    assert result["eval_loss_before"] == pytest.approx(champion["eval_loss_before"], abs=2e-3)
    assert [ln["phase"] for ln in job.metrics() if ln.get("event") == "evaluated"] == ["base", "candidate", "champion"]


# ------------------------------------------------------------------------- warm start and the new examples


def small(job: Job, steps: int = 4) -> Job:
    """A few steps at the factory's learning rate (0.01, so the weights move), no evaluation during training."""
    job.config["training"].update(max_steps=steps, logging_steps=1, eval_steps=None)
    return job


def evaluated(job: Job) -> list[tuple[str, float]]:
    return [(ln["phase"], ln["eval_loss"]) for ln in job.metrics() if ln.get("event") == "evaluated"]


def new_examples(job: Job, n: int = 4) -> str:
    """A file of ``n`` new examples (the same learnable kind, other draws) in the job's data folder."""
    path = job.dir / "data" / "new.jsonl"
    rng = random.Random(99)
    path.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(n)))
    return str(path)


def test_warm_start_continues_from_the_adapter(
    qwen_job: Job, tiny_models: dict[str, Path], job_factory: Callable[..., Job]
) -> None:
    a = qwen_job.result()
    job = small(job_factory("job-warm", tiny_models["qwen2"], init={"adapter": a["adapter_dir"]},
                            gate={"champion_adapter": a["adapter_dir"]}))
    result = run_job(job).result()
    assert result["init_adapter"] == a["adapter_dir"] and result["champion_adapter"] == a["adapter_dir"]
    # The starting weights are A's trained ones, not the base's: B starts where A ended, on the same eval split.
    assert result["eval_loss_before"] == pytest.approx(a["eval_loss_after"], abs=1e-4)
    assert result["eval_loss_before"] != pytest.approx(a["eval_loss_before"], abs=1e-2)
    # Warm-started from the champion: its scores are the "before" ones, and it is not loaded a second time.
    assert result["champion_eval_loss"] == result["eval_loss_before"] and result["champion_error"] is None
    assert result["champion_new_loss"] is None and result["new_examples"] is None
    assert [p for p, _ in evaluated(job)] == ["base", "candidate"]
    assert "LoRA tensors loaded from " + a["adapter_dir"] in job.log
    assert math.isfinite(result["eval_loss_after"]) and result["steps"] == 4


def test_new_examples_are_scored_before_after_and_by_the_champion(
    qwen_job: Job, tiny_models: dict[str, Path], job_factory: Callable[..., Job]
) -> None:
    a = qwen_job.result()
    job = small(job_factory("job-new", tiny_models["qwen2"], gate={"champion_adapter": a["adapter_dir"]}))
    new = new_examples(job)
    job.config["dataset"].update(train_path=new, new_path=new)  # trained on exactly the new examples
    result = run_job(job).result()
    assert result["new_examples"] == 4 and result["train_examples"] == 4 and result["init_adapter"] is None
    before, after, champion_new = result["new_loss_before"], result["new_loss_after"], result["champion_new_loss"]
    assert all(isinstance(x, float) and math.isfinite(x) for x in (before, after, champion_new))
    assert after < before  # learnt
    # A champion that is not the start is loaded and scored on both sets.
    assert result["champion_eval_loss"] == pytest.approx(a["eval_loss_after"], abs=2e-3)
    assert evaluated(job) == [
        ("base", result["eval_loss_before"]), ("new_before", before), ("candidate", result["eval_loss_after"]),
        ("new_after", after), ("champion", result["champion_eval_loss"]), ("champion_new", champion_new),
    ]  # fmt: skip


def test_warm_start_from_an_adapter_of_another_shape_exits_2(
    qwen_job: Job, tiny_models: dict[str, Path], job_factory: Callable[..., Job]
) -> None:
    adapter = qwen_job.result()["adapter_dir"]
    job = job_factory("job-r4", tiny_models["qwen2"], init={"adapter": adapter}, lora={"r": 4})
    job.run()
    assert job.proc is not None and job.proc.returncode == 2, job.log[-3000:]
    assert job.proc.stderr.strip().splitlines() == [
        f"[train_qlora] bad config: {job.config_path}: At 'init.adapter': {adapter} does not match 'lora:': "
        "r is 8 in the adapter but lora.r is 4"
    ]
    assert job.metrics()[-1]["exit_code"] == 2 and not job.result_path.exists()

    gone = job_factory("job-gone", tiny_models["qwen2"], init={"adapter": adapter + "-gone"})
    gone.run()
    assert gone.proc is not None and gone.proc.returncode == 2
    assert f"At 'init.adapter': {adapter}-gone is not a directory" in gone.proc.stderr


def test_warm_start_tensors_that_do_not_land_exit_2(
    qwen_job: Job, tiny_models: dict[str, Path], job_factory: Callable[..., Job], tmp_path: Path
) -> None:
    """The same config but tensors named for layers the model lacks: caught by the load check, not ignored."""
    from safetensors.torch import load_file, save_file

    adapter = Path(qwen_job.result()["adapter_dir"])
    moved = tmp_path / "moved-adapter"
    shutil.copytree(adapter, moved)
    weights = load_file(str(moved / "adapter_model.safetensors"))
    save_file({k.replace("layers.0.", "layers.77."): v for k, v in weights.items()},
              str(moved / "adapter_model.safetensors"))
    job = job_factory("job-moved", tiny_models["qwen2"], init={"adapter": str(moved)})
    job.run()
    assert job.proc is not None and job.proc.returncode == 2, job.log[-3000:]
    error = job.metrics()[-1]["error"]
    assert f"At 'init.adapter': {moved} does not fit the model" in error and "layers.77." in error
    assert "have no place in the model" in error and "are not in it" in error


def test_unsloth_warm_start_equals_loading_the_adapter(
    qwen_job: Job, tiny_models: dict[str, Path], job_factory: Callable[..., Job], tmp_path: Path
) -> None:
    """Unsloth: warm-started from A, with a copy of A as the champion (so it is loaded the usual way): the "before"
    losses and the champion's are the same weights' scores, on the eval split and on the new examples."""
    need(UNSLOTH_PYTHON.exists(), f"no Unsloth trainer venv at {UNSLOTH_PYTHON}: run .ci/train-setup.sh")
    adapter = qwen_job.result()["adapter_dir"]
    champion = tmp_path / "champion-copy"
    shutil.copytree(adapter, champion)
    job = small(job_factory("job-unsloth-warm", tiny_models["qwen2"], backend="unsloth", init={"adapter": adapter},
                            gate={"champion_adapter": str(champion)}), steps=2)
    job.config["dataset"]["new_path"] = new_examples(job)
    result = run_job(job, UNSLOTH_PYTHON).result()
    assert result["backend"] == "unsloth" and result["init_adapter"] == adapter and result["new_examples"] == 4
    assert result["champion_error"] is None
    assert result["champion_eval_loss"] == pytest.approx(result["eval_loss_before"], abs=1e-4)
    assert result["champion_new_loss"] == pytest.approx(result["new_loss_before"], abs=1e-4)
    assert math.isfinite(result["new_loss_after"])
    assert [p for p, _ in evaluated(job)] == ["base", "new_before", "candidate", "new_after", "champion",
                                              "champion_new"]


def test_llama_3_template_trains(tiny_models: dict[str, Path], job_factory: Callable[..., Job]) -> None:
    job = job_factory("job-llama", tiny_models["llama"], template="llama-3")
    assert job.config["model"]["chat_template"] == "llama-3.1"
    job.config["training"].update(max_steps=20)
    check_job(run_job(job), "transformers")
    check_adapter_loads(job, tiny_models["llama"])


def test_unsloth_backend_trains_for_real(tiny_models: dict[str, Path], job_factory: Callable[..., Job]) -> None:
    need(UNSLOTH_PYTHON.exists(), f"no Unsloth trainer venv at {UNSLOTH_PYTHON}: run .ci/train-setup.sh")
    job = job_factory("job-unsloth", tiny_models["qwen2"], backend="unsloth")
    assert job.config["model"]["load_in_4bit"] is True  # QLoRA on a GPU; ignored by Unsloth's CPU fallback
    _, result = check_job(run_job(job, UNSLOTH_PYTHON), "unsloth")
    assert result["python"] == str(UNSLOTH_PYTHON)
    assert result["load_in_4bit"] == result["device"].startswith("cuda")
    check_adapter_loads(job, tiny_models["qwen2"])  # an Unsloth adapter loads with plain PEFT in the other venv


# ------------------------------------------------------------------------------- preference objectives


def check_pref_job(job: Job, backend: str = "transformers") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The contract of a kto/dpo job: step lines with TRL's preference metrics, the SFT losses and the preference
    scores in the evaluated lines and in result.json; returns (step lines, result)."""
    lines = job.metrics()
    cfg = job.config
    objective, max_steps = cfg["objective"], cfg["training"]["max_steps"]
    assert lines[0]["event"] == "job_started" and lines[-1]["event"] == "job_finished"
    steps = [line for line in lines if "event" not in line]
    assert [s["step"] for s in steps] == list(range(1, max_steps + 1))
    # A kto batch may hold one kind of example only: TRL then logs that kind's metrics alone.
    assert all(set(s) >= STEP_KEYS | {"grad_norm"} and {"rewards/chosen", "rewards/rejected"} & set(s)
               for s in steps)
    logged = set().union(*steps)
    assert logged >= {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"}
    assert all(math.isfinite(s["train_loss"]) and s["learning_rate"] > 0 for s in steps)
    assert all(("kl" in s) == (objective == "kto") for s in steps)
    assert all("rewards/accuracies" in s and "rewards/margins" in s for s in steps if objective == "dpo")
    with_eval = [s for s in steps if "eval_loss" in s]
    assert [s["step"] for s in with_eval] == list(range(cfg["training"]["eval_steps"], max_steps + 1,
                                                         cfg["training"]["eval_steps"]))
    assert all(math.isfinite(s["eval_loss"]) and "eval_rewards/chosen" in s for s in with_eval)

    result = job.result()
    assert set(result) == RESULT_KEYS
    assert result["objective"] == objective and result["backend"] == backend and result["steps"] == max_steps
    assert result["pref_train_examples"] == 16 and result["pref_eval_examples"] == 8
    assert result["train_examples"] == 32 and result["eval_examples"] == 4  # the SFT splits, evaluated as for sft
    evaluated = {ln["phase"]: ln for ln in lines if ln.get("event") == "evaluated"}
    assert evaluated["base"]["eval_loss"] == result["eval_loss_before"]
    assert evaluated["candidate"]["eval_loss"] == result["eval_loss_after"]
    assert evaluated["base"]["pref_accuracy"] == result["pref_accuracy_before"]
    assert evaluated["candidate"]["pref_accuracy"] == result["pref_accuracy_after"]
    numbers = [result[k] for k in PREF_KEYS if k.startswith(("pref_accuracy", "pref_reward"))]
    assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), result
    assert 0.0 <= result["pref_accuracy_before"] <= 1.0 and 0.0 <= result["pref_accuracy_after"] <= 1.0
    assert (result["pref_desirable_weight"] is None) == (objective == "dpo")
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()
    return steps, result


def fresh_start(result: dict[str, Any]) -> None:
    """A fresh LoRA equals the base: every implicit reward is 0 before training, a tie, which is not correct."""
    assert result["pref_accuracy_before"] == 0.0
    assert result["pref_reward_desirable_before"] == result["pref_reward_undesirable_before"] == 0.0


def test_kto_job_pushes_the_undesirable_completions_down(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    job = run_job(make_pref_job(tmp_path / "job-kto", tiny_models["qwen2"], "kto"))
    steps, result = check_pref_job(job)
    fresh_start(result)
    # The weird sentence lost probability against the reference (the base), the sorted answers gained it.
    assert result["pref_reward_undesirable_after"] < 0.0
    assert result["pref_reward_undesirable_after"] < result["pref_reward_undesirable_before"]
    assert result["pref_reward_desirable_after"] > result["pref_reward_undesirable_after"]
    assert result["pref_accuracy_after"] > result["pref_accuracy_before"]
    assert result["pref_desirable_weight"] == result["pref_undesirable_weight"] == 1.0  # 8 / 8: balanced
    assert "kto: desirable_weight 1.0, undesirable_weight 1.0 (8 desirable / 8 undesirable)" in job.log
    assert all(s["kl"] >= 0.0 for s in steps)


def test_dpo_job_learns_the_pairs(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    job = run_job(make_pref_job(tmp_path / "job-dpo", tiny_models["qwen2"], "dpo"))
    steps, result = check_pref_job(job)
    fresh_start(result)
    assert result["pref_accuracy_after"] >= result["pref_accuracy_before"]
    assert result["pref_accuracy_after"] > 0.5
    assert steps[-1]["rewards/margins"] > 0.0 and "rewards/accuracies" in steps[-1]


def test_kto_warm_start_and_champion_are_scored_like_sft(
    qwen_job: Job, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """Warm-started from an SFT adapter A with A as the champion: A's preference accuracy is the "before" one (no
    second load); a copy of A as the champion is loaded and scores the same."""
    a = qwen_job.result()["adapter_dir"]
    job = run_job(make_pref_job(tmp_path / "job-kto-warm", tiny_models["qwen2"], "kto",
                                init={"adapter": a}, gate={"champion_adapter": a}, training={"max_steps": 4}))
    _, result = check_pref_job(job)
    assert result["init_adapter"] == a and result["champion_error"] is None
    assert result["eval_loss_before"] == pytest.approx(qwen_job.result()["eval_loss_after"], abs=1e-4)
    assert result["champion_pref_accuracy"] == result["pref_accuracy_before"]
    assert result["pref_reward_desirable_before"] != 0.0  # A's weights, not a fresh LoRA: rewards are not ties
    assert [ln["phase"] for ln in job.metrics() if ln.get("event") == "evaluated"] == ["base", "candidate"]

    copy = tmp_path / "champion-copy"
    shutil.copytree(a, copy)
    job2 = run_job(make_pref_job(tmp_path / "job-kto-champion", tiny_models["qwen2"],
                                 "kto", init={"adapter": a}, gate={"champion_adapter": str(copy)},
                                 training={"max_steps": 2, "eval_steps": 2}))
    _, result2 = check_pref_job(job2)
    assert result2["champion_error"] is None
    assert result2["champion_pref_accuracy"] == result2["pref_accuracy_before"] == result["pref_accuracy_before"]
    assert result2["champion_eval_loss"] == pytest.approx(result2["eval_loss_before"], abs=1e-4)
    champion_line = next(ln for ln in job2.metrics() if ln.get("phase") == "champion")
    assert champion_line["pref_accuracy"] == result2["champion_pref_accuracy"]


@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_unsloth_preference_job_trains(objective: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    need(UNSLOTH_PYTHON.exists(), f"no Unsloth trainer venv at {UNSLOTH_PYTHON}: run .ci/train-setup.sh")
    job = make_pref_job(tmp_path / f"job-unsloth-{objective}", tiny_models["qwen2"],
                        objective, backend="unsloth")
    _, result = check_pref_job(run_job(job, UNSLOTH_PYTHON), "unsloth")
    fresh_start(result)
    assert result["pref_accuracy_after"] > result["pref_accuracy_before"]
    assert result["pref_reward_undesirable_after"] < result["pref_reward_undesirable_before"]


def step_lines(path: Path) -> list[dict[str, Any]]:
    """Step lines of a metrics file being written: complete lines only (a reader may catch the last one half-way)."""
    if not path.exists():
        return []
    lines = [json.loads(ln) for ln in path.read_text().split("\n")[:-1]]
    return [ln for ln in lines if "event" not in ln]


def test_sigterm_cancels_with_job_finished(tiny_models: dict[str, Path], job_factory: Callable[..., Job]) -> None:
    job = job_factory("job-term", tiny_models["qwen2"])
    job.config["training"].update(max_steps=5000, logging_steps=1, eval_steps=None)
    job.write()
    proc = subprocess.Popen(
        [sys.executable, str(TRAINER), "--config", str(job.config_path)],
        cwd=job.dir,
        env=trainer_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        waiter = threading.Event()
        for _ in range(int(TIMEOUT_S / 0.2)):  # until two step lines: training is under way
            if len(step_lines(job.metrics_path)) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            waiter.wait(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    end = job.metrics()[-1]
    assert end["event"] == "job_finished" and end["status"] == "cancelled" and end["exit_code"] == 143
    steps = [ln for ln in job.metrics() if "event" not in ln]
    assert 5000 > end["total_steps"] >= steps[-1]["step"] >= 2 and end["final_loss"] == steps[-1]["train_loss"]
    assert not job.result_path.exists()


# The assistant-only loss mask, as the transformers backend computes it, for every template in the table.
MASK_CHECK = r"""
import json, sys
from transformers import AutoTokenizer
from trl.chat_template_utils import get_training_chat_template
cases = json.loads(sys.stdin.read())
out = []
for c in cases:
    tok = AutoTokenizer.from_pretrained(c["model"])
    tok.chat_template = c["training_jinja"]
    tmpl = get_training_chat_template(tok) or tok.chat_template  # TRL's swap for templates it recognises
    enc = tok.apply_chat_template(c["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  chat_template=tmpl)
    masked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    out.append({"masked": tok.decode(masked), "eos": tok.eos_token})
print(json.dumps(out))
"""


def test_assistant_only_loss_masks_exactly_the_answers(tiny_models: dict[str, Path]) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Sort: b a"},
        {"role": "assistant", "content": "Sorted: a b."},
        {"role": "user", "content": "Sort: d c"},
        {"role": "assistant", "content": "Sorted: c d."},
    ]
    if_mistral = messages[1:]  # no system role in Mistral-1
    cases: list[dict[str, Any]] = [
        {"name": t.name, "model": str(tiny_models["llama" if t.name == "llama-3.1" else "qwen2"]),
         "training_jinja": t.training_jinja, "messages": if_mistral if t.name == "mistral" else messages}
        for t in (templates.get(n) for n in templates.names())
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", MASK_CHECK],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=trainer_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for case, got in zip(cases, json.loads(proc.stdout.strip().splitlines()[-1]), strict=True):
        stop = {"qwen-2.5": "<|im_end|>", "chatml": "<|im_end|>", "llama-3.1": "<|eot_id|>"}.get(
            case["name"], got["eos"]
        )
        masked = got["masked"]
        assert "Sort:" not in masked and "Be brief" not in masked, (case["name"], masked)
        assert [part.strip() for part in masked.split(stop) if part.strip()] == ["Sorted: a b.", "Sorted: c d."]
        assert masked.count(stop) == 2, (case["name"], masked)  # each answer's end-of-turn token is trained
