"""What a dataset version records about itself: the files' digests, the content fingerprint, and the manifest
(pure; the build's shell, :mod:`daemon.dataset.builder`, writes them)."""

from __future__ import annotations

import hashlib
import json
import operator
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from daemon.dataset import examples
from daemon.dataset.selection import Example, Selection, example_line
from daemon.settings import DatasetSettings
from daemon.state import utcnow

FORMAT = examples.FORMAT


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


def line_chunks(examples: Sequence[Example], size: int = 1024) -> Iterator[bytes]:
    """The examples' lines, ``size`` lines to a chunk: 34 writes and hash updates instead of 34k."""
    for i in range(0, len(examples), size):
        yield b"".join([example_line(ex) for ex in examples[i:i + size]])


def file_digest(examples: Sequence[Example]) -> str:
    """sha256 of the file these examples' lines make (what the manifest records for it)."""
    h = hashlib.sha256()
    for chunk in line_chunks(examples):
        h.update(chunk)
    return h.hexdigest()


def fingerprint(
    train: Sequence[Example], evals: Sequence[Example], cfg: DatasetSettings,
    digests: tuple[str, str] | None = None, more: Sequence[tuple[str, str, Sequence[str]]] = (),
) -> str:
    """Identity of a dataset's content: same eligible set, same filters, same split -> same fingerprint. Made of
    the two files' sha256 (``digests``, when already known) and the ids in each, so the lines are hashed once;
    ``more``: the other files (the preference files) as (name, sha256, ids)."""
    train_digest, eval_digest = digests or (file_digest(train), file_digest(evals))
    h = hashlib.sha256(json.dumps(filters_used(cfg), sort_keys=True).encode())
    for tag, part, digest in (("train", train, train_digest), ("eval", evals, eval_digest)):
        h.update(f"{tag}\0{digest}\0".encode())
        h.update("\0".join([ex.cid for ex in part]).encode())
    for name, digest, ids in more:
        h.update(f"\0{name}\0{digest}\0".encode())
        h.update("\0".join(ids).encode())
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
    since: dict[str, int] | None = None,
    preference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``preference``: preference.Preferences.manifest_part() (counts.preference, ..., rejections)."""
    both = [*train, *evals]
    pref = preference or {}
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
            # train examples by the dataset version where each first appeared (per example: train_ids.tsv)
            "train_by_first_version": dict(sorted(
                ((str(k), v) for k, v in Counter(since[ex.cid] for ex in train).items()), key=lambda kv: int(kv[0])
            )) if since is not None else {},
            **{k: pref[k] for k in ("preference", "preference_duplicates_removed", "rejections_by_reason")
               if k in pref},
        },
        "filters": filters_used(cfg),
        "pii_scrubbed": dict(sorted(sel.pii_counts.items())),
        "content_hash": content,
        "fingerprint": fp,
        "files": file_hashes,
        "eval_ids_hash": hashlib.sha256("\n".join(e.cid for e in evals).encode()).hexdigest(),
        "sources": _ranges(both),
        **({"rejections": pref["rejections"]} if "rejections" in pref else {}),
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
