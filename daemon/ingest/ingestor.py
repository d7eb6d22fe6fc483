"""Ingest the ChatOS store into state: scan, read new complete lines, reconcile rewrites, all or nothing per file.

Every file's record upserts, rejected lines and cursor move commit together, so a crash at any point loses
nothing and counts nothing twice: the next run starts from the last committed cursor. A scan that reads a lot
(a cold start) groups several files into one transaction, each file in its own savepoint: an unreadable file
undoes only its own writes, and a crash undoes the whole group, cursors included. Fewer, larger commits make a
cold ingest ~25% cheaper: the id indexes' pages are written to the WAL once per group instead of once per file.
A scan with many new files (a cold start) parses them in a child process (ingest.worker, started through
proc.spawn_piped: proc is the one module that starts processes) while this one writes: the two cores then
share the work. Only this process ever writes state, so atomicity is the same either way, and anything the worker
cannot supply (it died, a file changed under it) is read here instead.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from daemon import codec, faults, log, proc
from daemon.dataset import examples, selection
from daemon.ingest import records, tail
from daemon.ingest import worker as parse_worker
from daemon.ingest.records import Conversation, ConvTuple, Kind, Rejected, Rejection
from daemon.settings import Settings
from daemon.state import State, utcnow
from daemon.state.rows import Cursor

DATA_FOLDERS = ("logs", "training_data", "feedback")
BATCH = 2000
GROUP_BYTES = 32 << 20  # a scan commits after about this many bytes read (and at its end)
PARALLEL_BYTES = 16 << 20  # new files holding this much are parsed in a child process (0: never)
_TOP_RANK = max(records.RANK.values())
_log = log.get("daemon.ingest")


@dataclass
class IngestReport:
    files_seen: int = 0
    files_read: int = 0
    rereads: int = 0
    bytes_read: int = 0
    conversations: int = 0
    feedback_events: int = 0
    rejected: int = 0
    deleted: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["seconds"] = round(self.seconds, 4)
        d["skipped"] = len(self.skipped)
        return d


def _messages_json(conv: Conversation) -> str:
    return codec.messages_json((m.role, m.content) for m in conv.messages)


class _Group:
    """The transaction a scan's files share: opened at the first write, committed every ``limit`` bytes read."""

    def __init__(self, state: State, limit: int) -> None:
        self.state = state
        self.limit = limit
        self.read = 0
        self._stack: ExitStack | None = None

    @contextmanager
    def atomic(self) -> Iterator[None]:
        if self._stack is None:
            self._stack = ExitStack()
            self._stack.enter_context(self.state.transaction())
            self.read = 0
        with self.state.atomic():
            yield

    def add(self, nbytes: int) -> None:
        self.read += nbytes
        if self.read >= self.limit:
            self.commit()

    def commit(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def abort(self, exc: BaseException) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.__exit__(type(exc), exc, exc.__traceback__)


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
        self._group: _Group | None = None
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
        self._group = group = _Group(self.state, GROUP_BYTES)
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
        report.seconds = time.perf_counter() - t0
        return report

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
        st = self.state
        rank = records.RANK.get(kind, 0)
        top: set[str] = set()  # ids stored from this file with top-rank content
        warnings: list[tuple[int, str]] = []  # given once the file's writes are in
        with self._atomic():
            old_ids: set[str] = set()
            prev_rejects: set[str] = set()
            if reread:
                old_ids = st.conversations.sighted_in(path)
                prev_rejects = set(st.rejects.for_path(path).values())
                st.conversations.forget_path(path)
            new_ids: set[str] = set()
            rejects: list[tuple[int, str, str]] = []
            conv_batch: list[tuple[ConvTuple, int, int]] = []  # record, offset, length
            fb_batch: list[tuple[Any, ...]] = []
            entries: list[tuple[Any, ...]] = []  # cache entries the parse worker made for conv_batch's records
            end, lines = start, start_line

            def reject(number: int, reason: str, h: str) -> None:
                rejects.append((number, reason, h))
                if h not in prev_rejects:
                    warnings.append((number, reason))

            def flush() -> None:
                if conv_batch:
                    _upsert(st, conv_batch, path, rank, self._top)
                    report.conversations += len(conv_batch)
                    if reread:
                        new_ids.update(r[0] for r, _, _ in conv_batch)
                    if rank == _TOP_RANK:
                        top.update(r[0] for r, _, _ in conv_batch)
                    conv_batch.clear()
                if entries:
                    st.examples.put_entries(self.examples.key, entries)  # type: ignore[union-attr]
                    entries.clear()
                if fb_batch:
                    st.feedback.add(fb_batch)
                    report.feedback_events += len(fb_batch)
                    fb_batch.clear()

            if kind == "training_json":
                size = os.fstat(fd).st_size
                data = os.pread(fd, min(size, self.max_line + 1), 0)
                end, lines = len(data), 1
                report.bytes_read += len(data)
                if len(data) > self.max_line:
                    reject(1, f"file over {self.max_line} bytes", records.line_hash(data[:4096]))
                else:
                    fallback = "json-" + hashlib.sha1(os.path.basename(path).encode()).hexdigest()[:12]
                    rec = records.parse_conversation(data, kind, fallback_id=fallback)
                    if isinstance(rec, Rejection):
                        reject(1, rec.reason, records.line_hash(data))
                    else:
                        msgs = _messages_json(rec)
                        row = (rec.conversation_id, msgs, rec.mode, rec.model, rec.quality, rec.thumbs_up,
                               rec.inline_score, rec.inline_rated, rec.usable, rec.started_at)
                        conv_batch.append((row, 0, len(data)))
            else:
                source = worker.blocks(path) if worker is not None else self._parsed(fd, start, start_line, kind)
                for block in source:
                    if isinstance(block, tail.Oversize):
                        number, off, length = block
                        reject(number, f"line over {self.max_line} bytes ({length} bytes)", f"long-{off}-{length}")
                        end, lines = off + length + 1, number
                        continue
                    first, offset, lengths, results, made = block
                    entries += made
                    number, off = first - 1, offset
                    for n, r in zip(lengths, results, strict=True):
                        number += 1
                        if type(r) is Rejected:
                            reject(number, r.reason, r.line_hash)
                        elif kind == "feedback":
                            fb_batch.append((path, number, *r))
                        else:
                            conv_batch.append((r, off, n))
                        off += n + 1
                    report.bytes_read += off - offset
                    end, lines = off, number
                    if len(conv_batch) >= BATCH or len(fb_batch) >= BATCH:
                        flush()
            flush()
            if reread:
                report.deleted += st.conversations.reconcile_vanished(old_ids - new_ids)
            st.rejects.replace(path, rejects, from_line=0 if reread else start_line + 1)
            report.rejected += len([r for r in rejects if r[2] not in prev_rejects])
            faults.point("ingest.before_cursor")
            cursor = tail.cursor_after(path, kind, fd, os.fstat(fd), end, lines)
            if worker is not None and worker.hashes != (cursor.head_hash, cursor.tail_hash):
                # the file changed after the worker read it: what it parsed is not what is there
                raise parse_worker.Fallback
            st.cursors.save(cursor)
        self._top |= top
        for number, reason in warnings:
            _log.warning("ingest.line_rejected", file=path, line=number, reason=reason)

    def _parsed(
        self, fd: int, start: int, start_line: int, kind: Kind
    ) -> Iterator[tuple[int, int, list[int], list[Any], list[Any]] | tail.Oversize]:
        """Blocks of parsed lines read here (what the parse worker sends, without the worker and its cache
        entries: parsing here is on the critical path)."""
        for block in tail.read_blocks(fd, start, start_line, self.max_line):
            if isinstance(block, tail.Oversize):
                yield block
            else:
                yield block.first, block.offset, [len(x) for x in block.lines], records.parse_block(
                    block.lines, kind, self._top), []


def _upsert(st: State, batch: list[tuple[ConvTuple, int, int]], path: str, rank: int, top: set[str]) -> None:
    """Upsert one file's records. A record whose conversation already has content from a higher-ranked source (the
    training_data/ copy of a logs/ record) would not change it: only its sighting is recorded, which skips writing a
    row for a third of a cold ingest's records and for every new record's copy afterwards. ``top``: ids known to
    have top-rank content already (asking state costs a random page read per id); a record parsed without its
    messages (records.parse_block) must be one of those, or in state at a higher rank."""
    outranked: set[str] = set()
    if rank < _TOP_RANK:
        ids = {r[0] for r, _, _ in batch}
        outranked = ids & top
        outranked |= st.conversations.outranked(ids - outranked, rank)
    rows = [(r[0], rank, *r[1:], path, off, n) for r, off, n in batch if r[0] not in outranked]
    if any(row[2] is None for row in rows):
        raise parse_worker.Fallback  # the parse worker left out content that is needed after all
    if rows:
        st.conversations.upsert(rows)
    if outranked:
        st.conversations.add_sightings([(path, r[0], rank) for r, _, _ in batch if r[0] in outranked])


def ingest(settings: Settings, state: State, paths: Iterable[str] | None = None) -> IngestReport:
    """Read what is new in the store (all of it, or just ``paths``) into state."""
    ingestor = Ingestor(state, settings.store.root, max_line_bytes=settings.store.max_line_bytes,
                   examples=selection.example_spec(settings.dataset))
    report = ingestor.scan(paths)
    with state.transaction():
        state.service.set_last_ingest_at(utcnow())
    return report
