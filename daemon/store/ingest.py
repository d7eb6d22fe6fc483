"""Ingest the ChatOS store into state: scan, read new complete lines, reconcile rewrites, one transaction per file.

Every file's record upserts, rejected lines and cursor move commit together, so a crash at any point loses
nothing and counts nothing twice: the next run starts from the last committed cursor.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from daemon import log
from daemon.state import ConvRow, FeedbackRow, State
from daemon.store import records, tail
from daemon.store.records import Conversation, FeedbackEvent, Kind, Rejection

DATA_FOLDERS = ("logs", "training_data", "feedback")
BATCH = 4000
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


def _line_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


_enc = json.encoder.encode_basestring  # the C string encoder json.dumps(..., ensure_ascii=False) uses


def _messages_json(conv: Conversation) -> str:
    """``json.dumps([{"role", "content"}, ...], ensure_ascii=False, separators=(",", ":"))``, byte for byte, built
    directly: it runs once per ingested record, and skipping the encoder machinery halves its cost."""
    parts = ['{"role":' + _enc(m.role) + ',"content":' + _enc(m.content) + "}" for m in conv.messages]
    return "[" + ",".join(parts) + "]"


def conv_row(conv: Conversation, path: str, offset: int, length: int) -> ConvRow:
    return ConvRow(
        cid=conv.conversation_id,
        rank=records.RANK[conv.kind],
        messages=_messages_json(conv),
        mode=conv.mode,
        model=conv.model,
        quality=conv.quality,
        thumbs_up=conv.thumbs_up,
        inline_score=conv.inline_score,
        inline_rated=conv.inline_rated,
        usable=conv.usable,
        started_at=conv.started_at,
        path=path,
        offset=offset,
        length=length,
    )


class Ingestor:
    """Reads one store root into one :class:`State`. Warnings about unreadable paths are given once each."""

    def __init__(self, state: State, root: Path, *, max_line_bytes: int = 4 << 20) -> None:
        self.state = state
        self.root = Path(root)
        self.max_line = max_line_bytes
        self._warned: set[tuple[str, str]] = set()

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
                if e.is_symlink():
                    if not self._inside_root(Path(e.path)):
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
        cursors = self.state.cursors()
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
        for p in sorted(todo):
            report.files_seen += 1
            self.ingest_file(p, todo[p], cursors.get(p), report)
        report.seconds = time.perf_counter() - t0
        return report

    def _under_root(self, p: str) -> bool:
        return p.startswith(str(self.root) + os.sep)

    def ingest_file(self, path: str, kind: Kind, cursor: tail.Cursor | None, report: IngestReport) -> None:
        p = tail.plan(path, cursor)
        if Path(path).is_symlink() and not self._inside_root(Path(path)):
            p = tail.Plan(path, "gone", "now a symlink outside the store") if cursor else tail.Plan(path, "unchanged")
        if p.mode == "unchanged":
            if cursor and p.st and (p.st.st_size, p.st.st_mtime_ns) != (cursor.size, cursor.mtime_ns):
                with self.state.transaction():
                    self.state.save_cursor(tail.touched(cursor, p.st))
            return
        if p.mode == "unreadable":
            report.skipped.append(path)
            self._warn_once(path, "ingest.unreadable", reason=p.reason)
            return
        if p.mode == "gone":
            with self.state.transaction():
                old = self.state.sighted_in(path)
                self.state.forget_path(path)
                report.deleted += self.state.reconcile_vanished(old)
                self.state.drop_rejects(path)
                self.state.drop_cursor(path)
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
            self._read(fd, path, kind, p, report)
        except OSError as exc:  # I/O error mid-read: the transaction rolled back, the cursor did not move
            report.skipped.append(path)
            _log.warning("ingest.read_failed", file=path, reason=exc.strerror or str(exc))
        finally:
            os.close(fd)

    def _read(self, fd: int, path: str, kind: Kind, p: tail.Plan, report: IngestReport) -> None:
        reread = p.mode == "reread"
        if reread:
            report.rereads += 1
            _log.info("ingest.reread", file=path, reason=p.reason)
        start, start_line = (p.start, p.start_line) if p.mode == "append" else (0, 0)
        report.files_read += 1
        st = self.state
        with st.transaction():
            old_ids: set[str] = set()
            prev_rejects: set[str] = set()
            if reread:
                old_ids = st.sighted_in(path)
                prev_rejects = set(st.rejects_for(path).values())
                st.forget_path(path)
            new_ids: set[str] = set()
            rejects: list[tuple[int, str, str]] = []
            conv_batch: list[tuple[Conversation, int, int]] = []  # record, offset, length
            fb_batch: list[FeedbackRow] = []
            end, lines = start, start_line

            def reject(number: int, reason: str, h: str) -> None:
                rejects.append((number, reason, h))
                if h not in prev_rejects:
                    _log.warning("ingest.line_rejected", file=path, line=number, reason=reason)

            if kind == "training_json":
                size = os.fstat(fd).st_size
                data = os.pread(fd, min(size, self.max_line + 1), 0)
                end, lines = len(data), 1
                report.bytes_read += len(data)
                if len(data) > self.max_line:
                    reject(1, f"file over {self.max_line} bytes", _line_hash(data[:4096]))
                else:
                    fallback = "json-" + hashlib.sha1(os.path.basename(path).encode()).hexdigest()[:12]
                    rec = records.parse_conversation(data, kind, fallback_id=fallback)
                    if isinstance(rec, Rejection):
                        reject(1, rec.reason, _line_hash(data))
                    else:
                        conv_batch.append((rec, 0, len(data)))
                        new_ids.add(rec.conversation_id)
            else:
                for item in tail.read_lines(fd, start, start_line, self.max_line):
                    if isinstance(item, tuple):
                        number, off, length = item
                        reject(number, f"line over {self.max_line} bytes ({length} bytes)", f"long-{off}-{length}")
                        end, lines = off + length + 1, number
                        continue
                    end, lines = item.offset + len(item.data) + 1, item.number
                    report.bytes_read += len(item.data) + 1
                    if kind == "feedback":
                        ev = records.parse_feedback(item.data)
                        if isinstance(ev, Rejection):
                            reject(item.number, ev.reason, _line_hash(item.data))
                        else:
                            fb_batch.append(_feedback_row(ev, path, item.number))
                    else:
                        rec = records.parse_conversation(item.data, kind)
                        if isinstance(rec, Rejection):
                            reject(item.number, rec.reason, _line_hash(item.data))
                        else:
                            conv_batch.append((rec, item.offset, len(item.data)))
                            new_ids.add(rec.conversation_id)
                    if len(conv_batch) >= BATCH:
                        _upsert(st, conv_batch, path)
                        report.conversations += len(conv_batch)
                        conv_batch.clear()
                    if len(fb_batch) >= BATCH:
                        st.add_feedback(fb_batch)
                        report.feedback_events += len(fb_batch)
                        fb_batch.clear()
            if conv_batch:
                _upsert(st, conv_batch, path)
                report.conversations += len(conv_batch)
            if fb_batch:
                st.add_feedback(fb_batch)
                report.feedback_events += len(fb_batch)
            if reread:
                report.deleted += st.reconcile_vanished(old_ids - new_ids)
            st.replace_rejects(path, rejects, from_line=0 if reread else start_line + 1)
            report.rejected += len([r for r in rejects if r[2] not in prev_rejects])
            st.save_cursor(tail.cursor_after(path, kind, fd, os.fstat(fd), end, lines))


def _upsert(st: State, batch: list[tuple[Conversation, int, int]], path: str) -> None:
    """Upsert one file's records. A record whose conversation already has content from a higher-ranked source (the
    training_data/ copy of a logs/ record) would not change it: only its sighting is recorded, which skips building
    and writing a row for a third of a cold ingest's records and for every new record's copy afterwards."""
    rank = records.RANK[batch[0][0].kind]
    outranked = st.outranked({c.conversation_id for c, _, _ in batch}, rank) if rank < _TOP_RANK else set()
    rows = [conv_row(c, path, off, n) for c, off, n in batch if c.conversation_id not in outranked]
    if rows:
        st.upsert_conversations(rows)
    if outranked:
        st.add_sightings([(path, c.conversation_id, rank) for c, _, _ in batch if c.conversation_id in outranked])


def _feedback_row(ev: FeedbackEvent, path: str, line: int) -> FeedbackRow:
    ts = ev.timestamp or datetime.now().isoformat(timespec="microseconds")
    return FeedbackRow(path, line, ev.conversation_id, ev.thumbs_up, ev.quality, ev.note, ts, ev.score)
