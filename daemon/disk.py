"""Disk: what the service's folders use, what is free, and what a training job or an export will need.

The estimates are pure (bytes in, bytes out) so the cycle can refuse a job with one line before it starts instead
of failing half-way on a full disk; the measurements walk folders without following links. A leaf.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# GGUF size as a share of the 16-bit model, by quantization (llama.cpp's bits per weight / 16, rounded up).
GGUF_SHARE = {"f32": 2.0, "f16": 1.0, "bf16": 1.0, "q8_0": 0.54, "q6_k": 0.42, "q5_k_m": 0.36, "q4_k_m": 0.31,
              "q4_0": 0.29}
MARGIN = 256 * MIB  # logs, tokenizer files, temp files, the filesystem's own reserve


def tree_bytes(path: Path) -> int:
    """Bytes used by the regular files under ``path`` (or by ``path`` itself; 0 when missing). Links are not
    followed."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    total, stack = 0, [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        except OSError:  # unreadable, or vanished while we looked
            continue
    return total


def weights_bytes(model_dir: Path) -> int:
    """The size of a local model folder's weight files (what a merge loads and writes back in 16 bits)."""
    try:
        files: Iterable[Path] = [p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES]
        return sum(p.stat().st_size for p in files)
    except OSError:
        return 0


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding ``path`` (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def training_needs(dataset_bytes: int, base_weights_bytes: int) -> int:
    """A LoRA job writes its adapter (a few % of the base at most), the trainer's token cache (about twice the
    dataset) and its logs."""
    return 2 * dataset_bytes + base_weights_bytes // 20 + MARGIN


def export_needs(base_weights_bytes: int, quantization: str) -> int:
    """Merge + convert write the merged 16-bit model (kept until the GGUF is verified) and the GGUF beside it."""
    merged = base_weights_bytes
    return merged + int(merged * GGUF_SHARE.get(quantization.lower(), 1.0)) + MARGIN


@dataclass(frozen=True)
class Shortfall:
    """Not enough room: one line for the cycle's reason and the numbers for the log."""

    what: str
    path: Path
    needed: int
    free: int

    def __str__(self) -> str:
        return (f"not enough disk for {self.what}: {human(self.needed)} needed, {human(self.free)} free on "
                f"{self.path}; free space or lower retention.keep_* / ollama.keep_versions")


def check(what: str, path: Path, needed: int, free: int | None = None) -> Shortfall | None:
    """A :class:`Shortfall` when ``path``'s filesystem has less than ``needed`` free, else None."""
    have = free_bytes(path) if free is None else free
    return Shortfall(what, path, needed, have) if have < needed else None


def human(n: int) -> str:
    """1536 -> '1.5 KiB'; for one-line reasons and ``status``."""
    size = float(n)
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
