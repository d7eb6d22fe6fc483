"""Which examples a dataset version holds: eligible conversations filtered, PII-scrubbed, deduplicated and split
into train and eval (pure; the build's shell, :mod:`daemon.dataset.builder`, reads state and writes the files).

The per-example work is here and stays flat (no call layers per example: a build makes 34k of them).
"""

from __future__ import annotations

import json
import operator
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from daemon.dataset import examples
from daemon.settings import DatasetSettings
from daemon.state import Eligible

by_cid = operator.itemgetter(0)  # Example.cid


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
    candidates: list[Example] = field(default_factory=list)  # every example before dedup (select_cached)


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
                dupes.sort(key=by_cid)  # stable, as the order this replaces: (not in keep_first, cid)
                kept = next((ex for ex in dupes if ex.cid in keep_first), dupes[0])
                losers.update(id(ex) for ex in dupes if ex is not kept)
    sel.duplicates_removed += len(losers)
    sel.examples = sorted((ex for ex in candidates if id(ex) not in losers), key=by_cid)


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
        sel.examples = sorted(candidates, key=by_cid)
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
    cfg: DatasetSettings, keep_first: set[str] | Callable[[], set[str]], cfg_key: str, dedup: bool | None = None,
) -> tuple[Selection, list[CacheRow]]:
    """:func:`select` over ``state.examples.eligible_rows`` rows and ``state.examples.cached``: a valid cache entry is
    used as it is, the other rows are made and returned as new cache entries. Same examples, lines, PII counts and
    duplicates as :func:`select`. ``dedup``: overrides ``cfg.dedup``."""
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
    sel.candidates = candidates
    if cfg.dedup if dedup is None else dedup:
        _dedup(candidates, keep_first, sel)
    else:
        sel.examples = sorted(candidates, key=by_cid)
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


def example_line(ex: Example) -> bytes:
    """``json.dumps({"messages": [{"role", "content"}, ...]}, ensure_ascii=False, separators=(",", ":")) + "\\n"``
    (compact, like the messages ingest stores)."""
    return ex.line or _encode(ex.messages)
