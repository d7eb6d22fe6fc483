"""Helpers for the training e2e tests: datasets, job configs rendered the runner's way, trainer subprocesses.

Needs the training stack in this interpreter and llama.cpp's vocab/template files in the cache, both set up by
``.ci/train-setup.sh``; the Unsloth tests also need ``.venv-unsloth``. Anything missing skips with the reason.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from daemon.publish.converter import default_cache_dir
from daemon.train import templates

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "daemon" / "trainer" / "train_qlora.py"
TINYMODEL = ROOT / "daemon" / "trainer" / "tinymodel.py"
CONFIG_TEMPLATE = ROOT / "configs" / "chatos_qlora.yaml"
# Read at import: the suite's autouse fixture clears CHATOS_RETRAIN_* variables inside each test.
_CACHE = default_cache_dir()
LLAMA_CPP_DIR = Path(os.environ.get("CHATOS_RETRAIN_LLAMA_CPP_DIR") or _CACHE / "llama.cpp-0.3.36")
UNSLOTH_PYTHON = Path(os.environ.get("CHATOS_RETRAIN_UNSLOTH_PYTHON") or ROOT / ".venv-unsloth" / "bin" / "python")
TIMEOUT_S = 600

_WORDS = ("list", "dict", "file", "loop", "sort", "read", "write", "json", "path", "string", "number", "value",
          "error", "class", "return")  # fmt: skip


def training_stack_missing() -> str | None:
    missing = [
        m for m in ("torch", "transformers", "trl", "peft", "datasets", "gguf") if not importlib.util.find_spec(m)
    ]
    return f"{', '.join(missing)} not installed in {sys.executable}: run .ci/train-setup.sh" if missing else None


def trainer_env() -> dict[str, str]:
    """The trainer's environment. One BLAS/OpenMP thread unless told otherwise: on a small shared box two spinning
    threads competing with other work made step times erratic (up to 5x); one thread is steady."""
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}


def conversation(rng: random.Random) -> dict[str, Any]:
    """A short, learnable exchange: the answer lists the question's words in order."""
    words = rng.choices(_WORDS, k=rng.randint(3, 6))
    return {
        "messages": [
            {"role": "user", "content": "Sort: " + " ".join(words)},
            {"role": "assistant", "content": "Sorted: " + " ".join(sorted(words)) + "."},
        ]
    }


def write_dataset(folder: Path, n_train: int = 32, n_eval: int = 4, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for path, n in zip(paths, (n_train, n_eval), strict=True):
        path.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(n)))
    return paths


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class Job:
    """One trainer run: its folder, rendered config and, once run, the process outcome."""

    dir: Path
    config: dict[str, Any]
    proc: subprocess.CompletedProcess[str] | None = None

    @property
    def config_path(self) -> Path:
        return self.dir / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"

    def write(self) -> Job:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False, allow_unicode=True))
        return self

    def run(self, python: Path | str = sys.executable, config_arg: str | None = None) -> Job:
        self.write()
        self.proc = subprocess.run(
            [str(python), str(TRAINER), "--config", config_arg or str(self.config_path)],
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=trainer_env(),
            check=False,
        )
        return self

    @property
    def log(self) -> str:
        assert self.proc is not None
        return self.proc.stdout + self.proc.stderr

    def metrics(self) -> list[dict[str, Any]]:
        # Every line must be complete JSON: json.loads raises on a torn line.
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines()]

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.result_path.read_text())
        return out


def make_job(folder: Path, model: Path | str, *, template: str = "qwen-2.5", **over: Any) -> Job:
    """A job config rendered the runner's way: the shipped template, every path absolute, small fast settings."""
    train, evals = write_dataset(folder / "data")
    base = yaml.safe_load(CONFIG_TEMPLATE.read_text())
    cfg = merge(
        base,
        {
            "job_id": folder.name,
            "backend": "transformers",
            "model": {"name": str(model), "chat_template": templates.get(template).name, "max_seq_length": 256},
            "template": templates.trainer_block(template),
            "dataset": {"train_path": str(train), "eval_path": str(evals)},
            "training": {
                "output_dir": str(folder / "output"),
                "learning_rate": 1e-2,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "warmup_ratio": 0.1,
                "max_steps": 30,
                "logging_steps": 5,
                "eval_steps": 10,
                "save_steps": 0,
                "seed": 7,
            },
            "lora": {"r": 8, "lora_alpha": 16},
            "metrics": {"output_path": str(folder / "metrics.jsonl")},
            "result": {"output_path": str(folder / "result.json")},
        },
    )
    return Job(folder, merge(cfg, over))


# -- preference jobs (objective kto / dpo) ---------------------------------------------------------------------------

WEIRD = "Purple elephants quietly juggle seven moons."  # the undesirable answer: one fixed, unrelated sentence


def preference_example(rng: random.Random, objective: str, desirable: bool = True) -> dict[str, Any]:
    """A sorting prompt; desirable answers sort its words, the undesirable one is always :data:`WEIRD`."""
    messages = conversation(rng)["messages"]
    prompt, good = messages[:1], messages[1:]
    bad = [{"role": "assistant", "content": WEIRD}]
    if objective == "dpo":
        return {"prompt": prompt, "chosen": good, "rejected": bad}
    return {"prompt": prompt, "completion": good if desirable else bad, "label": desirable}


def write_preferences(folder: Path, objective: str, n_train: int = 16, n_eval: int = 8, seed: int = 1
                      ) -> tuple[Path, Path]:
    """kto: alternating desirable / undesirable examples; dpo: pairs. Returns (train, eval) paths."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / f"{objective}-train.jsonl", folder / f"{objective}-eval.jsonl"
    for path, n in zip(paths, (n_train, n_eval), strict=True):
        path.write_text("".join(json.dumps(preference_example(rng, objective, i % 2 == 0)) + "\n" for i in range(n)))
    return paths


def make_pref_job(folder: Path, model: Path | str, objective: str, **over: Any) -> Job:
    """A :func:`make_job` training ``objective`` on :func:`write_preferences`' files: few steps, a high rate."""
    train, evals = write_preferences(folder / "data", objective)
    pref = {
        "objective": objective,
        "dataset": {"pref_train_path": str(train), "pref_eval_path": str(evals)},
        "training": {"max_steps": 8, "learning_rate": 2e-2, "logging_steps": 1, "eval_steps": 4, "warmup_ratio": 0.0},
        "preference": {"beta": 0.1},
    }
    return make_job(folder, model, **merge(pref, over))
