"""Eligible conversations -> a versioned dataset folder ``datasets/v<N>/{train,eval}.jsonl + manifest.json``, with
the preference files beside them (``prefs_*.jsonl``, ``pairs_*.jsonl``, their ``*_train_ids.tsv``; see
:mod:`daemon.dataset.preference`).

The selection, dedup and split (:mod:`daemon.dataset.selection`) and the fingerprint and manifest
(:mod:`daemon.dataset.manifest`) are pure; :func:`build` is the thin shell that reads state, writes a temp folder,
fsyncs it and renames it into place, then records the version. A build that dies half-way leaves no visible
version: temp folders and folders without a state row are removed by the next build.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from daemon import faults, log
from daemon.dataset import preference
from daemon.dataset.manifest import file_digest, fingerprint, line_chunks, manifest, manifest_bytes
from daemon.dataset.preference import PAIRS_FILES, PAIRS_IDS, PREFS_FILES, PREFS_IDS, Preferences
from daemon.dataset.selection import Example, Selection, by_cid, example_cfg, select_cached, split
from daemon.settings import DatasetSettings
from daemon.state import DatasetRow, State, private_dir

_log = log.get("daemon.dataset.builder")
_VERSION_DIR = re.compile(r"^v(\d+)$")
_SPLIT_FILES = ("train.jsonl", "eval.jsonl")
# One line per line of train.jsonl, in its order: "<conversation id>\t<dataset version where it first appeared>".
# The training plan reads it to tell the examples that are new since the champion's dataset (train.plan).
TRAIN_IDS = "train_ids.tsv"


class DatasetError(Exception):
    """The dataset cannot be built (too few examples ...); the message is one line for the operator."""


@dataclass
class BuildResult:
    created: bool
    version: int | None
    path: Path | None
    train_count: int
    eval_count: int
    message: str
    manifest: dict[str, Any] | None = None
    # preference examples, train + eval (manifest counts.preference)
    desirable: int = 0
    undesirable: int = 0
    pairs: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "version": self.version,
            "path": str(self.path) if self.path else None,
            "train_count": self.train_count,
            "eval_count": self.eval_count,
            "desirable": self.desirable,
            "undesirable": self.undesirable,
            "pairs": self.pairs,
            "message": self.message,
        }


def preference_totals(man: dict[str, Any] | None) -> dict[str, int]:
    """desirable / undesirable / pairs, train + eval, from a manifest (0 for a version from before them)."""
    counts = ((man or {}).get("counts") or {}).get("preference") or {}
    return {k: sum(int(counts.get(part, {}).get(k, 0)) for part in ("train", "eval"))
            for k in ("desirable", "undesirable", "pairs")}


# -- shell -----------------------------------------------------------------------------------------------------


def datasets_dir(state: State) -> Path:
    return private_dir(state.dir / "datasets")


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_private(path: Path, chunks: Iterable[bytes]) -> None:
    """Write a new private file and fsync it (callers know its hash already)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


class _Writer(threading.Thread):
    """Writes and fsyncs the two split files while the build goes on with state (file writes, fsync and SQLite
    all let go of the GIL, so the two overlap: ~0.1 s of a 0.5 s rebuild). :meth:`finish` re-raises its error."""

    def __init__(self, folder: Path, train: Sequence[Example], evals: Sequence[Example], ids: bytes,
                 more: Sequence[tuple[str, Iterable[bytes]]] = ()) -> None:
        super().__init__(name="dataset-writer", daemon=True)
        self.folder, self.parts = folder, (("train.jsonl", train), ("eval.jsonl", evals))
        self.ids, self.more = ids, more
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for name, part in self.parts:
                _write_private(self.folder / name, line_chunks(part))
            _write_private(self.folder / TRAIN_IDS, [self.ids])
            for name, chunks in self.more:
                _write_private(self.folder / name, chunks)
        except BaseException as exc:  # handed to the build's thread by finish()
            self.error = exc

    def finish(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cleanup(state: State, folder: Path) -> list[str]:
    """Remove temp folders and version folders that state does not know (a build that died mid-way)."""
    known = state.datasets.versions()
    removed = []
    for entry in folder.iterdir():
        m = _VERSION_DIR.match(entry.name)
        if entry.name.startswith(".tmp-") or (m and int(m.group(1)) not in known):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        _log.warning("dataset.cleanup", removed=removed, reason="left by an interrupted build")
    return removed


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause the cyclic garbage collector. A build holds ~100k small tuples at once and makes no reference cycles;
    the collector re-scanning them as they pile up cost 15-25% of a rebuild. Reference counting frees as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _selected(
    state: State, cfg: DatasetSettings, latest: DatasetRow | None
) -> tuple[Selection, list[Example], list[Example], set[str], Preferences]:
    """The selection (through the processed-example cache, whose new entries are stored) and its split: (selection,
    train, eval, new eval pins, preference examples). Raises DatasetError when either part is below its minimum."""
    previous = partial(state.datasets.member_ids, latest.version) if latest else set  # needed only for duplicates
    key = example_cfg(cfg)
    rows = state.examples.eligible_rows(cfg.modes, cfg.min_score, cfg.include_unrated)
    cached = state.examples.cached(key)
    sel, fresh = select_cached(rows, cached, cfg, previous, key)
    # The rated conversations the SFT filter leaves out (down-voted, under min_score): preference data wants them.
    others, fresh_others = select_cached(state.examples.preference_only_rows(cfg.modes, cfg.min_score), cached, cfg,
                                         set(), key, dedup=False)
    del cached
    if fresh or fresh_others:
        with state.transaction():
            state.examples.put([*fresh, *fresh_others])
    pins = state.datasets.eval_pins()
    train, evals, new_pins = split(sel.examples, cfg.eval_fraction, cfg.min_eval_examples, pins)
    need_train, need_eval = cfg.min_train_examples, cfg.min_eval_examples
    if len(train) < need_train or len(evals) < need_eval:
        raise DatasetError(
            f"too few eligible examples: {len(sel.examples)} after filters and dedup "
            f"(need {need_train} train + {need_eval} eval; see dataset.min_score / dataset.include_unrated)"
        )
    prefs = preference.select(
        [ex for ex in sel.candidates if ex.score != 0] + others.examples, state.feedback.corrections(),
        state.feedback.misplaced_corrections(), cfg, pins | new_pins,
        lambda: set(state.datasets.preference_members(latest.version, "prefs")) if latest else set(),
        lambda: set(state.datasets.preference_members(latest.version, "pairs")) if latest else set(),
    )
    return sel, train, evals, new_pins, prefs


@contextmanager
def _writing(folder: Path, version: int, train: Sequence[Example], evals: Sequence[Example],
             ids: bytes, more: Sequence[tuple[str, Iterable[bytes]]]) -> Iterator[_Writer]:
    """A fresh temp folder for version ``version``, its split files being written into it on a writer thread (the
    thread is joined on the way out, whatever happens)."""
    tmp = folder / f".tmp-v{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    private_dir(tmp)
    writer = _Writer(tmp, train, evals, ids, more)
    writer.start()
    try:
        yield writer
    finally:
        writer.join()


def _commit(state: State, writer: _Writer, row: DatasetRow, new_pins: set[str], members: dict[str, list[str]],
            since: dict[str, int], pref_members: Sequence[tuple[str, str, str, int]]) -> None:
    """Finish the writer's folder (manifest, fsync), rename it to ``row.path`` and record the version in state."""
    tmp, final = writer.folder, Path(row.path)
    # State learns of the version in a transaction that commits only once the folder is in place: a crash
    # before the commit leaves a folder that state does not know, which the next build removes.
    with state.transaction():
        state.datasets.add_eval_pins(new_pins)
        text = manifest_bytes(row.manifest)
        state.datasets.add(row, members, text.decode(), since)
        state.datasets.add_preference_members(row.version, pref_members)
        _write_private(tmp / "manifest.json", [text])
        writer.finish()
        _fsync_dir(tmp)
        faults.point("dataset.before_rename")
        os.rename(tmp, final)
        faults.point("dataset.before_record")  # the folder is in place, state does not know it yet
        _fsync_dir(final.parent)


def build(state: State, cfg: DatasetSettings, store_root: str = "") -> BuildResult:
    """Build the next dataset version from state (ingest first: that is the caller's job)."""
    folder = datasets_dir(state)
    with _build_lock(folder), _no_cycle_collection():
        cleanup(state, folder)
        latest = state.datasets.get(state.datasets.latest_version() or 0, manifest=False)
        sel, train, evals, new_pins, prefs = _selected(state, cfg, latest)
        digests = (file_digest(train), file_digest(evals))
        parts = {PREFS_FILES[0]: prefs.prefs_train, PREFS_FILES[1]: prefs.prefs_eval,
                 PAIRS_FILES[0]: prefs.pairs_train, PAIRS_FILES[1]: prefs.pairs_eval}
        chunked = {name: preference.Lines(part) for name, part in parts.items()}
        pref_digests = {name: preference.digest(chunks) for name, chunks in chunked.items()}
        fp = fingerprint(train, evals, cfg, digests,
                         [(name, pref_digests[name], [p[0] for p in part]) for name, part in parts.items()])
        if latest is not None and latest.fingerprint == fp:
            man = state.datasets.get(latest.version).manifest  # type: ignore[union-attr]
            return BuildResult(
                False, latest.version, Path(latest.path), latest.train_count, latest.eval_count,
                f"no new version: the eligible set is the same as v{latest.version}", man, **preference_totals(man),
            )
        version = (latest.version if latest else 0) + 1
        since = first_seen(state.datasets.since(latest.version) if latest else {}, [*train, *evals], version)
        ids = "".join([f"{ex.cid}\t{since[ex.cid]}\n" for ex in train]).encode()
        pref_members, pref_ids = _preference_members(state, latest, version, prefs)
        files = {**dict(zip(_SPLIT_FILES, digests, strict=True)), TRAIN_IDS: hashlib.sha256(ids).hexdigest(),
                 **pref_digests, **{name: hashlib.sha256(data).hexdigest() for name, data in pref_ids.items()}}
        more: list[tuple[str, Iterable[bytes]]] = [*chunked.items(),
                                                   *((name, [data]) for name, data in pref_ids.items())]
        with _writing(folder, version, train, evals, ids, more) as writer:  # manifest made while files are written
            man = manifest(version, train, evals, sel, cfg, fp, files, store_root, since, prefs.manifest_part())
            final = folder / f"v{version}"
            row = DatasetRow(version, man["created_at"], str(final), fp, man["content_hash"], len(train), len(evals),
                             man)
            _commit(state, writer, row, new_pins, {"train": list(map(by_cid, train)), "eval": list(map(by_cid, evals))},
                    since, pref_members)
        totals = prefs.totals()
        _log.info(
            "dataset.built", dataset_version=version, path=str(final), train=len(train), eval=len(evals),
            duplicates_removed=sel.duplicates_removed, pii_scrubbed=dict(sel.pii_counts), **totals,
            rejections=len(prefs.rejections),
        )
        return BuildResult(True, version, final, len(train), len(evals), f"built v{version}", man, **totals)


def _preference_members(state: State, latest: DatasetRow | None, version: int, prefs: Preferences
                        ) -> tuple[list[tuple[str, str, str, int]], dict[str, bytes]]:
    """The preference members to record, ``(split, cid, variant, since)``, and the two ``*_train_ids.tsv`` files'
    bytes. An example's first version carries forward from the version before while its variant (its label, or
    its correction) stays the same: a changed vote or correction is new again."""
    rows: list[tuple[str, str, str, int]] = []
    ids: dict[str, bytes] = {}
    for kind, train, evals, ids_name in (("prefs", prefs.prefs_train, prefs.prefs_eval, PREFS_IDS),
                                         ("pairs", prefs.pairs_train, prefs.pairs_eval, PAIRS_IDS)):
        before = state.datasets.preference_members(latest.version, kind) if latest else {}
        lines = []
        for split_name, part in ((f"{kind}_train", train), (f"{kind}_eval", evals)):
            for p in part:
                cid, variant = p[0], prefs.variant(kind, p)
                old = before.get(cid)
                first = old[1] if old is not None and old[0] == variant else version
                rows.append((split_name, cid, variant, first))
                if part is train:
                    lines.append(f"{cid}\t{first}\n")
        ids[ids_name] = "".join(lines).encode()
    return rows, ids


def first_seen(previous: dict[str, int], examples: Iterable[Example], version: int) -> dict[str, int]:
    """Each example's first dataset version: carried forward from the version before, else ``version`` (a chat that
    left a dataset, say its vote was retracted, and came back with a new vote is new again)."""
    return {ex.cid: previous.get(ex.cid, version) for ex in examples}


def read_train_ids(path: Path, name: str = TRAIN_IDS) -> list[tuple[str, int]]:
    """``train_ids.tsv`` of a dataset folder: (conversation id, first version) per line of ``train.jsonl``; ``name``:
    another ids file of the same form (``prefs_train_ids.tsv``, ``pairs_train_ids.tsv``)."""
    out = []
    for line in (path / name).read_text(encoding="utf-8").splitlines():
        cid, _, since = line.partition("\t")
        out.append((cid, int(since)))
    return out


def verify(path: Path) -> list[str]:
    """Problems with a dataset folder (files missing or not matching the manifest's hashes); empty when sound."""
    problems = []
    try:
        man = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return [f"manifest unreadable: {exc}"]
    for name, digest in man.get("files", {}).items():
        try:
            actual = hashlib.sha256((path / name).read_bytes()).hexdigest()
        except OSError as exc:
            problems.append(f"{name}: {exc.strerror}")
            continue
        if actual != digest:
            problems.append(f"{name}: sha256 {actual[:12]}… does not match the manifest")
    return problems
