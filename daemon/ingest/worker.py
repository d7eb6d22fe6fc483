"""The cold-ingest parse worker: a child process that reads and parses new store files while the service writes.

A bulk ingest (a cold start) spends about as long parsing lines as writing them to SQLite. :class:`ParseWorker`
(the parent side, in the service) starts :func:`main` in a child process through ``proc.spawn_piped`` and hands it
the new files to read from byte 0, in the order it will store them; the child streams each file's parsed blocks back
while the parent writes the previous ones. Only the parent ever writes state; anything the child cannot supply (it
died, a file changed under it) the parent reads itself (:class:`Fallback`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import select
import stat
import struct
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from daemon import faults, log
from daemon.dataset import examples
from daemon.ingest import tail
from daemon.ingest.blocks import parse_block
from daemon.ingest.records import Kind, score

_log = log.get("daemon.ingest")


class Fallback(Exception):
    """The parse worker cannot supply this file (gone, replaced, or content it left out): parse it here."""


class ParseWorker:
    """The parent side of :func:`main`: starts the child with the files to parse (in the order this process
    will store them) and hands their parsed blocks over as they come. The child runs ahead by what the pipe (1 MiB)
    and this side's buffer hold: whenever this process takes a block it also takes whatever else is ready, up to
    ``AHEAD`` bytes, without waiting. (A reader thread would wait for the GIL on every pipe read while this thread
    runs Python: that cost more than it overlapped.)"""

    AHEAD = 4 << 20

    def __init__(self, tasks: list[tuple[str, Kind, int, int]], max_line: int, spawn: Callable[[Sequence[str]], Any],
                 spec: examples.Spec | None = None) -> None:
        self.tasks = {path: i for i, (path, _, _, _) in enumerate(tasks)}
        self._buf = bytearray()
        self._pos = 0  # where the next frame starts in _buf
        self._eof = False
        self._next = 0  # the task whose frames come next
        self._pending: tuple[Any, ...] | None = None
        self.failed = False
        self.hashes: tuple[str, str] | None = None  # the cursor hashes of the last file supplied
        code = f"import sys; sys.path[:] = {sys.path!r}; from daemon.ingest.worker import main; main()"
        self._proc = spawn([sys.executable, "-I", "-c", code])
        if self._proc.stdin is None or self._proc.stdout is None:  # a spawn seam that gave no pipes
            self.close()
            raise OSError("the parse worker was started without pipes")
        self._fd = self._proc.stdout.fileno()
        with contextlib.suppress(OSError, AttributeError):  # a larger pipe lets the child run further ahead
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        try:
            self._proc.stdin.write(pickle.dumps((tasks, max_line, spec)))
            self._proc.stdin.close()
        except OSError:  # it died before taking its tasks (broken pipe)
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
            self.close()
            raise

    def _read(self, wait: bool) -> bool:
        """Append what the pipe holds, waiting for it when ``wait``; whether anything came."""
        if self._eof or (not wait and not select.select([self._fd], [], [], 0)[0]):
            return False
        data = os.read(self._fd, 1 << 20)
        self._buf += data
        self._eof = not data
        return bool(data)

    def _frame(self) -> tuple[Any, ...] | None:
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        while True:
            pos, buf = self._pos, self._buf
            if len(buf) - pos >= 4:
                (size,) = struct.unpack_from("<I", buf, pos)
                if len(buf) - pos >= 4 + size:
                    got: tuple[Any, ...] = pickle.loads(memoryview(buf)[pos + 4:pos + 4 + size])  # from our child
                    self._pos = pos + 4 + size
                    if self._pos > len(buf) // 2:
                        del buf[:self._pos]
                        self._pos = 0
                    while len(buf) - self._pos < self.AHEAD and self._read(wait=False):
                        pass  # take what else is ready: the child goes on parsing meanwhile
                    return got
            if not self._read(wait=True):
                return None

    def blocks(self, path: str) -> Iterator[tuple[int, int, list[int], list[Any], list[Any]] | tail.Oversize]:
        """``path``'s parsed blocks; raises :class:`Fallback` when the worker cannot supply them, and OSError
        when reading the file failed (as reading it here would have)."""
        task = self.tasks.get(path)
        if task is None or self.failed or task < self._next:
            raise Fallback
        while True:
            frame = self._frame()
            if frame is None:
                self.failed = True
                _log.warning("ingest.parse_worker_stopped", exit_code=self._proc.poll())
                raise Fallback
            if frame[1] == "crash":
                self.failed = True
                _log.warning("ingest.parse_worker_failed", error=frame[2].strip().splitlines()[-1])
                raise Fallback
            if frame[0] < task:
                continue  # a file this process skipped
            if frame[0] > task:  # this file's frames are gone: only when skipped earlier; keep the frame
                self._pending = frame
                raise Fallback
            tag = frame[1]
            if tag == "lines":
                yield frame[2], frame[3], frame[4], frame[5], frame[6]
            elif tag == "oversize":
                yield tail.Oversize(*frame[2:5])
            elif tag == "end":
                self._next = task + 1
                self.hashes = (frame[2], frame[3])
                return
            elif tag == "error":
                self._next = task + 1
                raise OSError(frame[2], frame[3])
            else:  # "skip": not the file this process has open
                self._next = task + 1
                raise Fallback

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


# -- the child side ------------------------------------------------------------------------------------------
#
# Frames on stdout: a 4-byte length, then a pickle of (task, tag, ...): "lines" (first line number, offset, line
# lengths, parse_block results, cache entries ``(cid, *examples.Entry)``), "oversize" (number, offset, length),
# "end" (the cursor's head and boundary hashes for what was read), "error" (errno, message: reading failed),
# "skip" (not the file the parent saw), "crash" (traceback text). Given an examples.Spec, the child also makes the
# dataset build's cache entries for the logs/ conversations it expects the build to want (the build's own CPU,
# moved to the core the parent leaves idle). It reads, parses and answers; it never writes anything, and exits at
# the end of its list or when the parent goes away (broken pipe).


class _Child:
    def __init__(self, max_line: int, spec: examples.Spec | None) -> None:
        self.max_line = max_line
        self.spec = spec
        self.out = sys.stdout.buffer
        self.known: set[str] = set()
        # cid -> [timestamp, thumbs_up, timestamp, quality]: its latest thumbs vote and latest quality rating seen
        # (the label rule of state.feedback: the thumbs vote when there is one, else the quality)
        self.labels: dict[str, list[Any]] = {}

    def send(self, *frame: Any) -> None:
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        self.out.write(struct.pack("<I", len(data)) + data)
        self.out.flush()

    def label(self, cid: str) -> int | None:
        """The score the build will see for ``cid`` from the feedback read so far (None: no event yet)."""
        lab = self.labels.get(cid)
        return None if lab is None else score(lab[1], lab[3])

    def entries(self, results: list[Any], pairs: list[Any]) -> list[tuple[Any, ...]]:
        """Cache entries (examples.cache_entry) for the conversations a build will likely want."""
        spec = self.spec
        out: list[tuple[Any, ...]] = []
        if spec is None:
            return out
        for r, msgs in zip(results, pairs, strict=True):
            if msgs is not None and examples.expected(spec, r, self.label(r[0])):
                out.append((r[0], *examples.cache_entry(r[0], r[1].encode(), spec, msgs)))
        return out

    def frame(self, task: int, kind: Kind, lines: list[bytes], first: int, offset: int) -> int:
        """One "lines" frame: the lines parsed, what they teach about later lines, and their cache entries.
        Returns the lines' length in bytes (without their newlines)."""
        pairs: list[Any] | None = [] if kind == "logs" and self.spec is not None else None
        results = parse_block(lines, kind, self.known, pairs)
        made: list[tuple[Any, ...]] = []
        if kind == "logs":
            self.known.update(r[0] for r in results if type(r) is tuple)
            if pairs is not None:
                made = self.entries(results, pairs)
        elif kind == "feedback":
            for ev in results:  # latest by timestamp, then arrival (as state.feedback.refresh_labels)
                e: Any = ev
                if type(e) is tuple:
                    lab = self.labels.setdefault(e[0], [None, None, None, None])
                    if e[1] is not None and (lab[0] is None or e[4] >= lab[0]):
                        lab[0], lab[1] = e[4], e[1]
                    if e[2] is not None and (lab[2] is None or e[4] >= lab[2]):
                        lab[2], lab[3] = e[4], e[2]
        lengths = [len(x) for x in lines]
        self.send(task, "lines", first, offset, lengths, results, made)
        return sum(lengths)

    def read(self, task: int, path: str, kind: Kind, fd: int) -> None:
        """Every complete line of the open file, as frames, then the cursor hashes of what was read."""
        end = lines_read = 0
        for block in tail.read_blocks(fd, 0, 0, self.max_line):
            if isinstance(block, tail.Oversize):
                self.send(task, "oversize", *block)
                end, lines_read = block.offset + block.length + 1, block.number
                continue
            first, offset = block.first, block.offset
            for i in range(0, len(block.lines), 256):  # small frames: several fit in the pipe
                lines = block.lines[i:i + 256]
                size = self.frame(task, kind, lines, first, offset)
                first, offset = first + len(lines), offset + size + len(lines)
            end, lines_read = offset, first - 1
        # What the parent's cursor will say about these bytes: if the file changes before the parent stores it,
        # the hashes differ and the parent reads the file itself.
        cur = tail.cursor_after(path, kind, fd, os.fstat(fd), end, lines_read)
        self.send(task, "end", cur.head_hash, cur.tail_hash)

    def file(self, task: int, path: str, kind: Kind, dev: int, ino: int) -> None:
        faults.point("parse_worker.file")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            self.send(task, "skip")
            return
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (dev, ino) or not stat.S_ISREG(st.st_mode):
                self.send(task, "skip")
                return
            self.read(task, path, kind, fd)
        except OSError as exc:
            self.send(task, "error", exc.errno, exc.strerror or str(exc))
        finally:
            os.close(fd)


def main() -> None:  # pragma: no cover - runs in the child; exercised through ingest.ingestor
    tasks, max_line, spec = pickle.load(sys.stdin.buffer)
    child = _Child(max_line, spec)
    try:
        for task, (path, kind, dev, ino) in enumerate(tasks):
            child.file(task, path, kind, dev, ino)
    except BrokenPipeError:
        return  # the parent is gone
    except Exception:  # a bug: say what, so the parent can log it and parse by itself
        child.send(len(tasks), "crash", traceback.format_exc())
