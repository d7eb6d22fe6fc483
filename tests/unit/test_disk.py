"""Disk measurements (on a real temp tree) and the pure estimates behind the free-space checks."""

from __future__ import annotations

import os
from pathlib import Path

from daemon import disk


def test_tree_bytes_counts_regular_files_once_and_follows_no_link(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "one").write_bytes(b"x" * 1000)
    (tmp_path / "a" / "b" / "two").write_bytes(b"y" * 24)
    os.symlink(tmp_path / "a" / "one", tmp_path / "a" / "b" / "link")
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    assert disk.tree_bytes(tmp_path) == 1024
    assert disk.tree_bytes(tmp_path / "a" / "one") == 1000
    assert disk.tree_bytes(tmp_path / "missing") == 0


def test_weights_bytes_counts_only_weight_files(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"w" * 300)
    (tmp_path / "config.json").write_text("{}")
    assert disk.weights_bytes(tmp_path) == 300
    assert disk.weights_bytes(tmp_path / "nope") == 0


def test_estimates_grow_with_what_the_job_writes() -> None:
    gib = disk.GIB
    assert disk.export_needs(16 * gib, "q8_0") > disk.export_needs(16 * gib, "q4_k_m") > 16 * gib
    assert disk.export_needs(16 * gib, "f16") >= 32 * gib
    assert disk.training_needs(100 * disk.MIB, 16 * gib) > 200 * disk.MIB


def test_check_names_the_shortfall_in_one_line(tmp_path: Path) -> None:
    short = disk.check("the export of job j-1", tmp_path, needed=10 * disk.GIB, free=3 * disk.GIB)
    assert short is not None
    line = str(short)
    assert "\n" not in line and "10.0 GiB needed" in line and "3.0 GiB free" in line and str(tmp_path) in line
    assert disk.check("x", tmp_path, needed=1, free=2) is None
    assert disk.free_bytes(tmp_path / "not" / "yet") > 0  # the nearest existing parent answers


def test_human() -> None:
    assert [disk.human(n) for n in (0, 1023, 1536, 5 * disk.GIB)] == ["0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
