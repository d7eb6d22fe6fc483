"""Reading one data file into state, inside the one atomic unit its writes share: its records upserted in batches,
its rejected lines replaced, its cursor moved last.

The lines come parsed, from this process (``Ingestor._parsed``) or from the parse worker; a whole-file JSON record
is parsed here. A re-read forgets where the file's records were seen first and deletes the conversations no longer
anywhere. The per-line loop (:meth:`FileRead.read_blocks`) is on ingest's critical path: it works on local names.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon import codec, faults, log
from daemon.dataset import examples
from daemon.ingest import records, tail
from daemon.ingest import worker as parse_worker
from daemon.ingest.records import ConvTuple, Kind, Rejected, Rejection
from daemon.state import State

BATCH = 2000  # records upserted (feedback events added) per statement
TOP_RANK = max(records.RANK.values())
_log = log.get("daemon.ingest")

# What a block of parsed lines is: (first line number, byte offset, line lengths, one result per line, cache
# entries the parse worker made), or a line too long to read.
ParsedBlock = tuple[int, int, list[int], list[Any], list[Any]] | tail.Oversize


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


class FileRead:
    """One file's read, made inside its atomic unit (a re-read starts by forgetting the file's sightings).

    ``known_top``: the scan's ids stored with top-rank content (read and extended here). ``top``: the ids this
    file stored with top-rank content, for the scan to add once the file's writes are in; :meth:`warn` logs the
    newly rejected lines then too.
    """

    def __init__(self, state: State, path: str, kind: Kind, *, reread: bool, report: IngestReport,
                 known_top: set[str], spec: examples.Spec | None) -> None:
        self.state, self.path, self.kind, self.reread, self.report = state, path, kind, reread, report
        self.known_top, self.spec = known_top, spec
        self.rank = records.RANK.get(kind, 0)
        self.top: set[str] = set()  # ids stored from this file with top-rank content
        self.warnings: list[tuple[int, str]] = []  # given once the file's writes are in
        self.old_ids: set[str] = set()
        self.prev_rejects: set[str] = set()
        if reread:
            self.old_ids = state.conversations.sighted_in(path)
            self.prev_rejects = set(state.rejects.for_path(path).values())
            state.conversations.forget_path(path)
        self.new_ids: set[str] = set()
        self.rejects: list[tuple[int, str, str]] = []
        self.conv_batch: list[tuple[ConvTuple, int, int]] = []  # record, offset, length
        self.fb_batch: list[tuple[Any, ...]] = []
        self.entries: list[tuple[Any, ...]] = []  # cache entries the parse worker made for conv_batch's records

    def reject(self, number: int, reason: str, h: str) -> None:
        self.rejects.append((number, reason, h))
        if h not in self.prev_rejects:
            self.warnings.append((number, reason))

    def flush(self) -> None:
        st, conv_batch = self.state, self.conv_batch
        if conv_batch:
            upsert(st, conv_batch, self.path, self.rank, self.known_top)
            self.report.conversations += len(conv_batch)
            if self.reread:
                self.new_ids.update(r[0] for r, _, _ in conv_batch)
            if self.rank == TOP_RANK:
                self.top.update(r[0] for r, _, _ in conv_batch)
            conv_batch.clear()
        if self.entries:
            st.examples.put_entries(self.spec.key, self.entries)  # type: ignore[union-attr]
            self.entries.clear()
        if self.fb_batch:
            st.feedback.add(self.fb_batch)
            self.report.feedback_events += len(self.fb_batch)
            self.fb_batch.clear()

    def read_json(self, fd: int, max_line: int) -> tuple[int, int]:
        """The whole ``training_json`` file as one record; returns (end offset, lines) for the cursor."""
        size = os.fstat(fd).st_size
        data = os.pread(fd, min(size, max_line + 1), 0)
        self.report.bytes_read += len(data)
        if len(data) > max_line:
            self.reject(1, f"file over {max_line} bytes", records.line_hash(data[:4096]))
        else:
            fallback = "json-" + hashlib.sha1(os.path.basename(self.path).encode()).hexdigest()[:12]
            rec = records.parse_conversation(data, self.kind, fallback_id=fallback)
            if isinstance(rec, Rejection):
                self.reject(1, rec.reason, records.line_hash(data))
            else:
                msgs = codec.messages_json((m.role, m.content) for m in rec.messages)
                row = (rec.conversation_id, msgs, rec.mode, rec.model, rec.quality, rec.thumbs_up,
                       rec.inline_score, rec.inline_rated, rec.usable, rec.started_at)
                self.conv_batch.append((row, 0, len(data)))
        return len(data), 1

    def read_blocks(self, source: Iterable[ParsedBlock], start: int, start_line: int, max_line: int
                    ) -> tuple[int, int]:
        """Every parsed line of ``source`` into the batches; returns (end offset, lines) for the cursor."""
        # Local names: this loop runs once per line of the store.
        reject, flush, report, path, kind = self.reject, self.flush, self.report, self.path, self.kind
        conv_batch, fb_batch, entries = self.conv_batch, self.fb_batch, self.entries
        end, lines = start, start_line
        for block in source:
            if isinstance(block, tail.Oversize):
                number, off, length = block
                reject(number, f"line over {max_line} bytes ({length} bytes)", f"long-{off}-{length}")
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
        return end, lines

    def finish(self, fd: int, end: int, lines: int, start_line: int, worker: parse_worker.ParseWorker | None) -> None:
        """The last writes: the last batches, vanished conversations (a re-read), the rejects, then the cursor."""
        st, path, rejects = self.state, self.path, self.rejects
        self.flush()
        if self.reread:
            self.report.deleted += st.conversations.reconcile_vanished(self.old_ids - self.new_ids)
        st.rejects.replace(path, rejects, from_line=0 if self.reread else start_line + 1)
        self.report.rejected += len([r for r in rejects if r[2] not in self.prev_rejects])
        faults.point("ingest.before_cursor")
        cursor = tail.cursor_after(path, self.kind, fd, os.fstat(fd), end, lines)
        if worker is not None and worker.hashes != (cursor.head_hash, cursor.tail_hash):
            # the file changed after the worker read it: what it parsed is not what is there
            raise parse_worker.Fallback
        st.cursors.save(cursor)

    def warn(self) -> None:
        for number, reason in self.warnings:
            _log.warning("ingest.line_rejected", file=self.path, line=number, reason=reason)


def upsert(st: State, batch: list[tuple[ConvTuple, int, int]], path: str, rank: int, top: set[str]) -> None:
    """Upsert one file's records. A record whose conversation already has content from a higher-ranked source (the
    training_data/ copy of a logs/ record) would not change it: only its sighting is recorded, which skips writing a
    row for a third of a cold ingest's records and for every new record's copy afterwards. ``top``: ids known to
    have top-rank content already (asking state costs a random page read per id); a record parsed without its
    messages (blocks.parse_block) must be one of those, or in state at a higher rank."""
    outranked: set[str] = set()
    if rank < TOP_RANK:
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
