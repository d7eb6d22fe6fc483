"""The export's contract: its config's checks, its exit codes and the failures that name them.

The config is written by ``daemon.publish.export.merge_config`` (every path absolute, the converter/quantizer argv
already built); :func:`validate` is pure.
"""

from __future__ import annotations

import os
from typing import Any

from trainer_common import Failure

EXIT_CONVERT = 3
EXIT_DISK = 4
EXIT_OOM = 5
EXIT_ENGINE = 6

BACKENDS = ("transformers", "unsloth")
MERGE_DTYPES = ("auto", "float16", "bfloat16", "float32")
MERGE_DEVICES = ("auto", "cpu", "cuda")


class ConvertError(Failure):
    """The converter or the quantizer failed, or the converter's gguf-py is unusable: exit 3."""

    exit_code = EXIT_CONVERT


class EngineError(Failure):
    """llama.cpp's engine (xllamacpp) could not load the GGUF or generate with it: exit 6, never sent to Ollama."""

    exit_code = EXIT_ENGINE


class DiskError(Failure):
    """Not enough free disk for the merged copy, the f16 GGUF and the final one: exit 4."""

    exit_code = EXIT_DISK


_REQUIRED_STR = ("backend", "base_model", "adapter_dir", "out_dir", "work_dir", "gguf_path", "quantization",
                 "chat_template", "result_path", "log_path")
_ABS = ("adapter_dir", "out_dir", "work_dir", "gguf_path", "result_path", "log_path")


def validate(raw: Any) -> list[str]:
    """Every problem of a parsed config as ``At 'key': message`` (empty when it is usable)."""
    if not isinstance(raw, dict):
        return ["At '<root>': must be a mapping"]
    problems = []
    for key in _REQUIRED_STR:
        if not isinstance(raw.get(key), str) or not raw[key]:
            problems.append(f"At {key!r}: required (a non-empty string)")
    for key in _ABS:
        if isinstance(raw.get(key), str) and raw[key] and not os.path.isabs(raw[key]):
            problems.append(f"At {key!r}: must be an absolute path, got {raw[key]!r}")
    if raw.get("backend") not in BACKENDS:
        problems.append(f"At 'backend': must be one of {', '.join(BACKENDS)}, got {raw.get('backend')!r}")
    if raw.get("merge_dtype", "auto") not in MERGE_DTYPES:
        problems.append(f"At 'merge_dtype': must be one of {', '.join(MERGE_DTYPES)}")
    if raw.get("merge_device", "auto") not in MERGE_DEVICES:
        problems.append(f"At 'merge_device': must be one of {', '.join(MERGE_DEVICES)}")
    for key in ("converter", "quantize"):
        step = raw.get(key)
        if step is None and key == "quantize":
            continue
        if not isinstance(step, dict) or not isinstance(step.get("argv"), list) or not step["argv"] \
                or not all(isinstance(a, str) for a in step["argv"]) or not isinstance(step.get("output"), str):
            problems.append(f"At {key!r}: needs 'argv' (a list of strings) and 'output'")
    conv = raw.get("converter")
    if isinstance(conv, dict) and not isinstance(conv.get("gguf_py"), str):
        problems.append("At 'converter.gguf_py': required")
    factor = raw.get("min_free_factor", 3.0)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 0:
        problems.append("At 'min_free_factor': must be a number >= 0")
    problems.extend(engine_problems(raw.get("engine")))
    return problems


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def engine_problems(engine: Any) -> list[str]:
    """The ``engine`` section's problems (absent = the defaults: on, 2048 tokens of context, auto threads)."""
    if engine is None:
        return []
    if not isinstance(engine, dict):
        return ["At 'engine': must be a mapping"]
    problems = []
    if not isinstance(engine.get("enabled", True), bool):
        problems.append("At 'engine.enabled': must be true or false")
    for key in ("n_ctx", "max_tokens"):
        if key in engine and not _positive_int(engine[key]):
            problems.append(f"At 'engine.{key}': must be an integer > 0")
    if engine.get("threads") is not None and not _positive_int(engine["threads"]):
        problems.append("At 'engine.threads': must be an integer > 0 or null (auto)")
    stop = engine.get("stop", [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        problems.append("At 'engine.stop': must be a list of non-empty strings")
    if not isinstance(engine.get("smoke_prompt", ""), str):
        problems.append("At 'engine.smoke_prompt': must be a string")
    prompts = engine.get("prompts", [])
    if not isinstance(prompts, list):
        return [*problems, "At 'engine.prompts': must be a list"]
    for i, item in enumerate(prompts):
        if not (isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"]
                and isinstance(item.get("messages"), list) and item["messages"]
                and all(isinstance(m, dict) for m in item["messages"])
                and ("max_tokens" not in item or _positive_int(item["max_tokens"]))):
            problems.append(f"At 'engine.prompts[{i}]': needs 'id' (a string), 'messages' (a non-empty list of "
                            "mappings) and, optionally, 'max_tokens' (an integer > 0)")
    return problems
