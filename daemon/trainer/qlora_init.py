"""Warm start (``init.adapter``): the trainable LoRA begins from a saved adapter's weights instead of a fresh LoRA.

The LoRA is built exactly as without it (r, alpha and target modules from ``lora:``); :func:`load_init_adapter` then
copies the adapter's tensors into it with PEFT's ``set_peft_model_state_dict`` (both backends build a PEFT model).
:func:`adapter_problem` (standard library only) is the config check: the adapter must exist and have the same shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer_common import ConfigError, one_line, sayer

say = sayer("train_qlora")

KEY = "init.adapter"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_problem(path: str, lora: dict[str, Any]) -> str | None:
    """Why the adapter folder ``path`` cannot seed a LoRA configured as ``lora`` (one line), or None when it can.

    Compared with ``lora:``: r, lora_alpha and the target modules as a set ("all-linear" on either side is resolved
    by PEFT against the model, so there the tensor check of :func:`load_init_adapter` decides).
    """
    folder = Path(path)
    if not folder.is_dir():
        return f"{path} is not a directory"
    config_file = folder / "adapter_config.json"
    try:
        theirs = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no adapter_config.json in {path}"
    except (OSError, ValueError) as e:
        return f"cannot read {config_file}: {one_line(e)}"
    if not isinstance(theirs, dict):
        return f"{config_file} is not a JSON object"
    if not any((folder / name).is_file() for name in WEIGHTS):
        return f"no {' or '.join(WEIGHTS)} in {path}"
    differs = []
    if theirs.get("r") != lora["r"]:
        differs.append(f"r is {theirs.get('r')!r} in the adapter but lora.r is {lora['r']!r}")
    alpha = theirs.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or float(alpha) != float(lora["lora_alpha"]):
        differs.append(f"lora_alpha is {alpha!r} in the adapter but lora.lora_alpha is {lora['lora_alpha']!r}")
    targets, ours = theirs.get("target_modules"), lora["target_modules"]
    if "all-linear" not in (targets, ours):
        their_set = set(targets) if isinstance(targets, list) else {targets}
        if their_set != set(ours):
            differs.append(f"target_modules are {sorted(map(str, their_set))} in the adapter but lora.target_modules "
                           f"are {sorted(ours)}")
    return f"{path} does not match 'lora:': " + "; ".join(differs) if differs else None


def read_adapter_weights(path: str) -> dict[str, Any]:
    """The adapter's saved tensors (safetensors first, else the pickled ``.bin``), on the CPU."""
    folder = Path(path)
    if (folder / WEIGHTS[0]).is_file():
        from safetensors.torch import load_file

        return dict(load_file(str(folder / WEIGHTS[0]), device="cpu"))
    import torch

    return dict(torch.load(str(folder / WEIGHTS[1]), map_location="cpu", weights_only=True))


def load_init_adapter(model: Any, path: str) -> int:
    """Load the adapter at ``path`` into ``model``'s trainable adapter ("default"); returns how many LoRA tensors.

    Checked, not trusted: every LoRA tensor of the adapter must land in the model and every LoRA tensor of the model
    must come from the adapter, else :class:`ConfigError` (exit 2) saying which.
    """
    from peft import set_peft_model_state_dict

    try:
        state = read_adapter_weights(path)
    except Exception as e:
        raise ConfigError(f"At '{KEY}': cannot read the weights in {path}: {one_line(e)}") from e
    lora_keys = [k for k in state if "lora_" in k]
    if not lora_keys:
        raise ConfigError(f"At '{KEY}': {path} holds no LoRA tensors")
    try:
        loaded = set_peft_model_state_dict(model, state, adapter_name="default")
    except RuntimeError as e:  # a size mismatch: the adapter was trained on another base
        raise ConfigError(f"At '{KEY}': {path} does not fit the model: {one_line(e)}") from e
    unexpected = [k for k in loaded.unexpected_keys if "lora_" in k]
    missing = [k for k in loaded.missing_keys if "lora_" in k]
    if unexpected or missing:
        where = []
        if unexpected:
            where.append(f"{len(unexpected)} of its {len(lora_keys)} LoRA tensors have no place in the model "
                         f"(first: {unexpected[0]})")
        if missing:
            where.append(f"{len(missing)} LoRA tensors of the model are not in it (first: {missing[0]})")
        raise ConfigError(f"At '{KEY}': {path} does not fit the model: " + "; ".join(where))
    say(f"warm start: {len(lora_keys)} LoRA tensors loaded from {path}")
    return len(lora_keys)
