"""Print the card table of ``docs/gpu-memory.md`` from the trainer's memory estimate (``qlora_gpu.estimate``).

    .venv/bin/python bench/gpu_memory_table.py

For 8, 12, 16 and 24 GB cards: the largest common model (``qlora_gpu.SHAPES``) the defaults of
``configs/chatos_qlora.yaml`` train (QLoRA, its batch size, LoRA rank and ``max_seq_length``) and, per model, the
longest ``max_seq_length`` (a multiple of 256) that fits. A card's usable memory is its size less
:data:`CUDA_CONTEXT_GIB` for the CUDA context (the estimate leaves it out). No GPU needed: a pure computation; a test
(tests/unit/test_gpu_memory_doc.py) checks that the doc holds exactly this output.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "daemon" / "trainer"))

from qlora_gpu import GIB, SHAPES, estimate  # noqa: E402

CARDS_GIB = (8, 12, 16, 24)
CUDA_CONTEXT_GIB = 0.5
SEQ_STEP = 256
SEQ_MAX = 32768
CONFIG = ROOT / "configs" / "chatos_qlora.yaml"


def defaults() -> dict[str, Any]:
    cfg = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    return {"batch": int(cfg["training"]["per_device_train_batch_size"]), "lora_r": int(cfg["lora"]["r"]),
            "seq_len": int(cfg["model"]["max_seq_length"]), "four_bit": bool(cfg["model"]["load_in_4bit"])}


def fits(shape: dict[str, Any], seq_len: int, card_gib: int, d: dict[str, Any], unsloth: bool = True) -> bool:
    e = estimate(shape, seq_len, d["batch"], d["lora_r"], four_bit=d["four_bit"], gradient_checkpointing=True,
                 unsloth=unsloth)
    return e.total_bytes <= (card_gib - CUDA_CONTEXT_GIB) * GIB


def max_seq(shape: dict[str, Any], card_gib: int, d: dict[str, Any], unsloth: bool = True) -> int | None:
    """The longest multiple of :data:`SEQ_STEP` (up to :data:`SEQ_MAX`) that fits, or None."""
    best = None
    for seq in range(SEQ_STEP, SEQ_MAX + 1, SEQ_STEP):
        if not fits(shape, seq, card_gib, d, unsloth):
            break
        best = seq
    return best


def largest(card: int, d: dict[str, Any], unsloth: bool) -> str:
    """"model (hub id), longest max_seq_length" of the largest shape that trains at the default length."""
    ok = [name for name, s in SHAPES.items() if fits(s, d["seq_len"], card, d, unsloth)]
    if not ok:
        return "none | -"
    shape = SHAPES[ok[-1]]
    return f"{ok[-1]} ({shape['model']}) | {max_seq(shape, card, d, unsloth)}"


def table() -> str:
    d = defaults()
    seq = d["seq_len"]
    lines = [
        f"Defaults: QLoRA (4-bit), batch {d['batch']}, LoRA r {d['lora_r']} on every projection, gradient "
        f"checkpointing, max_seq_length {seq}; a card's usable memory is its size less {CUDA_CONTEXT_GIB} GiB for "
        "the CUDA context.",
        "",
        f"| card | Unsloth: largest model at {seq} tokens | its longest max_seq_length | transformers backend: "
        f"largest model at {seq} tokens | its longest max_seq_length |",
        "|---|---|---|---|---|",
    ]
    for card in CARDS_GIB:
        lines.append(f"| {card} GB | {largest(card, d, True)} | {largest(card, d, False)} |")
    lines += ["", f"Unsloth backend, longest max_seq_length per model and card (-: not even {SEQ_STEP} tokens; "
              f"capped at {SEQ_MAX}); the estimate at {seq} tokens:", "",
              "| model | " + " | ".join(f"{c} GB" for c in CARDS_GIB) + f" | estimate at {seq} |",
              "|---|" + "---|" * (len(CARDS_GIB) + 1)]
    for name, shape in SHAPES.items():
        cells = [str(max_seq(shape, c, d) or "-") for c in CARDS_GIB]
        gib = estimate(shape, seq, d["batch"], d["lora_r"], four_bit=d["four_bit"]).total_bytes / GIB
        lines.append(f"| {name} ({shape['model']}) | " + " | ".join(cells) + f" | {gib:.1f} GiB |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
