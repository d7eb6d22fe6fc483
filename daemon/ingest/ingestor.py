"""Ingest the ChatOS store into state: scan, read new complete lines, reconcile rewrites, all or nothing per file.

Every file's record upserts, rejected lines and cursor move commit together, so a crash at any point loses
nothing and counts nothing twice: the next run starts from the last committed cursor. A scan that reads a lot
(a cold start) groups several files into one transaction, each file in its own savepoint: an unreadable file
undoes only its own writes, and a crash undoes the whole group, cursors included. Fewer, larger commits make a
cold ingest ~25% cheaper (``ingest.scan_group``).
A scan with many new files (a cold start) parses them in a child process (ingest.worker, started through
proc.spawn_piped: proc is the one module that starts processes) while this one writes: the two cores then
share the work. Only this process ever writes state, so atomicity is the same either way, and anything the worker
cannot supply (it died, a file changed under it) is read here instead.
This module plans a scan (which files, which of them the parse worker takes, what each one needs);
``ingest.file_read`` reads one file inside its atomic unit.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import date, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from daemon import log, proc
from daemon.dataset import examples, selection
from daemon.ingest import blocks, records, tail
from daemon.ingest import worker as parse_worker
from daemon.ingest.file_read import FileRead, IngestReport, ParsedBlock
from daemon.ingest.records import Kind
from daemon.ingest.scan_group import ScanGroup
from daemon.settings import Settings
from daemon.state import State, utcnow
from daemon.state.rows import Cursor

__all__ = ["DATA_FOLDERS", "GROUP_BYTES", "PARALLEL_BYTES", "IngestReport", "Ingestor", "ingest"]

_LOGS_DAY = re.compile(r"conversations_(\d{4}-\d{2}-\d{2})\.jsonl")
_TRAINING_DAY = re.compile(r"training_(\d{4}-\d{2}-\d{2})\.jsonl")
DATA_FOLDERS = ("logs", "training_data", "feedback")
GROUP_BYTES = 32 << 20  # a scan commits after about this many bytes read (and at its end)
PARALLEL_BYTES = 16 << 20  # new files holding this much are parsed in a child process (0: never)
_log = log.get("daemon.ingest")


class Ingestor:
    """Reads one store root into one :class:`State`. Warnings about unreadable paths are given once each."""

    def __init__(self, state: State, root: Path, *, max_line_bytes: int = 4 << 20,
                 spawn: Callable[[Sequence[str]], Any] | None = None, examples: examples.Spec | None = None) -> None:
        self.state = state
        self.examples = examples  # the dataset build's settings: the parse worker makes its cache entries ahead
        self.spawn = spawn or proc.spawn_piped  # starts the parse worker (a seam for tests)
        self.root = Path(root)
        self.max_line = max_line_bytes
        self._warned: set[tuple[str, str]] = set()
        self._group: ScanGroup | None = None
        # Ids this scan stored with logs/ content, in files whose writes are final unless the whole scan fails: the
        # training_data/ copies of those need no query to learn they are outranked (rank never goes down).
        self._top: set[str] = set()
        self._worker: parse_worker.ParseWorker | None = None

    # -- listing ---------------------------------------------------------------------------------------------

    def _warn_once(self, path: str, event: str, **kw: Any) -> None:
        key = (path, event)
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(event, file=path, **kw)

    def _inside_root(self, p: Path) -> bool:
        try:
            real_root = os.path.realpath(self.root)
            real = os.path.realpath(p)
        except OSError:  # pragma: no cover - realpath does not raise on loops since 3.8; keep safe
            return False
        return real == real_root or real.startswith(real_root + os.sep)

    def list_data_files(self) -> list[tuple[str, Kind]]:
        """Data files under the root (sorted), skipping symlinks that lead outside it and non-data files."""
        out: list[tuple[str, Kind]] = []
        seen_inodes: set[tuple[int, int]] = set()
        for folder in DATA_FOLDERS:
            d = self.root / folder
            if d.is_symlink() and not self._inside_root(d):
                self._warn_once(str(d), "ingest.symlink_outside_root", reason="folder symlink leads outside the store")
                continue
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._warn_once(str(d), "ingest.unreadable", reason=exc.strerror or str(exc))
                continue
            for e in entries:
                kind = records.classify(PurePosixPath(folder, e.name))
                if kind is None:
                    continue
                if e.is_symlink() and not self._inside_root(Path(e.path)):
                    self._warn_once(e.path, "ingest.symlink_outside_root", reason="not followed")
                    continue
                try:
                    st = os.stat(e.path)
                except OSError:
                    # dangling or looping symlink, or vanished since scandir: plan() reports it
                    out.append((e.path, kind))
                    continue
                key = (st.st_dev, st.st_ino)
                if key in seen_inodes:
                    continue
                seen_inodes.add(key)
                out.append((e.path, kind))
        return out

    def kind_of(self, path: str) -> Kind | None:
        try:
            rel = PurePosixPath(Path(path).relative_to(self.root))
        except ValueError:
            return None
        return records.classify(rel)

    # -- scanning --------------------------------------------------------------------------------------------

    def scan(self, paths: Iterable[str] | None = None) -> IngestReport:
        """Full scan (``paths`` None: every data file plus every tracked one) or just the given paths."""
        t0 = time.perf_counter()
        report = IngestReport()
        cursors = self.state.cursors.all()
        if paths is None:
            todo: dict[str, Kind] = dict(self.list_data_files())
            for p, c in cursors.items():
                if p not in todo and self._under_root(p):
                    todo[p] = c.kind  # type: ignore[assignment]
        else:
            todo = {}
            for p in paths:
                k = self.kind_of(p)
                if k is not None:
                    todo[p] = k
        self._group = group = ScanGroup(self.state, GROUP_BYTES)
        self._worker = self._start_worker(todo, cursors)
        try:
            for p in sorted(todo):
                report.files_seen += 1
                before = report.bytes_read
                self.ingest_file(p, todo[p], cursors.get(p), report)
                group.add(report.bytes_read - before)
        except BaseException as exc:
            group.abort(exc)
            raise
        else:
            group.commit()
        finally:
            self._group = None
            self._top = set()
            if self._worker is not None:
                self._worker.close()
                self._worker = None
        if any(kind == "training" and p not in cursors for p, kind in todo.items()):
            # a training_data day file read for the first time: a first install, or a new day (once a day)
            report.deleted += self._retire_unlogged()
        report.seconds = time.perf_counter() - t0
        return report

    def _retire_unlogged(self) -> int:
        """Chats deleted in ChatOS before this service ever read their day's log (a first install over an old store).

        ChatOS's logger writes the ``logs/`` record and the ``training_data/`` copy of a request together, and
        deleting a chat rewrites (or unlinks) the day's ``logs/`` file while the copy stays. So a copy in
        ``training_YYYY-MM-DD.jsonl`` whose conversation is in no ``logs/`` file points to a deleted chat, judged
        once the day is over (a newer ``conversations_*.jsonl`` exists) and the logs of the day and its neighbours
        (a request can straddle midnight) have been read. A store without any ``logs/`` file proves nothing."""
        days = {m.group(1): p for p in self.root.glob("logs/conversations_*.jsonl")
                if (m := _LOGS_DAY.fullmatch(p.name))}
        if not days:
            return 0
        newest, read = max(days), set(self.state.cursors.all())
        gone = set()
        for cid, path in self.state.conversations.unlogged():
            m = _TRAINING_DAY.fullmatch(Path(path).name)
            if m is None or m.group(1) >= newest:
                continue
            try:
                near = [(date.fromisoformat(m.group(1)) + timedelta(days=k)).isoformat() for k in (-1, 0, 1)]
            except ValueError:  # not a calendar date: nothing to compare with
                continue
            if all(str(days[d]) in read for d in near if d in days):
                gone.add(cid)
        if not gone:
            return 0
        with self.state.transaction():
            retired = sum(self.state.conversations.mark_deleted(cid) for cid in sorted(gone))
        _log.info("ingest.deleted_before_read", conversations=retired,
                  reason="a training_data copy whose chat is in no logs/ file of its day")
        return retired

    def _start_worker(self, todo: dict[str, Kind], cursors: dict[str, Cursor]) -> parse_worker.ParseWorker | None:
        """A parse worker for the files never read before, when they hold enough to be worth a process."""
        if PARALLEL_BYTES <= 0:
            return None
        tasks: list[tuple[str, Kind, int, int]] = []
        total = 0
        for path in sorted(todo):
            if path in cursors or todo[path] not in ("logs", "training", "feedback"):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue  # ingest_file says why
            tasks.append((path, todo[path], st.st_dev, st.st_ino))
            total += st.st_size
        if total < PARALLEL_BYTES:
            return None
        try:
            return parse_worker.ParseWorker(tasks, self.max_line, self.spawn, self.examples)
        except OSError as exc:  # cannot start a process (limits, sandbox): parse here
            _log.warning("ingest.parse_worker_unavailable", reason=exc.strerror or str(exc))
            return None

    def _atomic(self) -> AbstractContextManager[None]:
        """One file's writes, all or nothing: inside a scan, a savepoint in the scan's group transaction."""
        return self._group.atomic() if self._group is not None else self.state.transaction()

    def _under_root(self, p: str) -> bool:
        return p.startswith(str(self.root) + os.sep)

    def ingest_file(self, path: str, kind: Kind, cursor: Cursor | None, report: IngestReport) -> None:
        p = tail.plan(path, cursor)
        if Path(path).is_symlink() and not self._inside_root(Path(path)):
            p = tail.Plan(path, "gone", "now a symlink outside the store") if cursor else tail.Plan(path, "unchanged")
        if p.mode == "unchanged":
            if cursor and p.st and (p.st.st_size, p.st.st_mtime_ns) != (cursor.size, cursor.mtime_ns):
                with self._atomic():
                    self.state.cursors.save(tail.touched(cursor, p.st))
            return
        if p.mode == "unreadable":
            report.skipped.append(path)
            self._warn_once(path, "ingest.unreadable", reason=p.reason)
            return
        if p.mode == "gone":
            with self._atomic():
                old = self.state.conversations.sighted_in(path)
                self.state.conversations.forget_path(path)
                report.deleted += self.state.conversations.reconcile_vanished(old)
                self.state.rejects.drop(path)
                self.state.cursors.drop(path)
            _log.info("ingest.file_gone", file=path, reason=p.reason, conversations_dropped=len(old))
            return
        if kind == "training_json" and p.mode == "append":
            p.mode, p.reason = "reread", "whole-file JSON changed"
        try:
            fd = tail.open_for_read(path)
        except OSError as exc:
            report.skipped.append(path)
            self._warn_once(path, "ingest.unreadable", reason=exc.strerror or str(exc))
            return
        self._warned = {w for w in self._warned if w[0] != path}
        try:
            worker = self._worker if p.mode == "new" else None
            if worker is not None and path in worker.tasks:
                counts = dict(report.__dict__, skipped=list(report.skipped))
                try:
                    self._read(fd, path, kind, p, report, worker)
                    return
                except parse_worker.Fallback:  # its writes were rolled back: read it here
                    report.__dict__.update(counts)
            self._read(fd, path, kind, p, report)
        except OSError as exc:  # I/O error mid-read: the transaction rolled back, the cursor did not move
            report.skipped.append(path)
            _log.warning("ingest.read_failed", file=path, reason=exc.strerror or str(exc))
        finally:
            os.close(fd)

    def _read(
        self, fd: int, path: str, kind: Kind, p: tail.Plan, report: IngestReport,
        worker: parse_worker.ParseWorker | None = None,
    ) -> None:
        reread = p.mode == "reread"
        if reread:
            report.rereads += 1
            _log.info("ingest.reread", file=path, reason=p.reason)
        start, start_line = (p.start, p.start_line) if p.mode == "append" else (0, 0)
        report.files_read += 1
        with self._atomic():
            r = FileRead(self.state, path, kind, reread=reread, report=report, known_top=self._top,
                         spec=self.examples)
            if kind == "training_json":
                end, lines = r.read_json(fd, self.max_line)
            else:
                source = worker.blocks(path) if worker is not None else self._parsed(fd, start, start_line, kind)
                end, lines = r.read_blocks(source, start, start_line, self.max_line)
            r.finish(fd, end, lines, start_line, worker)
        self._top |= r.top
        r.warn()

    def _parsed(self, fd: int, start: int, start_line: int, kind: Kind) -> Iterator[ParsedBlock]:
        """Blocks of parsed lines read here (what the parse worker sends, without the worker and its cache
        entries: parsing here is on the critical path)."""
        for block in tail.read_blocks(fd, start, start_line, self.max_line):
            if isinstance(block, tail.Oversize):
                yield block
            else:
                yield block.first, block.offset, [len(x) for x in block.lines], blocks.parse_block(
                    block.lines, kind, self._top), []


def ingest(settings: Settings, state: State, paths: Iterable[str] | None = None) -> IngestReport:
    """Read what is new in the store (all of it, or just ``paths``) into state."""
    ingestor = Ingestor(state, settings.store.root, max_line_bytes=settings.store.max_line_bytes,
                   examples=selection.example_spec(settings.dataset))
    report = ingestor.scan(paths)
    with state.transaction():
        state.service.set_last_ingest_at(utcnow())
    return report
