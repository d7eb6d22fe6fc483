"""The training job's config: a table of its keys (kind, default) and the one function that checks a value's kind.

Pure but for :func:`load_config` (reads the file) and the adapter checks (the champion's and the warm start's files
exist; the warm start's ``adapter_config.json`` matches ``lora:``, see ``qlora_init``): raw YAML mapping -> normalised
config dict, or every problem as ``At 'section.key': message``. The contract is documented in
``configs/chatos_qlora.yaml``; the service writes it (``daemon.train.jobspec.render_job_config``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from qlora_init import adapter_problem
from trainer_common import ConfigError

BACKENDS = ("auto", "unsloth", "transformers")
OBJECTIVES = ("sft", "kto", "dpo")
PADDINGS = ("auto", "free", "bucket", "longest")  # qlora_sft.PADDINGS
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REQUIRED = object()

# A kind is one of: "str" (non-blank), "text" (non-empty, blanks allowed), "abs" (an absolute path, normalised),
# "abs?" (the same, or ""/null for none), "model" (a hub id or an absolute folder), "bool", "strs" (a non-empty list of
# non-empty strings), "modules" ("all-linear" or "strs"), "int", ">=N" (an integer >= N), "steps" (-1 or >= 1), an
# interval of numbers such as "(0.0, inf)" or "[0.0, 1.0)" (its text is also the error message), or a tuple of choices.
Kind = str | tuple[str, ...]

# section -> key -> (kind, default); a None section name holds the top-level scalars.
SCHEMA: dict[str | None, dict[str, tuple[Kind, Any]]] = {
    None: {"job_id": ("str", None), "backend": (BACKENDS, "auto"), "objective": (OBJECTIVES, "sft")},
    "model": {
        "name": ("model", REQUIRED),
        "chat_template": ("str", REQUIRED),
        "max_seq_length": (">=16", 2048),
        "load_in_4bit": ("bool", True),
    },
    "template": {
        "name": ("str", REQUIRED),
        "jinja": ("text", REQUIRED),
        "training_jinja": ("text", None),
        "instruction_part": ("text", REQUIRED),
        "response_part": ("text", REQUIRED),
        "stop": ("strs", REQUIRED),
        "known_names": ("strs", None),
    },
    "dataset": {
        "train_path": ("abs", REQUIRED),
        "eval_path": ("abs", REQUIRED),
        "new_path": ("abs?", None),
        "canary_path": ("abs?", None),
        "pref_train_path": ("abs?", None),
        "pref_eval_path": ("abs?", None),
        "token_cache_dir": ("abs?", None),
    },
    "training": {
        "output_dir": ("abs", REQUIRED),
        "learning_rate": ("(0.0, inf)", 2e-4),
        "per_device_train_batch_size": (">=1", 2),
        "gradient_accumulation_steps": (">=1", 4),
        "warmup_ratio": ("[0.0, 1.0)", 0.03),
        "weight_decay": ("[0.0, inf)", 0.01),
        "num_train_epochs": ("(0.0, inf)", 1.0),
        "max_steps": ("steps", -1),
        "logging_steps": (">=1", 1),
        "eval_steps": (">=1", None),
        "save_steps": (">=0", 0),
        "seed": ("int", 3407),
        "padding": (PADDINGS, "auto"),
        "pad_to_multiple_of": (">=1", 64),
        "gradient_checkpointing": (("auto", "on", "off"), "auto"),
        "gpu_fp32": ("bool", False),
    },
    "lora": {
        "r": (">=1", 16),
        "lora_alpha": ("(0.0, inf)", 16.0),
        "lora_dropout": ("[0.0, 1.0)", 0.0),
        "target_modules": ("modules", DEFAULT_TARGET_MODULES),
    },
    "init": {"adapter": ("abs?", None)},
    "metrics": {"output_path": ("abs", REQUIRED)},
    "result": {"output_path": ("abs?", None)},
    "gate": {"champion_adapter": ("abs?", None)},
    "preference": {
        "beta": ("(0.0, inf)", 0.1),
        "desirable_weight": ("(0.0, inf)", None),  # None: chosen from the counts (qlora_pref.kto_weights)
        "undesirable_weight": ("(0.0, inf)", 1.0),
        "precompute_ref_log_probs": ("bool", True),
    },
}
PREF_PATHS = ("pref_train_path", "pref_eval_path")


def check(kind: Kind, v: Any) -> Any:
    """``v`` as the config holds it, or ValueError with the message after ``At 'key': ``."""
    if isinstance(kind, tuple):
        if v not in kind:
            raise ValueError(f"must be one of {', '.join(kind)}, got {v!r}")
        return str(v)
    if kind[0] in "([":
        lo, hi = (float(x) for x in kind[1:-1].split(","))
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError("must be a number")
        if v < lo or v > hi or (kind[0] == "(" and v == lo) or (kind[-1] == ")" and v == hi):
            raise ValueError(f"must be in {kind}")
        return float(v)
    if kind in ("int", "steps") or kind.startswith(">="):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be an integer")
        least = -1 if kind == "steps" else int(kind[2:]) if kind != "int" else None
        if least is not None and v < least:
            raise ValueError(f"must be >= {least}")
        if kind == "steps" and v == 0:
            raise ValueError("must be -1 (use num_train_epochs) or >= 1")
        return v
    if kind == "bool":
        if not isinstance(v, bool):
            raise ValueError("must be true or false")
        return v
    if kind in ("strs", "modules"):
        if kind == "modules" and v == "all-linear":
            return v
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise ValueError("must be a non-empty list of strings")
        return list(v)
    return _string(kind, v)


def _string(kind: str, v: Any) -> str | None:
    """The string kinds: "str", "text", "abs", "abs?" and "model"."""
    if kind == "abs?" and v == "":
        return None
    if not isinstance(v, str) or not (v if kind == "text" else v.strip()):
        raise ValueError("must be a non-empty string")
    if kind in ("abs", "abs?"):
        if v.startswith("~") or not os.path.isabs(v):
            raise ValueError(f"must be an absolute path, got {v!r}")
        return os.path.normpath(v)
    if kind == "model":  # a relative path is the seed's bug 1, refused
        if os.path.isabs(v):
            if not os.path.isdir(v):
                raise ValueError(f"{v} is not a directory")
            return os.path.normpath(v)
        if v.startswith((".", "~")) or os.sep + "." in v or os.path.exists(v):
            raise ValueError(f"must be an absolute path or a hub id, got the relative path {v!r}")
    return v


def validate(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """Normalise a parsed YAML document; returns (config, problems). Unknown keys are problems, not ignored."""
    if not isinstance(raw, dict):
        return {}, ["At '<root>': must be a mapping"]
    problems = [f"At {key!r}: unknown key" for key in raw if key not in SCHEMA and key not in SCHEMA[None]]
    cfg: dict[str, Any] = {}
    for section, fields in SCHEMA.items():
        if section is None:
            _fill(raw, fields, "", cfg, problems)
            continue
        src = raw.get(section)
        if src is not None and not isinstance(src, dict):
            problems.append(f"At {section!r}: must be a mapping")
        into = cfg.setdefault(section, {})
        if section == "template" and not isinstance(src, dict):
            continue  # reported once, with the known names, by _check_template
        src = src if isinstance(src, dict) else {}
        problems += [f"At '{section}.{key}': unknown key" for key in src if key not in fields]
        _fill(src, fields, f"{section}.", into, problems)
    problems.extend(_check_template(raw, cfg))
    problems.extend(_check_objective(cfg))
    if not problems:
        champion = cfg["gate"]["champion_adapter"]
        if champion is not None and not Path(champion, "adapter_config.json").is_file():
            problems.append(f"At 'gate.champion_adapter': no adapter_config.json in {champion}")
        init = cfg["init"]["adapter"]
        why = adapter_problem(init, cfg["lora"]) if init is not None else None
        if why is not None:
            problems.append(f"At 'init.adapter': {why}")
    return cfg, problems


def _fill(src: dict[Any, Any], fields: dict[str, tuple[Kind, Any]], prefix: str, into: dict[str, Any],
          problems: list[str]) -> None:
    """Check one section's keys into ``into``: missing ones take their default, or are a problem when required."""
    for key, (kind, default) in fields.items():
        if src.get(key) is None:
            if default is REQUIRED:
                problems.append(f"At '{prefix}{key}': required")
            else:
                into[key] = default
            continue
        try:
            into[key] = check(kind, src[key])
        except ValueError as e:
            problems.append(f"At '{prefix}{key}': {e}")


def _check_template(raw: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The configured name must be the one the rendered ``template:`` block carries."""
    wanted = cfg.get("model", {}).get("chat_template")
    block = raw.get("template")
    if wanted is None:
        return []
    if not isinstance(block, dict):
        return [
            f"At 'template': required: the rendered data of chat template {wanted!r} "
            "(the service writes it from its template table; see configs/chatos_qlora.yaml)"
        ]
    have = cfg.get("template", {}).get("name")
    if have is not None and have != wanted:
        known = cfg["template"].get("known_names") or [have]
        return [f"At 'model.chat_template': unknown chat template {wanted!r}; known: {', '.join(known)}"]
    return []


def _check_objective(cfg: dict[str, Any]) -> list[str]:
    """kto and dpo need both preference files; sft takes none (they would silently do nothing)."""
    objective, dataset = cfg.get("objective"), cfg.get("dataset", {})
    if objective is None:  # itself a problem, already listed
        return []
    if objective == "sft":
        return [f"At 'dataset.{key}': only with objective kto or dpo (objective is {objective!r})"
                for key in PREF_PATHS if dataset.get(key) is not None]
    return [f"At 'dataset.{key}': required with objective {objective!r}" for key in PREF_PATHS
            if key in dataset and dataset[key] is None]


def load_config(path: str) -> dict[str, Any]:
    """Read and validate the job config; :class:`ConfigError` carries every problem, joined on one line."""
    if not os.path.isabs(path):
        raise ConfigError(f"--config must be an absolute path, got {path!r}")
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read: {' '.join(str(e).split())}") from None
    cfg, problems = validate(raw)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems), raw)
    if cfg["job_id"] is None:
        cfg["job_id"] = os.environ.get("CHATOS_JOB_ID") or Path(cfg["training"]["output_dir"]).name
    return cfg


def result_path(cfg: dict[str, Any]) -> str:
    """``result.output_path``, else ``result.json`` beside the metrics file (the job dir, in the runner's layout)."""
    return cfg["result"]["output_path"] or str(Path(cfg["metrics"]["output_path"]).with_name("result.json"))
