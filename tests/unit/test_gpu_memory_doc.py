"""docs/gpu-memory.md holds exactly what bench/gpu_memory_table.py prints (one estimate, no drift), and the table
answers from that estimate."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "gpu-memory.md"
BEGIN, END = "<!-- begin: bench/gpu_memory_table.py -->\n", "<!-- end: bench/gpu_memory_table.py -->"


def script() -> ModuleType:
    pytest.importorskip("yaml")
    spec = importlib.util.spec_from_file_location("gpu_memory_table", ROOT / "bench" / "gpu_memory_table.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_doc_holds_the_scripts_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    assert block == script().table()


def test_the_table_follows_the_estimate() -> None:
    mod = script()
    d = mod.defaults()
    assert (d["batch"], d["lora_r"], d["four_bit"]) == (2, 16, True)  # configs/chatos_qlora.yaml's defaults
    seven = mod.SHAPES["7B"]
    longest = mod.max_seq(seven, 12, d)
    assert longest is not None and mod.fits(seven, longest, 12, d) and not mod.fits(seven, longest + 256, 12, d)
    assert mod.max_seq(mod.SHAPES["14B"], 8, d) is None  # a 14B does not fit an 8 GB card
    assert mod.max_seq(seven, 12, d, unsloth=False) < longest  # the TRL path keeps checkpoints and logits


def test_the_readme_links_the_doc() -> None:
    assert "docs/gpu-memory.md" in (ROOT / "README.md").read_text(encoding="utf-8")
