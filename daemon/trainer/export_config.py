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

BACKENDS = ("transformers", "unsloth")
MERGE_DTYPES = ("auto", "float16", "bfloat16", "float32")


class ConvertError(Failure):
    """The converter or the quantizer failed, or the converter's gguf-py is unusable: exit 3."""

    exit_code = EXIT_CONVERT


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
    return problems
