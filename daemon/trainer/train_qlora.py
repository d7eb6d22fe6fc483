"""LoRA/QLoRA fine-tuning job: one absolute YAML config in, ``metrics.jsonl`` + adapter + ``result.json`` out.

Runs under the *trainer's* interpreter (possibly a separate Unsloth venv), by absolute path:

    /path/to/python /abs/daemon/trainer/train_qlora.py --config /abs/jobs/<id>/config.yaml

It imports nothing from the service package (the chat template arrives rendered in the config's ``template:``
block) and keeps torch & co. inside :func:`main`'s callees, so a bad config fails in a fraction of a second.
The config contract is documented in ``configs/chatos_qlora.yaml``.

Outputs, in this order:
  * ``metrics.output_path`` (JSON lines, one complete line per write): ``{"event": "job_started", ...}``, step lines
    ``{"job_id", "step", "train_loss", "eval_loss"?, "epoch", "learning_rate", "tokens_per_s", "timestamp"}``,
    ``{"event": "evaluated", "phase": "base"|"candidate"|"champion", "eval_loss"}``, and last
    ``{"event": "job_finished", "status", "final_loss", "total_steps", "runtime_seconds", "error"?}``;
  * ``training.output_dir/adapter/`` (PEFT adapter + tokenizer with the inference chat template);
  * ``result.json`` (``result.output_path``, default next to the metrics file), atomically, only on success.

Exit codes: 0 ok, 1 anything else, 2 bad config, 3 data problem, 4 out of memory, 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_OOM = 4
EXIT_TERMINATED = 128 + signal.SIGTERM

BACKENDS = ("auto", "unsloth", "transformers")
ROLES = ("system", "user", "assistant")
VERSIONED = ("torch", "transformers", "trl", "peft", "unsloth")
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class JobError(Exception):
    """An expected failure: one line for the operator and the exit code that names it."""

    exit_code = EXIT_FAILED


class ConfigError(JobError):
    exit_code = EXIT_CONFIG

    def __init__(self, message: str, raw: Any = None) -> None:
        super().__init__(message)
        self.raw = raw  # the parsed YAML, if any: main() still reports into its metrics path when usable


class DataError(JobError):
    exit_code = EXIT_DATA


class Terminated(BaseException):
    """SIGTERM arrived (timeout or cancel from the runner); unwinds like KeyboardInterrupt."""


# --------------------------------------------------------------------------------------------------------- config
# Pure: raw YAML mapping -> normalised config dict, or every problem as "At 'section.key': message".

_Check = Callable[[Any], Any]


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("must be a non-empty string")
    return v


def _abs_path(v: Any) -> str:
    s = _str(v)
    if not os.path.isabs(os.path.expanduser(s)) or s.startswith("~"):
        raise ValueError(f"must be an absolute path, got {s!r}")
    return os.path.normpath(s)


def _opt_abs_path(v: Any) -> str | None:
    return None if v is None or v == "" else _abs_path(v)


def _model_name(v: Any) -> str:
    """A hub id (``org/name``) or an absolute local dir; a relative path is the seed's bug 1, refused."""
    s = _str(v)
    if os.path.isabs(s):
        if not os.path.isdir(s):
            raise ValueError(f"{s} is not a directory")
        return os.path.normpath(s)
    if s.startswith((".", "~")) or os.sep + "." in s or os.path.exists(s):
        raise ValueError(f"must be an absolute path or a hub id, got the relative path {s!r}")
    return s


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _int(lo: int | None = None) -> _Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be an integer")
        if lo is not None and v < lo:
            raise ValueError(f"must be >= {lo}")
        return v

    return check


def _opt_int(lo: int) -> _Check:
    inner = _int(lo)
    return lambda v: None if v is None else inner(v)


def _max_steps(v: Any) -> int:
    v = _int(-1)(v)
    if v == 0:
        raise ValueError("must be -1 (use num_train_epochs) or >= 1")
    return v


def _float(lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False) -> _Check:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError("must be a number")
        if v < lo or (lo_open and v == lo) or (hi is not None and (v > hi or (hi_open and v == hi))):
            lo_s = f"{'(' if lo_open else '['}{lo}"
            hi_s = f"{hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
            raise ValueError(f"must be in {lo_s}, {hi_s}")
        return float(v)

    return check


def _backend(v: Any) -> str:
    if v not in BACKENDS:
        raise ValueError(f"must be one of {', '.join(BACKENDS)}, got {v!r}")
    return str(v)


def _str_list(v: Any) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise ValueError("must be a non-empty list of strings")
    return list(v)


def _target_modules(v: Any) -> list[str] | str:
    if v == "all-linear":
        return v
    return _str_list(v)


def _text(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError("must be a non-empty string")
    return v


REQUIRED = object()

# section -> key -> (check, default); a None section name holds the top-level scalars.
SCHEMA: dict[str | None, dict[str, tuple[_Check, Any]]] = {
    None: {"job_id": (_str, None), "backend": (_backend, "auto")},
    "model": {
        "name": (_model_name, REQUIRED),
        "chat_template": (_str, REQUIRED),
        "max_seq_length": (_int(16), 2048),
        "load_in_4bit": (_bool, True),
    },
    "template": {
        "name": (_str, REQUIRED),
        "jinja": (_text, REQUIRED),
        "training_jinja": (_text, None),
        "instruction_part": (_text, REQUIRED),
        "response_part": (_text, REQUIRED),
        "stop": (_str_list, REQUIRED),
        "known_names": (_str_list, None),
    },
    "dataset": {"train_path": (_abs_path, REQUIRED), "eval_path": (_abs_path, REQUIRED)},
    "training": {
        "output_dir": (_abs_path, REQUIRED),
        "learning_rate": (_float(0.0, lo_open=True), 2e-4),
        "per_device_train_batch_size": (_int(1), 2),
        "gradient_accumulation_steps": (_int(1), 4),
        "warmup_ratio": (_float(0.0, 1.0, hi_open=True), 0.03),
        "weight_decay": (_float(0.0), 0.01),
        "num_train_epochs": (_float(0.0, lo_open=True), 1.0),
        "max_steps": (_max_steps, -1),
        "logging_steps": (_int(1), 1),
        "eval_steps": (_opt_int(1), None),
        "save_steps": (_int(0), 0),
        "seed": (_int(), 3407),
    },
    "lora": {
        "r": (_int(1), 16),
        "lora_alpha": (_float(0.0, lo_open=True), 16.0),
        "lora_dropout": (_float(0.0, 1.0, hi_open=True), 0.0),
        "target_modules": (_target_modules, DEFAULT_TARGET_MODULES),
    },
    "metrics": {"output_path": (_abs_path, REQUIRED)},
    "result": {"output_path": (_opt_abs_path, None)},
    "gate": {"champion_adapter": (_opt_abs_path, None)},
}


def validate(raw: Any) -> tuple[dict[str, Any], list[str]]:
    """Normalise a parsed YAML document; returns (config, problems). Unknown keys are problems, not ignored."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        return {}, ["At '<root>': must be a mapping"]
    cfg: dict[str, Any] = {}
    for key in raw:
        if key not in SCHEMA and key not in SCHEMA[None]:
            problems.append(f"At {key!r}: unknown key")
    for section, fields in SCHEMA.items():
        if section is None:
            src, into, prefix = raw, cfg, ""
        else:
            src = raw.get(section)
            if src is None:
                src = {}
            elif not isinstance(src, dict):
                problems.append(f"At {section!r}: must be a mapping")
                src = {}
            into = cfg.setdefault(section, {})
            prefix = f"{section}."
            if section == "template" and not isinstance(raw.get(section), dict):
                continue  # reported once, with the known names, by _check_template
            for key in src:
                if key not in fields:
                    problems.append(f"At '{prefix}{key}': unknown key")
        for key, (check, default) in fields.items():
            if src.get(key) is None:
                if default is REQUIRED:
                    problems.append(f"At '{prefix}{key}': required")
                else:
                    into[key] = default
                continue
            try:
                into[key] = check(src[key])
            except ValueError as e:
                problems.append(f"At '{prefix}{key}': {e}")
    problems.extend(_check_template(raw, cfg))
    if not problems:
        champion = cfg["gate"]["champion_adapter"]
        if champion is not None and not Path(champion, "adapter_config.json").is_file():
            problems.append(f"At 'gate.champion_adapter': no adapter_config.json in {champion}")
    return cfg, problems


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


# ----------------------------------------------------------------------------------------------------------- data


def read_examples(path: str, key: str) -> list[list[dict[str, str]]]:
    """Conversations of a ``{"messages": [{"role", "content"}, ...]}`` JSONL file; :class:`DataError` otherwise."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"At '{key}': {path} not found")
    examples: list[list[dict[str, str]]] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not JSON ({e.msg})") from None
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            if not isinstance(msgs, list) or not msgs:
                raise DataError(f"{where}: no 'messages' list")
            clean = []
            for m in msgs:
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise DataError(f"{where}: each message needs a role in {ROLES} and a string content")
                clean.append({"role": m["role"], "content": m["content"]})
            if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
                raise DataError(f"{where}: no assistant message with content")
            examples.append(clean)
    if not examples:
        raise DataError(f"At '{key}': {path} holds no examples")
    return examples


# -------------------------------------------------------------------------------------------------------- metrics


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _num(v: Any) -> float | None:
    """A JSON-safe float: NaN/inf (a diverged loss) become null rather than invalid JSON."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class MetricsLog:
    """Append-only JSON lines; each record is one ``write(2)`` of a complete line, so a tailer never sees half."""

    def __init__(self, path: str, job_id: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.job_id = job_id

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"job_id": self.job_id, **record, "timestamp": utcnow()}, allow_nan=False) + "\n"
        os.write(self.fd, line.encode())

    def event(self, name: str, **fields: Any) -> None:
        self.write({"event": name, **fields})

    def close(self) -> None:
        os.close(self.fd)


def write_json_atomic(path: str, obj: dict[str, Any]) -> None:
    """tmp + fsync + rename: readers see no file or the whole file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def result_path(cfg: dict[str, Any]) -> str:
    """``result.output_path``, else ``result.json`` beside the metrics file (the job dir, in the runner's layout)."""
    return cfg["result"]["output_path"] or str(Path(cfg["metrics"]["output_path"]).with_name("result.json"))


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError, or an allocator RuntimeError, possibly chained."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return True
        if isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:2000]


def say(msg: str) -> None:
    print(f"[train_qlora] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- training


def run(
    cfg: dict[str, Any], train: list[Any], evals: list[Any], log: MetricsLog, progress: dict[str, Any]
) -> dict[str, Any]:
    """Load, evaluate the base, train, evaluate, save the adapter, evaluate the champion. Heavy imports live here.

    ``progress`` (last step and train loss) is kept current so that a failed or cancelled run still reports them.
    """
    name = cfg["model"]["name"]
    if os.path.isabs(name):
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local base must never trigger a hub lookup
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    cuda = torch.cuda.is_available()
    backend = cfg["backend"]
    if backend == "auto":
        backend = "transformers"
        if cuda:
            try:
                import unsloth

                backend = "unsloth"
            except Exception as e:
                say(f"auto backend: unsloth unavailable ({one_line(e)}); using transformers")
    elif backend == "unsloth":
        try:
            import unsloth  # noqa: F401
        except Exception as e:
            raise ConfigError(f"backend 'unsloth' but {sys.executable} cannot import unsloth: {one_line(e)}") from e
    say(f"backend {backend} on {'cuda' if cuda else 'cpu'}; model {name}; template {cfg['model']['chat_template']}")

    recorder = _make_callback(log, progress)  # after `import unsloth`: it imports transformers
    build = _unsloth_trainer if backend == "unsloth" else _transformers_trainer
    trainer, model, tok, info = build(cfg, train, evals, cuda, recorder)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_loss = _num(trainer.evaluate().get("eval_loss"))
    log.event("evaluated", phase="base", eval_loss=base_loss)

    started = time.monotonic()
    try:
        out = trainer.train()
    finally:
        recorder.flush()  # a cancelled or crashed run still reports its last logged step
    train_seconds = time.monotonic() - started

    after_loss = _num(trainer.evaluate().get("eval_loss"))
    log.event("evaluated", phase="candidate", eval_loss=after_loss)

    adapter_dir = Path(cfg["training"]["output_dir"], "adapter")
    partial = adapter_dir.with_name("adapter.partial")
    for stale in (partial, adapter_dir):
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(str(partial))
    tok.chat_template = cfg["template"]["jinja"]  # the inference template (no generation markers) for export
    tok.save_pretrained(str(partial))
    os.replace(partial, adapter_dir)

    champion = cfg["gate"]["champion_adapter"]
    champion_loss: float | None = None
    champion_error: str | None = None
    if champion is not None:
        try:
            model.load_adapter(champion, adapter_name="champion")
            model.set_adapter("champion")
            champion_loss = _num(trainer.evaluate().get("eval_loss"))
            model.set_adapter("default")
            model.delete_adapter("champion")
            log.event("evaluated", phase="champion", eval_loss=champion_loss)
        except Exception as e:
            if is_oom(e):
                raise
            champion_error = one_line(e)
            say(f"champion adapter could not be evaluated: {champion_error}")

    peak_gpu = int(torch.cuda.max_memory_allocated()) if cuda else None
    steps = int(trainer.state.global_step)
    return {
        "backend": backend,
        "adapter_dir": str(adapter_dir),
        "first_train_loss": recorder.first_loss,
        "final_train_loss": recorder.last_loss,
        "train_loss_mean": _num(out.training_loss),
        "eval_loss_before": base_loss,
        "eval_loss_after": after_loss,
        "champion_adapter": champion,
        "champion_eval_loss": champion_loss,
        "champion_error": champion_error,
        "steps": steps,
        "epochs": _num(trainer.state.epoch),
        "train_runtime_seconds": round(train_seconds, 3),
        "tokens_per_s": _num(recorder.tokens / train_seconds) if recorder.tokens and train_seconds > 0 else None,
        "peak_gpu_memory_bytes": peak_gpu,
        **info,
    }


def _make_callback(log: MetricsLog, progress: dict[str, Any]) -> Any:
    """A TrainerCallback writing ChatOS step lines; created here because the base class lives in transformers."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):  # type: ignore[misc]
        """One step line per train log; an in-training eval at the same step is merged into that line."""

        def __init__(self) -> None:
            self.training = False
            self.pending: dict[str, Any] | None = None
            self.first_loss: float | None = None
            self.last_loss: float | None = None
            self.tokens = 0.0
            self._mark = (0.0, time.monotonic())

        def flush(self) -> None:
            if self.pending is not None:
                log.write(self.pending)
                self.pending = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.training = True
            self._mark = (0.0, time.monotonic())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.flush()  # the previous step's line: no eval can join it any more

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if not self.training or not logs:
                return
            step = int(state.global_step)
            if "loss" in logs:
                self.flush()
                now = time.monotonic()
                tokens = _num(logs.get("num_tokens"))
                tps = None
                if tokens is not None:
                    seen, then = self._mark
                    tps = _num((tokens - seen) / (now - then)) if now > then else None
                    self._mark = (tokens, now)
                    self.tokens = tokens
                loss = _num(logs["loss"])
                if self.first_loss is None:
                    self.first_loss = loss
                self.last_loss = loss
                progress.update(step=step, loss=loss)
                self.pending = {
                    "step": step,
                    "train_loss": loss,
                    "epoch": _num(logs.get("epoch")),
                    "learning_rate": _num(logs.get("learning_rate")),
                    "tokens_per_s": round(tps, 1) if tps is not None else None,
                }
            elif "eval_loss" in logs:
                eval_loss = _num(logs["eval_loss"])
                if self.pending is not None and self.pending["step"] == step:
                    self.pending["eval_loss"] = eval_loss
                    self.flush()
                else:
                    self.flush()
                    log.write(
                        {
                            "step": step,
                            "train_loss": self.last_loss,
                            "eval_loss": eval_loss,
                            "epoch": _num(logs.get("epoch")),
                            "learning_rate": None,
                            "tokens_per_s": None,
                        }
                    )

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.flush()
            self.training = False

    return MetricsCallback()


def _sft_args(cfg: dict[str, Any], cuda: bool, bf16: bool, **extra: Any) -> dict[str, Any]:
    """SFTConfig keyword arguments shared by both backends (TRL 1.15 and 1.16 spell them the same)."""
    t = cfg["training"]
    evals_every = t["eval_steps"]
    return {
        "output_dir": str(Path(t["output_dir"], "checkpoints")),
        "learning_rate": t["learning_rate"],
        "per_device_train_batch_size": t["per_device_train_batch_size"],
        "per_device_eval_batch_size": t["per_device_train_batch_size"],
        "gradient_accumulation_steps": t["gradient_accumulation_steps"],
        "warmup_steps": t["warmup_ratio"],  # transformers 5: a float in [0, 1) is a ratio of the total steps
        "weight_decay": t["weight_decay"],
        "num_train_epochs": t["num_train_epochs"],
        "max_steps": t["max_steps"],
        "logging_steps": t["logging_steps"],
        "eval_strategy": "steps" if evals_every else "no",
        "eval_steps": evals_every,
        "save_strategy": "steps" if t["save_steps"] else "no",  # 0: no intermediate checkpoints
        "save_steps": t["save_steps"] or 500,
        "save_total_limit": 2,
        "seed": t["seed"],
        "max_length": cfg["model"]["max_seq_length"],
        "bf16": bf16,
        "fp16": False,
        "use_cpu": not cuda,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "packing": False,
        **extra,
    }


def _checkpointing(config_cls: Any, on: bool) -> dict[str, bool]:
    """Activation checkpointing on a GPU only (it only costs time on a CPU); transformers 5.24 renamed the field."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def _transformers_trainer(
    cfg: dict[str, Any], train: list[Any], evals: list[Any], cuda: bool, recorder: Any
) -> tuple[Any, ...]:
    """TRL SFTTrainer + PEFT LoRA; loss on assistant tokens via the template (TRL-recognised or with markers)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    m, lora = cfg["model"], cfg["lora"]
    tok = AutoTokenizer.from_pretrained(m["name"])
    tok.chat_template = cfg["template"]["training_jinja"] or cfg["template"]["jinja"]
    bf16 = cuda and torch.cuda.is_bf16_supported()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if bf16 else torch.float32}
    four_bit = False
    if m["load_in_4bit"] and cuda and importlib.util.find_spec("bitsandbytes") is None:
        say("load_in_4bit ignored: bitsandbytes is not installed in this interpreter")
    elif m["load_in_4bit"] and cuda:
        try:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"],
            )
            kwargs["device_map"] = {"": 0}
            four_bit = True
        except Exception as e:
            say(f"load_in_4bit ignored: {one_line(e)}")
    elif m["load_in_4bit"]:
        say("load_in_4bit ignored: no GPU (training the full-precision base)")
    model = AutoModelForCausalLM.from_pretrained(m["name"], **kwargs)
    if four_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora["r"],
            lora_alpha=lora["lora_alpha"],
            lora_dropout=lora["lora_dropout"],
            target_modules=lora["target_modules"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    args = SFTConfig(**_sft_args(cfg, cuda, bf16, assistant_only_loss=True, **_checkpointing(SFTConfig, cuda)))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list([{"messages": x} for x in train]),
        eval_dataset=Dataset.from_list([{"messages": x} for x in evals]),
        processing_class=tok,
        callbacks=[recorder],
    )
    dtype = "nf4+" + str(kwargs["dtype"]).removeprefix("torch.") if four_bit else str(kwargs["dtype"])
    return (
        trainer,
        model,
        tok,
        {"device": _device(cuda), "dtype": dtype.removeprefix("torch."), "load_in_4bit": four_bit},
    )


def _unsloth_trainer(
    cfg: dict[str, Any], train: list[Any], evals: list[Any], cuda: bool, recorder: Any
) -> tuple[Any, ...]:
    """Unsloth FastLanguageModel + its chat template + ``train_on_responses_only`` + TRL SFTTrainer."""
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel, is_bfloat16_supported
    from unsloth.chat_templates import get_chat_template, train_on_responses_only

    m, lora, tpl = cfg["model"], cfg["lora"], cfg["template"]
    four_bit = bool(m["load_in_4bit"] and cuda)
    if m["load_in_4bit"] and not cuda:
        say("load_in_4bit ignored: no GPU (Unsloth's CPU fallback trains the full-precision base)")
    model, tok = FastLanguageModel.from_pretrained(
        model_name=m["name"], max_seq_length=m["max_seq_length"], dtype=None, load_in_4bit=four_bit
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora["r"],
        lora_alpha=lora["lora_alpha"],
        lora_dropout=lora["lora_dropout"],
        target_modules=lora["target_modules"],
        bias="none",
        use_gradient_checkpointing="unsloth" if cuda else False,
        random_state=cfg["training"]["seed"],
    )
    tok = get_chat_template(tok, chat_template=m["chat_template"])
    if tok.chat_template != tpl["jinja"]:
        # Same format family, but the table's text is what the GGUF will embed: train on exactly that.
        say(f"using the configured {m['chat_template']!r} template text instead of Unsloth's variant")
        tok.chat_template = tpl["jinja"]

    def to_text(ex: dict[str, Any]) -> dict[str, str]:
        return {"text": tok.apply_chat_template(ex["messages"], tokenize=False)}

    train_ds = Dataset.from_list([{"messages": x} for x in train]).map(to_text, remove_columns=["messages"])
    eval_ds = Dataset.from_list([{"messages": x} for x in evals]).map(to_text, remove_columns=["messages"])
    bf16 = bool(is_bfloat16_supported())
    args = SFTConfig(**_sft_args(cfg, cuda, bf16, dataset_text_field="text"))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[recorder],
    )
    trainer = train_on_responses_only(
        trainer, instruction_part=tpl["instruction_part"], response_part=tpl["response_part"]
    )
    dtype = ("nf4+" if four_bit else "") + str(getattr(model, "dtype", "")).removeprefix("torch.")
    return trainer, model, tok, {"device": _device(cuda), "dtype": dtype, "load_in_4bit": four_bit}


def _device(cuda: bool) -> str:
    if not cuda:
        return "cpu"
    import torch

    return f"cuda:{torch.cuda.get_device_name(0)}"


# ----------------------------------------------------------------------------------------------------------- entry


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a LoRA adapter from an absolute job config (see module docstring).")
    p.add_argument("--config", required=True, help="ABSOLUTE path of the job's YAML config")
    return p


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = make_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        say(f"bad config: {e}")
        _report_early_failure(e.raw, str(e), t0)
        return EXIT_CONFIG

    log = MetricsLog(cfg["metrics"]["output_path"], cfg["job_id"])
    log.event(
        "job_started",
        pid=os.getpid(),
        backend=cfg["backend"],
        model=cfg["model"]["name"],
        chat_template=cfg["model"]["chat_template"],
        max_steps=cfg["training"]["max_steps"],
        python=sys.executable,
    )
    status, code, error, outcome = "failed", EXIT_FAILED, None, None
    progress: dict[str, Any] = {"step": 0, "loss": None}
    try:
        train = read_examples(cfg["dataset"]["train_path"], "dataset.train_path")
        evals = read_examples(cfg["dataset"]["eval_path"], "dataset.eval_path")
        say(f"{len(train)} train / {len(evals)} eval examples")
        outcome = run(cfg, train, evals, log, progress)
        outcome.update(train_examples=len(train), eval_examples=len(evals))
        status, code = "completed", EXIT_OK
    except JobError as e:
        code, error = e.exit_code, str(e)
    except Terminated as e:
        status, code, error = "cancelled", EXIT_TERMINATED, str(e)
    except BaseException as e:  # the job's last word must be written whatever happened
        traceback.print_exc()
        code = EXIT_OOM if is_oom(e) else EXIT_FAILED
        error = ("out of memory: " if code == EXIT_OOM else "") + one_line(e)
    runtime = round(time.monotonic() - t0, 3)
    if error:
        say(f"{status}: {error}")
    finished: dict[str, Any] = {
        "status": status,
        "final_loss": outcome["final_train_loss"] if outcome else progress["loss"],
        "total_steps": outcome["steps"] if outcome else progress["step"],
        "runtime_seconds": runtime,
        "exit_code": code,
    }
    if error:
        finished["error"] = error
    log.event("job_finished", **finished)
    log.close()
    if outcome is not None:
        result = {
            "job_id": cfg["job_id"],
            "status": status,
            "base_model": cfg["model"]["name"],
            "chat_template": cfg["model"]["chat_template"],
            **outcome,
            "runtime_seconds": runtime,
            "peak_rss_bytes": _peak_rss(),
            "versions": versions(),
            "python": sys.executable,
            "finished_at": utcnow(),
        }
        write_json_atomic(result_path(cfg), result)
        say(f"done in {runtime:.1f}s: eval loss {outcome['eval_loss_before']} -> {outcome['eval_loss_after']}")
    return code


def _report_early_failure(raw: Any, error: str, t0: float) -> None:
    """A config error still reaches ``metrics.jsonl`` when the file's metrics path is usable."""
    try:
        path = raw["metrics"]["output_path"]
        job_id = raw.get("job_id") or os.environ.get("CHATOS_JOB_ID") or "unknown"
        if not (isinstance(path, str) and os.path.isabs(path)):
            return
        log = MetricsLog(path, str(job_id))
    except Exception:
        return
    log.event("job_started", pid=os.getpid(), python=sys.executable)
    log.event(
        "job_finished",
        status="failed",
        final_loss=None,
        total_steps=0,
        runtime_seconds=round(time.monotonic() - t0, 3),
        exit_code=EXIT_CONFIG,
        error=error,
    )
    log.close()


def _peak_rss() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
