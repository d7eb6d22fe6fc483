"""The GPU rules of the trainer and the merge: the card (capability, memory), the precision, the memory estimate, the
4-bit preparation, the merge device and the configured base being in the local cache.

Pure but for :func:`cuda_capability` / :func:`gpu_memory` (they ask torch), :func:`prepare_4bit` (it changes a
model) and :func:`check_base_cached` (it reads the Hugging Face cache). torch is imported inside the functions that
need it, so the pure parts import without it (the bench script, the docs test).

The card seam, **for tests only**: when ``CHATOS_RETRAIN_FAKE_GPU`` is set to a JSON object such as
``{"capability": [7, 5], "free": 8000000000, "total": 16000000000}``, :func:`cuda_capability` and :func:`gpu_memory`
answer from it instead of torch (``"capability": null`` is a machine without a GPU; a missing ``free`` or ``total``
means no memory figure). Nothing else reads it; the service never sets it. It lets the tests drive the GPU branches
(precision per card, the merge device) on a machine without a GPU, in process or in a trainer subprocess.

The precision rule (:func:`precision`): no GPU -> fp32; compute capability >= 8.0 -> bf16 (native); 7.x -> fp16 with
loss scaling (bf16 there is only emulated); below 7.0 -> ConfigError: Unsloth's documented minimum is 7.0 and fp16
kernels below it are not what anything here was tested on. ``training.gpu_fp32: true`` forces fp32 on a GPU.

The memory estimate (:func:`estimate`) is the one the VRAM preflight, the card table (``docs/gpu-memory.md``,
``bench/gpu_memory_table.py``) and the merge device share; its assumptions are in its docstring.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer_common import ConfigError, Failure

FAKE_GPU_ENV = "CHATOS_RETRAIN_FAKE_GPU"
MIN_CAPABILITY = (7, 0)  # Unsloth's documented minimum (V100, T4, RTX 20xx and newer)
PRECISIONS = ("bf16", "fp16", "fp32")
GIB = 1024**3
MERGE_DEVICES = ("auto", "cpu", "cuda")
MERGE_HEADROOM = 1.3  # auto merges on the GPU only when its free memory is >= this x the 16-bit model

# The config shapes of the common bases (their config.json's fields the estimate reads), one place for the card
# table and the tests' cross-check.
SHAPES: dict[str, dict[str, Any]] = {
    "0.5B": {"model": "Qwen/Qwen2.5-0.5B", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
             "vocab_size": 151936, "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "1.5B": {"model": "Qwen/Qwen2.5-1.5B", "hidden_size": 1536, "num_hidden_layers": 28, "intermediate_size": 8960,
             "vocab_size": 151936, "num_attention_heads": 12, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "3B": {"model": "Qwen/Qwen2.5-3B", "hidden_size": 2048, "num_hidden_layers": 36, "intermediate_size": 11008,
           "vocab_size": 151936, "num_attention_heads": 16, "num_key_value_heads": 2, "tie_word_embeddings": True},
    "7B": {"model": "Qwen/Qwen2.5-7B", "hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944,
           "vocab_size": 152064, "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False},
    "8B": {"model": "meta-llama/Llama-3.1-8B", "hidden_size": 4096, "num_hidden_layers": 32,
           "intermediate_size": 14336, "vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8,
           "tie_word_embeddings": False},
    "14B": {"model": "Qwen/Qwen2.5-14B", "hidden_size": 5120, "num_hidden_layers": 48, "intermediate_size": 13824,
            "vocab_size": 152064, "num_attention_heads": 40, "num_key_value_heads": 8, "tie_word_embeddings": False},
}

# --------------------------------------------------------------------------------------------------- the card


def _fake() -> dict[str, Any] | None:
    raw = os.environ.get(FAKE_GPU_ENV)
    if not raw:
        return None
    fake = json.loads(raw)
    if not isinstance(fake, dict):
        raise ValueError(f"{FAKE_GPU_ENV} must be a JSON object")
    return fake


def cuda_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability (major, minor), or None without CUDA (or the test seam's answer)."""
    fake = _fake()
    if fake is not None:
        cap = fake.get("capability")
        return None if cap is None else (int(cap[0]), int(cap[1]))
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return int(major), int(minor)


def gpu_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the first GPU, or None without CUDA (or the test seam's answer)."""
    fake = _fake()
    if fake is not None:
        if fake.get("capability") is None or fake.get("free") is None or fake.get("total") is None:
            return None
        return int(fake["free"]), int(fake["total"])
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(0)
    return int(free), int(total)


# ---------------------------------------------------------------------------------------------- the precision


def precision(capability: tuple[int, int] | None, fp32: bool = False) -> str:
    """"bf16", "fp16" or "fp32" for a card of ``capability`` (None: no GPU); ``fp32`` forces fp32 on a GPU."""
    if capability is None:
        return "fp32"
    if tuple(capability) < MIN_CAPABILITY:
        raise ConfigError(f"GPU compute capability {capability[0]}.{capability[1]} is below 7.0, Unsloth's documented "
                          "minimum (V100, T4, RTX 20xx and newer); train on the CPU (CUDA_VISIBLE_DEVICES=) instead")
    if fp32:
        return "fp32"
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def run_precision(cfg: dict[str, Any], cuda: bool) -> str:
    """The job's precision: :func:`precision` of this machine's card (``cuda`` false: the CPU) and
    ``training.gpu_fp32``."""
    return precision(cuda_capability() if cuda else None, bool(cfg["training"].get("gpu_fp32", False)))


def dtype_name(prec: str) -> str:
    """The torch dtype's name of a precision: bfloat16, float16 or float32."""
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[prec]


def torch_dtype(prec: str) -> Any:
    """The torch dtype of a precision (also the 4-bit compute dtype and the 16-bit load dtype)."""
    import torch

    return getattr(torch, dtype_name(prec))


def trainer_flags(prec: str) -> dict[str, bool]:
    """SFTConfig / KTOConfig / DPOConfig mixed-precision flags: bf16 autocast, or fp16 with loss scaling."""
    return {"bf16": prec == "bf16", "fp16": prec == "fp16"}


def dtype_bytes(prec: str) -> int:
    return 4 if prec == "fp32" else 2


# ----------------------------------------------------------------------------------------------- the estimate

NF4_BITS = 4.127  # NF4 weights + double-quantized absmax constants (8 bits per 64 weights, fp32 per 256 blocks)
LORA_BYTES = 16  # per trainable LoRA parameter: fp32 weight + fp32 gradient + AdamW's two fp32 moments
LOSS_CHUNK_TOKENS = 256  # tokens whose fp32 logits (and their gradient) exist at once in the chunked loss
OVERHEAD_BYTES = GIB // 4  # cuBLAS workspaces, allocator rounding and fragmentation (the CUDA context not counted)
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Estimate:
    """Bytes of GPU memory a QLoRA/LoRA training step needs, in total and by part."""

    total_bytes: int
    parts: dict[str, int]

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


def shape_of(model: float | dict[str, Any]) -> dict[str, Any]:
    """A config dict as it is, or for a parameter count in billions the :data:`SHAPES` entry nearest to it."""
    if isinstance(model, dict):
        return model
    return min(SHAPES.values(), key=lambda s: abs(parameters(s) / 1e9 - float(model)))


def _dims(shape: dict[str, Any]) -> tuple[int, int, int, int, int]:
    h, inter = int(shape["hidden_size"]), int(shape["intermediate_size"])
    heads = int(shape["num_attention_heads"])
    head_dim = int(shape.get("head_dim") or h // heads)
    kv = int(shape.get("num_key_value_heads") or heads) * head_dim
    return h, inter, heads * head_dim, kv, int(shape["num_hidden_layers"])


def _layer_linears(shape: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection of one decoder layer."""
    h, inter, q, kv, _ = _dims(shape)
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, inter), "up": (h, inter),
            "down": (inter, h)}


def embedding_parameters(shape: dict[str, Any]) -> int:
    """The input embedding and, when not tied to it, the LM head."""
    one = int(shape["vocab_size"]) * int(shape["hidden_size"])
    return one if shape.get("tie_word_embeddings", True) else 2 * one


def parameters(shape: dict[str, Any]) -> int:
    """The model's parameter count (projections and embeddings; norms and biases are negligible)."""
    per_layer = sum(i * o for i, o in _layer_linears(shape).values())
    return per_layer * _dims(shape)[4] + embedding_parameters(shape)


def lora_parameters(shape: dict[str, Any], r: int, targets: tuple[str, ...] = TARGETS) -> int:
    """Trainable LoRA parameters with rank ``r`` on ``targets`` (default: every projection) of every layer."""
    per_layer = sum(r * (i + o) for name, (i, o) in _layer_linears(shape).items() if name in targets)
    return per_layer * _dims(shape)[4]


def estimate(
    model: float | dict[str, Any],
    seq_len: int,
    batch: int,
    lora_r: int = 16,
    four_bit: bool = True,
    gradient_checkpointing: bool = True,
    dtype_size: int = 2,
    unsloth: bool = True,
) -> Estimate:
    """GPU bytes one training step of a LoRA on ``model`` (a config dict, or billions of parameters: the nearest
    :data:`SHAPES`) needs at ``batch`` x ``seq_len`` tokens, by part:

    - ``weights``: the decoder's projections, NF4 (``four_bit``) or ``dtype_size`` bytes each;
    - ``embeddings``: the input embedding and the untied LM head, kept 16-bit (``dtype_size``) even on the 4-bit
      path (:func:`prepare_4bit` does not upcast them);
    - ``lora+optimizer``: the LoRA on every projection, fp32 weight, gradient and AdamW moments;
    - ``activations``: with ``gradient_checkpointing`` one layer's forward+backward working set, plus (``unsloth``
      false: the TRL path) every layer's checkpointed input, which Unsloth offloads to the CPU; without it every
      layer's activations stay;
    - ``logits``: Unsloth's loss in chunks of :data:`LOSS_CHUNK_TOKENS` tokens (fp32 logits and their gradient);
      the TRL path (``unsloth`` false) holds every token's logits, in the model's dtype and in fp32;
    - ``overhead``: workspaces and fragmentation, not the CUDA context (a preflight reads the free memory after it).

    It is calibrated on Unsloth's published QLoRA minimums (7B 5 GB, 8B 6 GB, 14B 8.5 GB at 2048 tokens, batch 2,
    r 16, gradient checkpointing). Those figures are a 32k vocabulary's: the unit tests hold the estimate to them
    within 25% on the Qwen2.5-7B, Llama-3.1-8B and Qwen2.5-14B shapes with a 32k vocabulary; the real vocabularies
    add their 16-bit embeddings and LM head on top (2 GiB more on Qwen2.5-7B, 2.3 GiB on Qwen2.5-14B).
    """
    shape = shape_of(model)
    h, inter, q, kv, layers = _dims(shape)
    tokens = seq_len * batch
    proj = parameters(shape) - embedding_parameters(shape)
    weights = int(proj * NF4_BITS / 8) if four_bit else proj * dtype_size
    per_token = 4 * h + q + 2 * kv + 3 * inter  # residual, norm, q/k/v, attention out, gate/up/act of one layer
    if gradient_checkpointing:
        activations = tokens * per_token * dtype_size + (0 if unsloth else tokens * h * dtype_size * layers)
    else:
        activations = tokens * per_token * dtype_size * layers
    vocab = int(shape["vocab_size"])
    logits = min(tokens, LOSS_CHUNK_TOKENS) * vocab * 4 * 2 if unsloth else tokens * vocab * (dtype_size + 4)
    parts = {
        "weights": weights,
        "embeddings": embedding_parameters(shape) * dtype_size,
        "lora+optimizer": lora_parameters(shape, lora_r) * LORA_BYTES,
        "activations": activations,
        "logits": logits + tokens * h * dtype_size,
        "overhead": OVERHEAD_BYTES,
    }
    return Estimate(sum(parts.values()), parts)


def model_16bit_bytes(shape: dict[str, Any]) -> int:
    """The bytes of the model's weights in 16 bits (what a merge loads)."""
    return parameters(shape) * 2


# ---------------------------------------------------------------------------------------- the 4-bit preparation


def _is_norm(module: Any) -> bool:
    name = type(module).__name__
    return name.endswith(("RMSNorm", "LayerNorm")) or name in ("LayerNorm", "GroupNorm")


def prepare_4bit(model: Any) -> Any:
    """The 4-bit TRL path's preparation, in place of peft's ``prepare_model_for_kbit_training`` (which upcasts every
    16-bit parameter, embeddings and LM head included, to fp32: ~4.4 GB more on Qwen2.5-7B): freeze every base
    parameter, upcast only the norms to fp32, keep embeddings and the LM head in their 16-bit dtype, and make the
    input embeddings' output require grad so that gradient checkpointing reaches the LoRA. The LoRA weights
    ``get_peft_model`` adds later are fp32 already (PEFT's ``autocast_adapter_dtype``)."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return model


# ------------------------------------------------------------------------------------------- the merge device


def merge_device(setting: str, free_bytes: int | None, model_16bit: int) -> str:
    """"cpu" or "cuda" for the merge: ``setting`` cpu/cuda as it says (cuda needs a GPU: ``free_bytes`` not None);
    auto is cuda only when the GPU's free memory is at least :data:`MERGE_HEADROOM` x the 16-bit model."""
    if setting not in MERGE_DEVICES:
        raise ConfigError(f"merge_device must be one of {', '.join(MERGE_DEVICES)}, got {setting!r}")
    if setting == "cuda" and free_bytes is None:
        raise ConfigError("merge_device is cuda but no GPU is visible to the merge")
    if setting != "auto":
        return setting
    return "cuda" if free_bytes is not None and free_bytes >= MERGE_HEADROOM * model_16bit else "cpu"


def base_config(base: str) -> dict[str, Any] | None:
    """The base's ``config.json`` (a local folder or a cached hub id), or None when it cannot be read."""
    path: Any = Path(base, "config.json")
    if not os.path.isabs(base):
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(base, "config.json")
    if not isinstance(path, str | Path) or not Path(path).is_file():
        return None
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else None
    return cfg if isinstance(cfg, dict) and all(k in cfg for k in ("hidden_size", "num_hidden_layers",
                                                                   "intermediate_size", "vocab_size",
                                                                   "num_attention_heads")) else None


# --------------------------------------------------------------------------------------------- the base model


def check_base_cached(name: str) -> None:
    """A hub id must already be in the local Hugging Face cache (its ``config.json``); the job then runs offline. An
    absolute folder is left to the config's checks. Else ConfigError, one line naming the id."""
    if os.path.isabs(name):
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ConfigError(f"base model {name} is not in the local Hugging Face cache; download it first "
                          f"(hf download {name}) or set training.base_model to its absolute folder")
    os.environ["HF_HUB_OFFLINE"] = "1"  # in the cache: nothing more is fetched (no substituted repository either)


# ---------------------------------------------------------------------------------------------- the VRAM preflight

EXIT_NO_VRAM = 5


class NotEnoughVram(Failure):
    """The job cannot fit in the GPU's free memory: exit 5 before loading anything (the service backs off)."""

    exit_code = EXIT_NO_VRAM


def preflight(cfg: dict[str, Any], backend: str, memory: tuple[int, int] | None) -> dict[str, Any] | None:
    """Before a GPU job loads anything: compare the free VRAM (``memory`` = :func:`gpu_memory`, None = no GPU: no
    check) with :func:`estimate` for this job, and decide ``training.gradient_checkpointing: auto`` (off when the job
    fits without it, ~30% faster; on when only with it). Raises :class:`NotEnoughVram` with one line and the numbers
    when it fits neither way; returns the facts for ``result.json`` (None without a GPU or without the base's
    ``config.json``, which the load then reports)."""
    if memory is None:
        return None
    shape = base_config(cfg["model"]["name"])
    if shape is None:
        return None
    free, total = memory
    t, four_bit = cfg["training"], bool(cfg["model"]["load_in_4bit"])
    size = dtype_bytes(run_precision(cfg, cuda=True))

    def need(checkpointing: bool) -> Estimate:
        return estimate(shape, cfg["model"]["max_seq_length"], t["per_device_train_batch_size"], cfg["lora"]["r"],
                        four_bit=four_bit, gradient_checkpointing=checkpointing, dtype_size=size,
                        unsloth=backend == "unsloth")

    setting = t.get("gradient_checkpointing", "auto")
    choices = [setting == "on"] if setting in ("on", "off") else [False, True]
    for checkpointing in choices:
        est = need(checkpointing)
        if est.total_bytes <= free:
            return {"vram_free_bytes": free, "vram_total_bytes": total, "vram_estimate_bytes": est.total_bytes,
                    "gradient_checkpointing": "on" if checkpointing else "off"}
    parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in est.parts.items())
    raise NotEnoughVram(
        f"not enough GPU memory: the job needs ~{est.total_gib:.1f} GiB ({parts}; model.max_seq_length "
        f"{cfg['model']['max_seq_length']}, batch {t['per_device_train_batch_size']}, r {cfg['lora']['r']}, "
        f"{'4-bit' if four_bit else '16-bit'}), {free / GIB:.1f} GiB free of {total / GIB:.1f} (another process or "
        "Ollama holds the rest; lower max_seq_length or the batch, or load in 4 bits)")


def oom_numbers() -> str:
    """The GPU's figures for an out-of-memory report: peak allocated, free and total (empty without a GPU)."""
    memory = gpu_memory()
    if memory is None:
        return ""
    peak = ""
    try:
        import torch

        if torch.cuda.is_available():
            peak = f"peak {torch.cuda.max_memory_allocated() / GIB:.1f} GiB allocated, "
    except Exception:
        peak = ""
    return f" ({peak}{memory[0] / GIB:.1f} GiB free of {memory[1] / GIB:.1f})"
