"""A training job as values (pure): its config with every path absolute, its argv, and what its exit code and
``metrics.jsonl`` lines mean. :mod:`daemon.train.runner` writes and runs what this builds.
"""

from __future__ import annotations

import copy
import json
import secrets
import signal
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from daemon import disk
from daemon.train import templates

# The job config template: the seed's shape. configs/chatos_qlora.yaml is this, documented (a test keeps them equal).
DEFAULT_TEMPLATE: dict[str, Any] = {
    "job_id": None,
    "backend": "auto",
    "objective": "sft",
    "model": {"name": None, "chat_template": "qwen-2.5", "max_seq_length": 1024, "load_in_4bit": True},
    "template": None,
    "dataset": {"train_path": None, "eval_path": None, "new_path": None, "canary_path": None,
                "pref_train_path": None, "pref_eval_path": None, "token_cache_dir": None},
    "training": {
        "output_dir": None,
        "learning_rate": 2e-4,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "warmup_ratio": 0.05,
        "weight_decay": 0.01,
        "num_train_epochs": 1,
        "max_steps": 60,
        "logging_steps": 1,
        "eval_steps": 20,
        "save_steps": 0,
        "seed": 3407,
        "padding": "auto",
        "pad_to_multiple_of": 64,
        "gradient_checkpointing": "auto",
        "gpu_fp32": False,
    },
    "lora": {
        "r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "init": {"adapter": None},
    "metrics": {"output_path": None},
    "result": {"output_path": None},
    "gate": {"champion_adapter": None},
    "preference": {"beta": 0.1, "desirable_weight": None, "undesirable_weight": 1.0, "precompute_ref_log_probs": True},
}

# Exit codes of train_qlora.py -> (job status, what it means).
EXIT_MEANING = {
    0: ("succeeded", "ok"),
    2: ("failed", "bad training config"),
    3: ("failed", "data problem"),
    4: ("failed", "out of memory"),
    5: ("failed", "not enough GPU memory for the job (preflight)"),
    1: ("failed", "trainer error"),
    143: ("cancelled", "terminated by SIGTERM"),
}


def new_job_id(now: datetime | None = None) -> str:
    return f"j-{(now or datetime.now(UTC)):%Y%m%dT%H%M%S}-{secrets.token_hex(2)}"


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def effective(template: Mapping[str, Any]) -> dict[str, Any]:
    """The job template with ``training.config_template``'s overrides merged in (batch size, learning rate...)."""
    return _deep_merge(DEFAULT_TEMPLATE, template)


def is_local_model(name: str) -> bool:
    """A local folder (absolute, relative, ``~``) rather than a hub id like ``Qwen/Qwen2.5-0.5B``."""
    return name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def base_weights(base_model: str | None) -> int:
    """The size of a local base model's weights (0 for a hub id: it lives in a cache we do not size)."""
    return disk.weights_bytes(Path(base_model)) if base_model and is_local_model(base_model) else 0


def render_job_config(
    template: Mapping[str, Any],
    *,
    job_id: str,
    job_dir: Path,
    base_model: str,
    chat_template: str,
    backend: str,
    train_path: Path,
    eval_path: Path,
    max_steps: int,
    champion_adapter: Path | None,
    base_dir: Path | None = None,
    init_adapter: Path | None = None,
    new_path: Path | None = None,
    learning_rate: float | None = None,
    objective: str = "sft",
    pref_train_path: Path | None = None,
    pref_eval_path: Path | None = None,
    canary_path: Path | None = None,
    token_cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The trainer's config, with every path absolute (relative ones resolved against ``base_dir``, default cwd).

    ``init_adapter``: the adapter a warm-started run continues from; ``new_path``: the examples new since the
    champion's dataset (evaluated before and after training); ``learning_rate``: the plan's (else the template's);
    ``objective`` sft, kto or dpo, the last two with their preference files ``pref_train_path``/``pref_eval_path``;
    ``canary_path``: the canary set the gate's ``canary`` check compares (evaluated before and after training);
    ``token_cache_dir``: where the trainer keeps the tokenized sets between jobs.
    Raises :class:`templates.UnknownTemplate` for an unknown chat template name.
    """
    base = (base_dir or Path.cwd()).absolute()

    def absolute(p: str | Path) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (base / q).absolute())

    tmpl = templates.get(chat_template)
    job_dir = Path(absolute(job_dir))
    cfg = _deep_merge(DEFAULT_TEMPLATE, template)
    cfg["job_id"] = job_id
    cfg["backend"] = backend
    cfg["model"]["name"] = absolute(base_model) if is_local_model(base_model) else base_model
    cfg["model"]["chat_template"] = tmpl.name
    cfg["template"] = templates.trainer_block(tmpl.name)
    cfg["dataset"] = {"train_path": absolute(train_path), "eval_path": absolute(eval_path),
                      "new_path": absolute(new_path) if new_path else None,
                      "canary_path": absolute(canary_path) if canary_path else None,
                      "token_cache_dir": absolute(token_cache_dir) if token_cache_dir else None}
    if objective != "sft" or pref_train_path or pref_eval_path:
        cfg["objective"] = objective
        cfg["dataset"]["pref_train_path"] = absolute(pref_train_path) if pref_train_path else None
        cfg["dataset"]["pref_eval_path"] = absolute(pref_eval_path) if pref_eval_path else None
    cfg["init"] = {"adapter": absolute(init_adapter) if init_adapter else None}
    cfg["training"]["output_dir"] = str(job_dir / "output")
    cfg["training"]["max_steps"] = int(max_steps)
    if learning_rate is not None:
        cfg["training"]["learning_rate"] = float(learning_rate)
    cfg["metrics"] = {"output_path": str(job_dir / "metrics.jsonl")}
    cfg["result"] = {"output_path": str(job_dir / "result.json")}
    cfg["gate"] = {"champion_adapter": absolute(champion_adapter) if champion_adapter else None}
    return cfg


def trainer_argv(python: Path, script: Path, config: Path) -> list[str]:
    """``[python, /abs/train_qlora.py, --config, /abs/config.yaml]``: absolute paths only, no shell."""
    for p in (python, script, config):
        if not Path(p).is_absolute():
            raise ValueError(f"not an absolute path: {p}")
    return [str(python), str(script), "--config", str(config)]


def interpret_exit(code: int | None) -> tuple[str, str]:
    """An exit status -> (job status, reason)."""
    if code is None:
        return "failed", "no exit status"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return "failed", f"killed by {name}"
    return EXIT_MEANING.get(code, ("failed", f"trainer exited with status {code}"))


def parse_metrics(buf: bytes) -> tuple[list[dict[str, Any]], bytes]:
    """Complete JSON lines of ``buf`` (garbage lines skipped) and the incomplete rest."""
    *lines, rest = buf.split(b"\n")
    out = []
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out, rest
