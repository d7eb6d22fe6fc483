"""The merge: a LoRA adapter into its 16-bit base (PEFT, for both backends), saved with the tokenizer and the chat
template the GGUF must embed. The heavy imports live inside the functions (``unsloth`` first: it patches
transformers/peft).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Any

from qlora_gpu import (
    MIN_CAPABILITY,
    base_config,
    cuda_capability,
    dtype_name,
    gpu_memory,
    merge_device,
    model_16bit_bytes,
    precision,
)
from trainer_common import ConfigError, unparsable_sentencepiece

# The merge needs torch/transformers/peft; the converter imports sentencepiece even for BPE vocabularies, numpy and
# yaml (its gguf-py); missing ones fail fast here instead of after a long merge.
NEEDED_MODULES = {"torch": "torch", "transformers": "transformers", "peft": "peft", "numpy": "numpy",
                  "sentencepiece": "sentencepiece", "yaml": "pyyaml", "safetensors": "safetensors"}


def missing_modules() -> list[str]:
    """Distribution names of the modules this interpreter lacks."""
    return [dist for mod, dist in NEEDED_MODULES.items() if importlib.util.find_spec(mod) is None]


def _quantized_base(model: str) -> str | None:
    cfg = Path(model, "config.json")
    if not cfg.is_file():
        return None
    try:
        q = json.loads(cfg.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None
    return (q or {}).get("quant_method", "quantized") if isinstance(q, dict) else None


def merge(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Load base + adapter in 16/32-bit, merge, save the merged model and tokenizer into ``work``: one PEFT path for
    both backends (under the Unsloth interpreter ``unsloth`` is imported first, as it patches transformers/peft)."""
    method = _quantized_base(cfg["base_model"])
    if method:
        raise ConfigError(f"base model {cfg['base_model']} is pre-quantized ({method}); the merge needs its 16-bit "
                          "original (training.base_model)")
    shutil.rmtree(work, ignore_errors=True)
    if cfg["backend"] == "unsloth":
        import unsloth  # noqa: F401
    return _merge_peft(cfg, work, *merge_placement(cfg))


def merge_placement(cfg: dict[str, Any]) -> tuple[str, str]:
    """(device, dtype name) of the merge: ``merge_device`` by :func:`qlora_gpu.merge_device` (auto: the GPU only with
    1.3x the 16-bit model free); ``merge_dtype`` auto is the precision rule's dtype on the GPU, the checkpoint's own
    on the CPU."""
    setting = cfg.get("merge_device", "auto")
    cap = cuda_capability()
    mem = gpu_memory() if cap is not None and (cap >= MIN_CAPABILITY or setting == "cuda") else None
    shape = base_config(cfg["base_model"])
    need = model_16bit_bytes(shape) if shape is not None else None
    # an unknown base size counts as no GPU for auto (the CPU cannot run out of GPU memory)
    free = mem[0] if mem is not None and (need is not None or setting == "cuda") else None
    where = merge_device(setting, free, need or 0)
    dtype = cfg["merge_dtype"]
    if where == "cuda" and dtype == "auto":
        dtype = dtype_name(precision(cap))
    return where, dtype


def import_stack(backend: str) -> float:
    """Import the merge stack up front (``unsloth`` first: it patches transformers and peft); returns seconds."""
    t = time.monotonic()
    if backend == "unsloth":
        import unsloth  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return time.monotonic() - t


def _torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _merge_peft(cfg: dict[str, Any], work: Path, where: str = "cpu", load_dtype: str = "auto") -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    placed = {"device_map": {"": 0}} if where == "cuda" else {}
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model"], dtype=_torch_dtype(load_dtype), **placed)
    if getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False):
        raise ConfigError(f"base model {cfg['base_model']} loaded quantized; the merge needs a 16-bit base")
    dtype = next(base.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"base model {cfg['base_model']} loaded as {dtype}; merge_dtype must be 16 or 32-bit")
    model = PeftModel.from_pretrained(base, cfg["adapter_dir"])
    merged = model.merge_and_unload()
    merged.save_pretrained(str(work))
    tok = _load_tokenizer(cfg)
    tok.save_pretrained(str(work))
    return {"dtype": str(dtype).removeprefix("torch."), "parameters": sum(p.numel() for p in merged.parameters()),
            "device": where}


def _load_tokenizer(cfg: dict[str, Any]) -> Any:
    """The adapter's tokenizer (the trainer saved it with the inference template), else the base's."""
    from transformers import AutoTokenizer

    adapter = Path(cfg["adapter_dir"])
    src = adapter if (adapter / "tokenizer_config.json").is_file() else cfg["base_model"]
    return AutoTokenizer.from_pretrained(str(src))


def finish_tokenizer(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Make the merged folder's chat template exactly the one to embed and drop files that break the converter."""
    import gguf  # the converter's own gguf-py (see main)

    removed = []
    tc_path = work / "tokenizer_config.json"
    if tc_path.is_file():
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        if "chat_template" in tc:  # the converter prefers this key over chat_template.jinja
            del tc["chat_template"]
            tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for stray in ("chat_template.json", "additional_chat_templates"):
        p = work / stray
        if p.is_dir():
            shutil.rmtree(p)
            removed.append(stray)
        elif p.exists():
            p.unlink()
            removed.append(stray)
    add_bos = gguf.SpecialVocab(work, load_merges=False).add_special_token.get("bos") is True
    template = cfg["chat_template_no_bos"] if add_bos and cfg.get("chat_template_no_bos") else cfg["chat_template"]
    (work / "chat_template.jinja").write_text(template, encoding="utf-8")
    if unparsable_sentencepiece(work / "tokenizer.model", has_json=(work / "tokenizer.json").is_file()):
        (work / "tokenizer.model").unlink()
        removed.append("tokenizer.model")
    return {"add_bos_token": add_bos, "bos_stripped": template != cfg["chat_template"], "removed": removed}
