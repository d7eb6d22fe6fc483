"""Eligible conversations -> a versioned dataset folder ``datasets/v<N>/{train,eval}.jsonl + manifest.json``.

The selection, dedup, split and fingerprint are pure functions; :func:`build` is the thin shell that reads state,
writes a temp folder, fsyncs it and renames it into place, then records the version. A build that dies half-way
leaves no visible version: temp folders and folders without a state row are removed by the next build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import log, pii
from daemon.settings import DatasetSettings
from daemon.state import DatasetRow, Eligible, State, private_dir, utcnow

_log = log.get("daemon.dataset")
_VERSION_DIR = re.compile(r"^v(\d+)$")
FORMAT = "messages-v1"
_enc = json.encoder.encode_basestring  # the C string encoder json.dumps(..., ensure_ascii=False) uses


class DatasetError(Exception):
    """The dataset cannot be built (too few examples ...); the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Example:
    cid: str
    messages: tuple[tuple[str, str], ...]  # (role, content), filtered and scrubbed
    mode: str
    model: str | None
    score: int
    src_path: str
    src_offset: int
    src_len: int


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


def split_bucket(cid: str) -> float:
    """A stable number in [0, 1) per conversation id: the split never depends on what else is in the store."""
    return int.from_bytes(hashlib.sha256(cid.encode()).digest()[:8], "big") / 2**64


def dedup_key(messages: Sequence[tuple[str, str]]) -> str:
    """Exact-duplicate key: roles + contents with whitespace collapsed and case folded."""
    # Built by hand, equal to json.dumps([[role, norm], ...], ensure_ascii=False): this runs once per example.
    norm = ", ".join("[" + _enc(r) + ", " + _enc(" ".join(c.split()).casefold()) + "]" for r, c in messages)
    return hashlib.sha256(("[" + norm + "]").encode()).hexdigest()


def select(rows: Iterable[Eligible], cfg: DatasetSettings, keep_first: set[str] | None = None) -> Selection:
    """Filter messages, scrub PII, drop exact duplicates. Among duplicates, an id in ``keep_first`` (the previous
    version's members) wins, then the smallest id, so the kept copy does not flip as the store grows."""
    keep_first = keep_first or set()
    sel = Selection([])
    candidates: list[Example] = []
    for row in rows:
        msgs = []
        for m in json.loads(row.messages):
            if m["role"] == "system" and not cfg.include_system:
                continue
            content = m["content"]
            if cfg.pii_scrub:
                content = pii.scrub(content, cfg.pii_kinds, sel.pii_counts)
            msgs.append((m["role"], content))
        candidates.append(
            Example(row.cid, tuple(msgs), row.mode, row.model, row.score, row.src_path, row.src_offset, row.src_len)
        )
    if not cfg.dedup:
        sel.examples = sorted(candidates, key=lambda e: e.cid)
        return sel
    best: dict[str, Example] = {}
    for ex in sorted(candidates, key=lambda e: (e.cid not in keep_first, e.cid)):
        key = dedup_key(ex.messages)
        if key in best:
            sel.duplicates_removed += 1
        else:
            best[key] = ex
    sel.examples = sorted(best.values(), key=lambda e: e.cid)
    return sel


def split(
    examples: Sequence[Example], eval_fraction: float, min_eval: int, pins: set[str]
) -> tuple[list[Example], list[Example], set[str]]:
    """(train, eval, new pins). Eval = bucket < fraction, or pinned earlier. When that is fewer than ``min_eval``,
    the train examples with the smallest buckets are pinned to eval for good (returned as new pins)."""
    train: list[Example] = []
    evals: list[Example] = []
    for ex in examples:
        (evals if ex.cid in pins or split_bucket(ex.cid) < eval_fraction else train).append(ex)
    new_pins: set[str] = set()
    if len(evals) < min_eval and train:
        need = min_eval - len(evals)
        movers = sorted(train, key=lambda e: split_bucket(e.cid))[:need]
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
    """``json.dumps({"messages": [{"role", "content"}, ...]}, ensure_ascii=False) + "\\n"``, built by hand (same
    bytes, a third of the cost): it runs twice per example per build (fingerprint, then the file)."""
    msgs = ", ".join('{"role": ' + _enc(r) + ', "content": ' + _enc(c) + "}" for r, c in ex.messages)
    return ('{"messages": [' + msgs + "]}\n").encode()


def fingerprint(train: Sequence[Example], evals: Sequence[Example], cfg: DatasetSettings) -> str:
    """Identity of a dataset's content: same eligible set, same filters, same split -> same fingerprint."""
    h = hashlib.sha256(json.dumps(filters_used(cfg), sort_keys=True).encode())
    for tag, part in (("train", train), ("eval", evals)):
        h.update(tag.encode())
        for ex in part:
            h.update(ex.cid.encode() + b"\0" + example_line(ex))
    return h.hexdigest()


def _ranges(examples: Iterable[Example]) -> list[dict[str, Any]]:
    by_file: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for ex in examples:
        by_file[ex.src_path].append((ex.src_offset, ex.src_offset + ex.src_len))
    out = []
    for path in sorted(by_file):
        spans = sorted(by_file[path])
        merged: list[list[int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        out.append({"path": path, "records": len(spans), "byte_ranges": merged})
    return out


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
            "by_score": dict(sorted(Counter(str(e.score) for e in both).items())),
            "by_mode": dict(sorted(Counter(e.mode for e in both).items())),
            "by_model": dict(sorted(Counter(e.model or "unknown" for e in both).items())),
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


def _write_private(path: Path, chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20, closefd=False) as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cleanup(state: State, folder: Path) -> list[str]:
    """Remove temp folders and version folders that state does not know (a build that died mid-way)."""
    known = {d.version for d in state.datasets()}
    removed = []
    for entry in folder.iterdir():
        m = _VERSION_DIR.match(entry.name)
        if entry.name.startswith(".tmp-") or (m and int(m.group(1)) not in known):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        _log.warning("dataset.cleanup", removed=removed, reason="left by an interrupted build")
    return removed


def build(state: State, cfg: DatasetSettings, store_root: str = "") -> BuildResult:
    """Build the next dataset version from state (ingest first: that is the caller's job)."""
    folder = datasets_dir(state)
    with _build_lock(folder):
        cleanup(state, folder)
        latest = state.dataset(state.latest_dataset_version() or 0)
        previous = {cid for cid, _ in state.members(latest.version)} if latest else set()
        sel = select(state.eligible(cfg.modes, cfg.min_score, cfg.include_unrated), cfg, previous)
        train, evals, new_pins = split(sel.examples, cfg.eval_fraction, cfg.min_eval_examples, state.eval_pins())
        need_train, need_eval = cfg.min_train_examples, cfg.min_eval_examples
        if len(train) < need_train or len(evals) < need_eval:
            raise DatasetError(
                f"too few eligible examples: {len(sel.examples)} after filters and dedup "
                f"(need {need_train} train + {need_eval} eval; see dataset.min_score / dataset.include_unrated)"
            )
        fp = fingerprint(train, evals, cfg)
        if latest is not None and latest.fingerprint == fp:
            return BuildResult(
                False, latest.version, Path(latest.path), latest.train_count, latest.eval_count,
                f"no new version: the eligible set is the same as v{latest.version}", latest.manifest,
            )
        version = (latest.version if latest else 0) + 1
        tmp = folder / f".tmp-v{version}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        private_dir(tmp)
        hashes = {
            "train.jsonl": _write_private(tmp / "train.jsonl", (example_line(e) for e in train)),
            "eval.jsonl": _write_private(tmp / "eval.jsonl", (example_line(e) for e in evals)),
        }
        man = manifest(version, train, evals, sel, cfg, fp, hashes, store_root)
        _write_private(tmp / "manifest.json", [json.dumps(man, indent=1).encode()])
        _fsync_dir(tmp)
        final = folder / f"v{version}"
        os.rename(tmp, final)
        _fsync_dir(folder)
        row = DatasetRow(version, man["created_at"], str(final), fp, man["content_hash"], len(train), len(evals), man)
        with state.transaction():
            state.add_eval_pins(new_pins)
            state.add_dataset(row, [*((e.cid, "train") for e in train), *((e.cid, "eval") for e in evals)])
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
