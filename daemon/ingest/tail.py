"""Durable JSONL cursors: read only complete new lines; notice truncation, replacement, rewrites and deletion.

A cursor is (device, inode, size, mtime, offset, complete lines before offset, hash of the first <= 4 KiB and hash
of the <= 1 KiB before ``offset``). The head hash catches a file replaced or rewritten from the start; the boundary
hash catches an in-place rewrite (ChatOS deleting a chat) that happens to leave the file as long as before.
When any of them disagrees with the file, the file is read again from byte 0 and its records reconciled.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from daemon.state.rows import Cursor

HEAD_BYTES = 4096
BOUNDARY_BYTES = 1024
CHUNK = 1 << 20

Mode = Literal["new", "append", "reread", "unchanged", "gone", "unreadable"]


@dataclass(slots=True)
class Plan:
    """What to do with one file now. ``reason`` says why a re-read is needed (for the log)."""

    path: str
    mode: Mode
    reason: str = ""
    st: os.stat_result | None = None
    start: int = 0
    start_line: int = 0


def _hash(fd: int, start: int, length: int) -> str:
    data = os.pread(fd, length, start) if length else b""
    return hashlib.sha256(data).hexdigest()[:32]


def plan(path: str, cursor: Cursor | None) -> Plan:
    """Decide, from stat and two small hashes, how to read ``path`` given its last cursor."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Plan(path, "gone", "file deleted") if cursor else Plan(path, "unchanged")
    except OSError as exc:
        return Plan(path, "unreadable", f"cannot stat: {exc.strerror}")
    if not stat.S_ISREG(st.st_mode):
        what = "directory" if stat.S_ISDIR(st.st_mode) else "special file"
        if cursor:
            return Plan(path, "gone", f"replaced by a {what}")
        return Plan(path, "unreadable", f"not a regular file ({what})")
    if cursor is None:
        return Plan(path, "new", "", st)
    if (st.st_dev, st.st_ino) != (cursor.dev, cursor.ino):
        return Plan(path, "reread", "replaced (new inode)", st)
    if st.st_size < cursor.offset:
        return Plan(path, "reread", f"truncated ({st.st_size} < {cursor.offset} bytes read)", st)
    if st.st_size == cursor.size and st.st_mtime_ns == cursor.mtime_ns:
        return Plan(path, "unchanged", "", st)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return Plan(path, "unreadable", f"cannot open: {exc.strerror}")
    try:
        if _hash(fd, 0, cursor.head_len) != cursor.head_hash:
            return Plan(path, "reread", "rewritten (start of file changed)", st)
        if _hash(fd, cursor.offset - cursor.tail_len, cursor.tail_len) != cursor.tail_hash:
            return Plan(path, "reread", "rewritten (already-read bytes changed)", st)
    finally:
        os.close(fd)
    if st.st_size == cursor.offset:
        # Same bytes, only the mtime moved (touch, or a rewrite with identical content): just record it.
        return Plan(path, "unchanged", "", st)
    return Plan(path, "append", "", st, cursor.offset, cursor.lines)


def open_for_read(path: str) -> int:
    """Open a regular file without blocking (a FIFO swapped in after ``plan`` must not hang us)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


class Block(NamedTuple):
    """Complete lines read in one go: ``lines[i]`` is line ``first + i``; the first starts at byte ``offset`` and each
    next one right after the previous one's newline."""

    first: int
    offset: int
    lines: list[bytes]


class Oversize(NamedTuple):
    """A complete line longer than the cap: where it is and how long, without its bytes."""

    number: int
    offset: int
    length: int


def read_blocks(fd: int, start: int, start_line: int, max_line: int) -> Iterator[Block | Oversize]:
    """Complete lines from ``start`` to the end of file, a chunk's worth at a time: :class:`Block` runs of lines,
    and each line longer than ``max_line`` as an :class:`Oversize` (its bytes are never held). A partial last line
    is not yielded: it waits for its writer.

    Bulk ingest reads 200k lines: one ``split`` per 1 MiB chunk instead of a ``find`` and an object per line makes
    reading ~4x cheaper (tests/unit/test_fast_paths.py checks it against the plain line-by-line reader).
    """
    pos = start
    number = start_line
    pending = b""  # the start of a line whose newline is not read yet
    pending_off = start
    skipping = False  # that line is over the cap: its bytes are not kept, only counted
    while True:
        chunk = os.pread(fd, CHUNK, pos)
        if not chunk:
            return
        chunk_off = pos
        pos += len(chunk)
        first_nl = chunk.find(b"\n")
        if first_nl < 0:
            if not skipping:
                pending += chunk
                if len(pending) > max_line:
                    skipping, pending = True, b""
            continue
        number += 1
        if skipping:
            yield Oversize(number, pending_off, chunk_off + first_nl - pending_off)
            skipping = False
        else:
            yield from _capped(number, pending_off, [pending + chunk[:first_nl]], max_line)
        last_nl = chunk.rfind(b"\n")
        if last_nl > first_nl:
            lines = chunk[first_nl + 1:last_nl].split(b"\n")
            yield from _capped(number + 1, chunk_off + first_nl + 1, lines, max_line)
            number += len(lines)
        pending, pending_off = chunk[last_nl + 1:], chunk_off + last_nl + 1
        if len(pending) > max_line:
            skipping, pending = True, b""


def _capped(first: int, offset: int, lines: list[bytes], max_line: int) -> Iterator[Block | Oversize]:
    """``Block(first, offset, lines)``, with any line over ``max_line`` split out as an :class:`Oversize`."""
    if max(map(len, lines)) <= max_line:
        yield Block(first, offset, lines)
        return
    run: list[bytes] = []
    run_first, run_off = first, offset
    for i, data in enumerate(lines):
        if len(data) > max_line:
            if run:
                yield Block(run_first, run_off, run)
            yield Oversize(first + i, offset, len(data))
            run, run_first, run_off = [], first + i + 1, offset + len(data) + 1
        else:
            run.append(data)
        offset += len(data) + 1
    if run:
        yield Block(run_first, run_off, run)


def cursor_after(path: str, kind: str, fd: int, st: os.stat_result, offset: int, lines: int) -> Cursor:
    """The cursor to store after reading up to ``offset`` (the byte after the last complete line)."""
    head_len = min(HEAD_BYTES, offset)
    tail_len = min(BOUNDARY_BYTES, offset)
    return Cursor(
        path=path,
        kind=kind,
        dev=st.st_dev,
        ino=st.st_ino,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        offset=offset,
        lines=lines,
        head_len=head_len,
        head_hash=_hash(fd, 0, head_len),
        tail_len=tail_len,
        tail_hash=_hash(fd, offset - tail_len, tail_len),
    )


def touched(cursor: Cursor, st: os.stat_result) -> Cursor:
    """The same cursor with the file's new size/mtime (nothing new to read)."""
    return replace(cursor, size=st.st_size, mtime_ns=st.st_mtime_ns)
