"""Typed rows of the state database: plain values the repositories return and take."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Cursor:
    """How far one store file has been read, and what it looked like then (see ``ingest.tail``)."""

    path: str
    kind: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    offset: int
    lines: int
    head_len: int
    head_hash: str
    tail_len: int
    tail_hash: str
