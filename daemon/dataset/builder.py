"""Eligible conversations -> a versioned dataset folder ``datasets/v<N>/{train,eval}.jsonl + manifest.json``.

The selection, dedup, split and fingerprint are pure functions; :func:`build` is the thin shell that reads state,
writes a temp folder, fsyncs it and renames it into place, then records the version. A build that dies half-way
leaves no visible version: temp folders and folders without a state row are removed by the next build.
"""

from __future__ import annotations

import fcntl
import gc
import hashlib
import json
import operator
import os
import re
import shutil
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from daemon import faults, log
from daemon.dataset import examples
from daemon.settings import DatasetSettings
from daemon.state import DatasetRow, Eligible, State, private_dir, utcnow

_log = log.get("daemon.dataset.builder")
_VERSION_DIR = re.compile(r"^v(\d+)$")
FORMAT = examples.FORMAT
_by_cid = operator.itemgetter(0)  # Example.cid
_SPLIT_FILES = ("train.jsonl", "eval.jsonl")


class DatasetError(Exception):
    """The dataset cannot be built (too few examples ...); the message is one line for the operator."""


class Example(NamedTuple):
    """One dataset example (immutable; a NamedTuple because a build makes 34k of them, and a frozen dataclass's
    ``__init__`` alone cost 0.1 s of that)."""

    cid: str
    messages: tuple[tuple[str, str], ...]  # (role, content), filtered and scrubbed; () when built from the cache
    mode: str
    model: str | None
    score: int
    src_path: str
    src_offset: int
    src_len: int
    line: bytes = b""  # example_line(self), when already known
    key: bytes = b""  # the dedup key's digest, when already known
    bucket: float = -1.0  # split_bucket(cid), when already known


@dataclass
class Selection:
    examples: list[Example]
    duplicates_removed: int = 0
    pii_counts: Counter[str] = field(default_factory=Counter)


@dataclass
class BuildResult:
    created: bool
    version: int | None
    path: Path | None
    train_count: int
    eval_count: int
    message: str
    manifest: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "version": self.version,
            "path": str(self.path) if self.path else None,
            "train_count": self.train_count,
            "eval_count": self.eval_count,
            "message": self.message,
        }


# -- pure core -------------------------------------------------------------------------------------------------


split_bucket = examples.split_bucket
_dedup_digest = examples.dedup_digest
_encode = examples.encode_line


def _bucket(ex: Example) -> float:
    return ex.bucket if ex.bucket >= 0 else split_bucket(ex.cid)


def dedup_key(messages: Sequence[tuple[str, str]]) -> str:
    """Exact-duplicate key: roles + contents with whitespace collapsed and case folded."""
    return _dedup_digest(messages).hex()


def _prepare(messages_json: str | bytes, cfg: DatasetSettings, counts: Counter[str]) -> tuple[tuple[str, str], ...]:
    """A conversation's stored messages, filtered (system dropped unless configured) and PII-scrubbed."""
    return examples.prepared(messages_json, cfg, counts)[0]


def _full_key(ex: Example) -> bytes:
    return _dedup_digest(ex.messages or examples.line_messages(example_line(ex)))


def _dedup(candidates: list[Example], keep_first: set[str] | Callable[[], set[str]], sel: Selection) -> None:
    """Keep one example per dedup key: an id in ``keep_first`` first, then the smallest id. Examples are grouped
    by their pre-key (examples.dedup_prekey, cached), and only the few that share one get the full key.
    ``keep_first`` may be a function that gives it: called only when there are duplicates."""
    keys = [ex.key or examples.dedup_prekey(ex.messages) for ex in candidates]
    counts = Counter(keys)
    losers: set[int] = set()  # id() of the examples dropped; only keys seen more than once need a choice
    if len(counts) < len(keys):
        if callable(keep_first):
            keep_first = keep_first()
        groups: dict[bytes, list[Example]] = defaultdict(list)
        for ex, key in zip(candidates, keys, strict=True):
            if counts[key] > 1:
                groups[key].append(ex)
        for group in groups.values():
            same: dict[bytes, list[Example]] = defaultdict(list)
            for ex in group:
                same[_full_key(ex)].append(ex)
            for dupes in same.values():
                dupes.sort(key=_by_cid)  # stable, as the order this replaces: (not in keep_first, cid)
                kept = next((ex for ex in dupes if ex.cid in keep_first), dupes[0])
                losers.update(id(ex) for ex in dupes if ex is not kept)
    sel.duplicates_removed += len(losers)
    sel.examples = sorted((ex for ex in candidates if id(ex) not in losers), key=_by_cid)


def select(rows: Iterable[Eligible], cfg: DatasetSettings, keep_first: set[str] | None = None) -> Selection:
    """Filter messages, scrub PII, drop exact duplicates. Among duplicates, an id in ``keep_first`` (the previous
    version's members) wins, then the smallest id, so the kept copy does not flip as the store grows."""
    sel = Selection([])
    candidates = [
        Example(row.cid, _prepare(row.messages, cfg, sel.pii_counts), row.mode, row.model, row.score, row.src_path,
                row.src_offset, row.src_len)
        for row in rows
    ]
    if not cfg.dedup:
        sel.examples = sorted(candidates, key=_by_cid)
        return sel
    _dedup(candidates, keep_first or set(), sel)
    return sel


# -- processed-example cache -----------------------------------------------------------------------------------
#
# Filtering, scrubbing, encoding and the dedup key (daemon/dataset/examples.py) cost ~10 us per example. state.examples
# keeps the result per conversation (see state migration 5): a rebuild redoes only what changed, and a cold ingest's
# parse worker makes most entries before the first build. An entry is valid for one content revision of its
# conversation and one example_cfg(); its line is stored only when it is not '{"messages":' + stored messages +
# '}\n' (ingest stores the messages in the dataset line's own encoding, so that is most of them).

_LINE_HEAD, _LINE_TAIL = examples.LINE_HEAD, examples.LINE_TAIL


def example_cfg(cfg: DatasetSettings) -> str:
    """Names everything that shapes a cached example (examples.cfg_key)."""
    return examples.cfg_key(cfg)


def example_spec(cfg: DatasetSettings) -> examples.Spec:
    """What the cold-ingest parse worker needs to make cache entries ahead of a build under ``cfg``."""
    return examples.Spec(example_cfg(cfg), cfg.include_system, cfg.pii_scrub, tuple(cfg.pii_kinds), tuple(cfg.modes),
                         cfg.min_score, cfg.include_unrated)


# state.examples.put: cid, rev, cfg, dedup, pii, line, bucket
CacheRow = tuple[str, int, str, bytes, str | None, bytes | None, float]


def select_cached(
    rows: Iterable[Sequence[Any]], cached: dict[str, tuple[str, int, bytes, str | None, bytes | None, float]],
    cfg: DatasetSettings, keep_first: set[str] | Callable[[], set[str]], cfg_key: str,
) -> tuple[Selection, list[CacheRow]]:
    """:func:`select` over ``state.examples.eligible_rows`` rows and ``state.examples.cached``: a valid cache entry is
    used as it is, the other rows are made and returned as new cache entries. Same examples, lines, PII counts and
    duplicates as :func:`select`."""
    sel = Selection([])
    counts = sel.pii_counts
    candidates: list[Example] = []
    fresh: list[CacheRow] = []
    # One string object per source file, mode and model (a few each, against 34k rows): less to make and free.
    names: dict[Any, Any] = {}
    for cid, rev, mode, model, score, src_path, src_offset, src_len, msgs in rows:
        src_path, mode, model = names.setdefault(src_path, src_path), names.setdefault(mode, mode), names.setdefault(
            model, model)
        hit = cached.get(cid)
        if hit is not None and hit[1] == rev:
            _, _, key, pii_json, line, bucket = hit
        else:
            entry = examples.cache_entry(cid, msgs, cfg)
            key, pii_json, line, bucket = entry
            fresh.append((cid, rev, cfg_key, *entry))
        if pii_json:
            counts.update(json.loads(pii_json))
        if line is None:
            line = b"".join((_LINE_HEAD, msgs, _LINE_TAIL))
        candidates.append(Example(cid, (), mode, model, score, src_path, src_offset, src_len, line, key, bucket))
    if cfg.dedup:
        _dedup(candidates, keep_first, sel)
    else:
        sel.examples = sorted(candidates, key=_by_cid)
    return sel, fresh


def split(
    examples: Sequence[Example], eval_fraction: float, min_eval: int, pins: set[str]
) -> tuple[list[Example], list[Example], set[str]]:
    """(train, eval, new pins). Eval = bucket < fraction, or pinned earlier. When that is fewer than ``min_eval``,
    the train examples with the smallest buckets are pinned to eval for good (returned as new pins)."""
    train: list[Example] = []
    evals: list[Example] = []
    for ex in examples:
        (evals if ex.cid in pins or _bucket(ex) < eval_fraction else train).append(ex)
    new_pins: set[str] = set()
    if len(evals) < min_eval and train:
        need = min_eval - len(evals)
        movers = sorted(train, key=_bucket)[:need]
        new_pins = {e.cid for e in movers}
        train = [e for e in train if e.cid not in new_pins]
        evals = sorted([*evals, *movers], key=lambda e: e.cid)
    return train, evals, new_pins


def filters_used(cfg: DatasetSettings) -> dict[str, Any]:
    return {
        "min_score": cfg.min_score,
        "include_unrated": cfg.include_unrated,
        "modes": sorted(cfg.modes),
        "include_system": cfg.include_system,
        "dedup": cfg.dedup,
        "pii_scrub": cfg.pii_scrub,
        "pii_kinds": sorted(cfg.pii_kinds) if cfg.pii_scrub else [],
        "eval_fraction": cfg.eval_fraction,
        "min_eval_examples": cfg.min_eval_examples,
        "require_user_and_assistant": True,
        "drop_blank_content": True,
        "drop_deleted": True,
    }


def example_line(ex: Example) -> bytes:
    """``json.dumps({"messages": [{"role", "content"}, ...]}, ensure_ascii=False, separators=(",", ":")) + "\\n"``
    (compact, like the messages ingest stores)."""
    return ex.line or _encode(ex.messages)


def _chunks(examples: Sequence[Example], size: int = 1024) -> Iterator[bytes]:
    """The examples' lines, ``size`` lines to a chunk: 34 writes and hash updates instead of 34k."""
    for i in range(0, len(examples), size):
        yield b"".join([example_line(ex) for ex in examples[i:i + size]])


def file_digest(examples: Sequence[Example]) -> str:
    """sha256 of the file these examples' lines make (what the manifest records for it)."""
    h = hashlib.sha256()
    for chunk in _chunks(examples):
        h.update(chunk)
    return h.hexdigest()


def fingerprint(
    train: Sequence[Example], evals: Sequence[Example], cfg: DatasetSettings,
    digests: tuple[str, str] | None = None,
) -> str:
    """Identity of a dataset's content: same eligible set, same filters, same split -> same fingerprint. Made of
    the two files' sha256 (``digests``, when already known) and the ids in each, so the lines are hashed once."""
    train_digest, eval_digest = digests or (file_digest(train), file_digest(evals))
    h = hashlib.sha256(json.dumps(filters_used(cfg), sort_keys=True).encode())
    for tag, part, digest in (("train", train, train_digest), ("eval", evals, eval_digest)):
        h.update(f"{tag}\0{digest}\0".encode())
        h.update("\0".join([ex.cid for ex in part]).encode())
    return h.hexdigest()


_SPAN = operator.itemgetter(5, 6, 7)  # Example.src_path, src_offset, src_len


def _ranges(examples: Iterable[Example]) -> list[dict[str, Any]]:
    """Per source file (sorted): how many records, and the byte ranges they cover (a range runs from a record's
    first byte to the end of the last record that starts at most one byte, its newline, after the one before).
    Each record is one int ``offset << 32 | length`` (lines are capped far below 4 GiB): a list of ints sorts
    several times faster than a list of tuples."""
    by_file: dict[str, list[int]] = {}
    for path, offset, length in map(_SPAN, examples):
        spans = by_file.get(path)
        if spans is None:
            spans = by_file[path] = []
        spans.append(offset << 32 | length)
    out = []
    for path in sorted(by_file):
        spans = by_file[path]
        spans.sort()
        merged: list[list[int]] = []
        last: list[int] = [-2, -2]
        for span in spans:
            a, b = span >> 32, (span >> 32) + (span & 0xFFFFFFFF)
            if a <= last[1] + 1:
                if b > last[1]:
                    last[1] = b
            else:
                last = [a, b]
                merged.append(last)
        out.append({"path": path, "records": len(spans), "byte_ranges": merged})
    return out


_score, _mode, _model = operator.attrgetter("score"), operator.attrgetter("mode"), operator.attrgetter("model")


def _models(examples: Sequence[Example]) -> Counter[str]:
    """``Counter(e.model or "unknown" for e in examples)``, counted without a Python loop."""
    counts: Counter[Any] = Counter(map(_model, examples))
    for unnamed in (None, ""):
        if unnamed in counts:
            counts["unknown"] += counts.pop(unnamed)
    return counts


def manifest(
    version: int,
    train: Sequence[Example],
    evals: Sequence[Example],
    sel: Selection,
    cfg: DatasetSettings,
    fp: str,
    file_hashes: dict[str, str],
    store_root: str,
) -> dict[str, Any]:
    both = [*train, *evals]
    content = hashlib.sha256((file_hashes["train.jsonl"] + file_hashes["eval.jsonl"]).encode()).hexdigest()
    return {
        "version": version,
        "format": FORMAT,
        "created_at": utcnow(),
        "store_root": store_root,
        "counts": {
            "train": len(train),
            "eval": len(evals),
            "by_score": dict(sorted((str(k), v) for k, v in Counter(map(_score, both)).items())),
            "by_mode": dict(sorted(Counter(map(_mode, both)).items())),
            "by_model": dict(sorted(_models(both).items())),
            "duplicates_removed": sel.duplicates_removed,
        },
        "filters": filters_used(cfg),
        "pii_scrubbed": dict(sorted(sel.pii_counts.items())),
        "content_hash": content,
        "fingerprint": fp,
        "files": file_hashes,
        "eval_ids_hash": hashlib.sha256("\n".join(e.cid for e in evals).encode()).hexdigest(),
        "sources": _ranges(both),
    }


_SOURCES = "\0sources\0"  # stands in for the sources list while the rest is encoded
_SOURCE_KEYS = ["path", "records", "byte_ranges"]
_enc_ascii = json.encoder.encode_basestring_ascii


def manifest_bytes(man: dict[str, Any]) -> bytes:
    """``json.dumps(man, indent=1).encode()``, byte for byte. json's indenting encoder is pure Python: on the
    sources list (a few values per example: ~90k lines for 34k examples) it took a tenth of a rebuild, so that list
    is laid out here directly, and only when it has the shape :func:`_ranges` gives it."""
    sources = man.get("sources")
    if not isinstance(sources, list) or not all(
        type(src) is dict and list(src) == _SOURCE_KEYS and type(src["path"]) is str and type(src["records"]) is int
        and type(src["byte_ranges"]) is list
        and all(type(r) is list and len(r) == 2 and type(r[0]) is int and type(r[1]) is int for r in src["byte_ranges"])
        for src in sources
    ):
        return json.dumps(man, indent=1).encode()
    items = []
    for src in sources:
        spans = ",\n".join(f"    [\n     {a},\n     {b}\n    ]" for a, b in src["byte_ranges"])
        items.append(f'  {{\n   "path": {_enc_ascii(src["path"])},\n   "records": {src["records"]},\n'
                     f'   "byte_ranges": ' + (f"[\n{spans}\n   ]" if spans else "[]") + "\n  }")
    listed = "[\n" + ",\n".join(items) + "\n ]" if items else "[]"
    text, mark = json.dumps({**man, "sources": _SOURCES}, indent=1), json.dumps(_SOURCES)
    if text.count(mark) != 1:  # some other value holds the stand-in (a model name can be any string)
        return json.dumps(man, indent=1).encode()
    return text.replace(mark, listed).encode()


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

    def __init__(self, folder: Path, train: Sequence[Example], evals: Sequence[Example]) -> None:
        super().__init__(name="dataset-writer", daemon=True)
        self.folder, self.parts = folder, (("train.jsonl", train), ("eval.jsonl", evals))
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for name, part in self.parts:
                _write_private(self.folder / name, _chunks(part))
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


def build(state: State, cfg: DatasetSettings, store_root: str = "") -> BuildResult:
    """Build the next dataset version from state (ingest first: that is the caller's job)."""
    folder = datasets_dir(state)
    with _build_lock(folder), _no_cycle_collection():
        cleanup(state, folder)
        latest = state.datasets.get(state.datasets.latest_version() or 0, manifest=False)
        previous = partial(state.datasets.member_ids, latest.version) if latest else set  # needed only for duplicates
        key = example_cfg(cfg)
        rows = state.examples.eligible_rows(cfg.modes, cfg.min_score, cfg.include_unrated)
        sel, fresh = select_cached(rows, state.examples.cached(key), cfg, previous, key)
        if fresh:
            with state.transaction():
                state.examples.put(fresh)
        pins = state.datasets.eval_pins()
        train, evals, new_pins = split(sel.examples, cfg.eval_fraction, cfg.min_eval_examples, pins)
        need_train, need_eval = cfg.min_train_examples, cfg.min_eval_examples
        if len(train) < need_train or len(evals) < need_eval:
            raise DatasetError(
                f"too few eligible examples: {len(sel.examples)} after filters and dedup "
                f"(need {need_train} train + {need_eval} eval; see dataset.min_score / dataset.include_unrated)"
            )
        digests = (file_digest(train), file_digest(evals))
        fp = fingerprint(train, evals, cfg, digests)
        if latest is not None and latest.fingerprint == fp:
            return BuildResult(
                False, latest.version, Path(latest.path), latest.train_count, latest.eval_count,
                f"no new version: the eligible set is the same as v{latest.version}",
                state.datasets.get(latest.version).manifest,  # type: ignore[union-attr]
            )
        version = (latest.version if latest else 0) + 1
        tmp = folder / f".tmp-v{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        private_dir(tmp)
        writer = _Writer(tmp, train, evals)
        writer.start()
        try:
            man = manifest(version, train, evals, sel, cfg, fp, dict(zip(_SPLIT_FILES, digests, strict=True)),
                           store_root)
            final = folder / f"v{version}"
            row = DatasetRow(version, man["created_at"], str(final), fp, man["content_hash"], len(train), len(evals),
                             man)
            # State learns of the version in a transaction that commits only once the folder is in place: a crash
            # before the commit leaves a folder that state does not know, which the next build removes.
            with state.transaction():
                state.datasets.add_eval_pins(new_pins)
                text = manifest_bytes(man)
                state.datasets.add(row, {"train": list(map(_by_cid, train)), "eval": list(map(_by_cid, evals))},
                                  text.decode())
                _write_private(tmp / "manifest.json", [text])
                writer.finish()
                _fsync_dir(tmp)
                faults.point("dataset.before_rename")
                os.rename(tmp, final)
                faults.point("dataset.before_record")  # the folder is in place, state does not know it yet
                _fsync_dir(folder)
        finally:
            writer.join()
        _log.info(
            "dataset.built", dataset_version=version, path=str(final), train=len(train), eval=len(evals),
            duplicates_removed=sel.duplicates_removed, pii_scrubbed=dict(sel.pii_counts),
        )
        return BuildResult(True, version, final, len(train), len(evals), f"built v{version}", man)


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
