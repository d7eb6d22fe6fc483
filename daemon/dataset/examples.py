"""How one conversation becomes one dataset example: filter, PII scrub, line, dedup key, split bucket (pure).

The dataset build caches what this makes per conversation (state's ``examples`` table, keyed by the conversation's
content revision and :func:`cfg_key`); the cold-ingest parse worker makes the same entries ahead of the build for
the conversations it expects to be eligible (see ingest.worker). Both call :func:`cache_entry`, so an entry
is the same whoever made it. Light on imports on purpose: the parse worker imports it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

from daemon.codec import load_json as _loads
from daemon.codec import messages_json
from daemon.dataset import pii

FORMAT = "messages-v1"
CACHE_VERSION = 4  # bump when the cached values would change for the same settings: the line, prepare, dedup
LINE_HEAD, LINE_TAIL = b'{"messages":', b"}\n"
_enc = json.encoder.encode_basestring  # the C string encoder json.dumps(..., ensure_ascii=False) uses


class Shaping(Protocol):
    """The settings that shape an example (DatasetSettings has them, and so has :class:`Spec`)."""

    @property
    def include_system(self) -> bool: ...

    @property
    def pii_scrub(self) -> bool: ...

    @property
    def pii_kinds(self) -> Sequence[str]: ...


class Spec(NamedTuple):
    """What the parse worker needs to make cache entries: the shaping settings, the cache key they give, and the
    eligibility filter, to guess which conversations a build will want."""

    key: str
    include_system: bool
    pii_scrub: bool
    pii_kinds: tuple[str, ...]
    modes: tuple[str, ...]
    min_score: int
    include_unrated: bool


class Entry(NamedTuple):
    """A cached example: its dedup pre-key (:func:`dedup_prekey`), PII replacements (JSON, None when none), its
    line when that is not ``LINE_HEAD + stored messages + LINE_TAIL`` (None otherwise), and its split bucket."""

    dedup: bytes
    pii: str | None
    line: bytes | None
    bucket: float


def cfg_key(cfg: Shaping) -> str:
    """Names everything that shapes a cached example: the settings that matter, this code, the PII patterns."""
    ident = {
        "cache": CACHE_VERSION,
        "format": FORMAT,
        "include_system": cfg.include_system,
        "pii_kinds": sorted(cfg.pii_kinds) if cfg.pii_scrub else None,
        "pii": pii.SIGNATURE,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def split_bucket(cid: str) -> float:
    """A stable number in [0, 1) per conversation id: the split never depends on what else is in the store."""
    return int.from_bytes(hashlib.sha256(cid.encode()).digest()[:8], "big") / 2**64


def dedup_digest(messages: Sequence[tuple[str, str]]) -> bytes:
    """sha256 of the message list with each content's whitespace collapsed and case folded. Made in one pass over
    one string (it runs once per example): every content sits between `` \\x01 `` (after its role) and `` \\x00 ``
    (before the next role), so collapsing the whole string's whitespace also drops each content's leading and
    trailing whitespace, and the separators still mark where each message starts and ends. A content holding one of
    the two separator characters itself takes the unambiguous (slower) JSON form instead."""
    text = " \x00 ".join([r + " \x01 " + c for r, c in messages])
    if text.count("\x00") != len(messages) - 1 or text.count("\x01") != len(messages):
        norm = ", ".join("[" + _enc(r) + ", " + _enc(" ".join(c.split()).casefold()) + "]" for r, c in messages)
        return hashlib.sha256(("[" + norm + "]").encode()).digest()
    return hashlib.sha256(" ".join(text.split()).casefold().encode()).digest()


_WS = b" \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f"  # what str.split() splits ASCII text on
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")  # casefold, for ASCII


def dedup_prekey(messages: Sequence[tuple[str, str]]) -> bytes:
    """A digest that is the same for any two message lists :func:`dedup_digest` calls the same (and, rarely, for
    some it does not): whitespace deleted instead of collapsed, case folded, in one C pass when the text is ASCII
    (a fifth of dedup_digest's cost). Grouping by it first leaves dedup_digest to the few lists that share one.
    (Deleting what collapsing left as single spaces is a function of the collapsed text, so equal there means
    equal here; casefold never makes a space.)"""
    text = "\x00".join([r + "\x01" + c for r, c in messages])
    if text.isascii():
        return hashlib.sha256(text.encode().translate(_LOWER, _WS)).digest()
    return hashlib.sha256("".join(text.split()).casefold().encode()).digest()


def line_messages(line: bytes) -> list[tuple[str, str]]:
    """The (role, content) pairs of an example line."""
    return [(m["role"], m["content"]) for m in _loads(line)["messages"]]


def prepared(
    stored: str | bytes, cfg: Shaping, counts: Counter[str] | None, pairs: Iterable[tuple[str, str]] | None = None
) -> tuple[tuple[tuple[str, str], ...], bool, Counter[str] | None]:
    """A conversation's stored messages (``stored``: their JSON; ``pairs``: the same, already decoded), filtered
    (system dropped unless configured) and PII-scrubbed; whether that left them unchanged; and the PII replacements
    counted (into ``counts``, or a new Counter when that is None and there was anything to scrub)."""
    msgs = []
    same = True
    scrub = cfg.pii_scrub and pii.may_contain(stored, cfg.pii_kinds)
    if scrub and counts is None:
        counts = Counter()
    if pairs is None:
        pairs = [(m["role"], m["content"]) for m in _loads(stored)]
    for role, content in pairs:
        if role == "system" and not cfg.include_system:
            same = False
            continue
        if scrub:
            scrubbed = pii.scrub(content, cfg.pii_kinds, counts)
            same = same and scrubbed == content
            content = scrubbed
        msgs.append((role, content))
    return tuple(msgs), same, counts


def encode_line(messages: Iterable[tuple[str, str]]) -> bytes:
    """``json.dumps({"messages": [{"role", "content"}, ...]}, ensure_ascii=False, separators=(",", ":")) + "\\n"``
    (compact, like the messages ingest stores)."""
    return b"".join((LINE_HEAD, messages_json(messages).encode(), LINE_TAIL))


def cache_entry(cid: str, stored: str | bytes, cfg: Shaping, pairs: Iterable[tuple[str, str]] | None = None) -> Entry:
    """The cache entry for a conversation's stored messages. Stored messages are in the line's own encoding
    (codec.messages_json): left unchanged, they are the line."""
    msgs, same, own = prepared(stored, cfg, None, pairs)
    return Entry(dedup_prekey(msgs), json.dumps(own, sort_keys=True) if own else None,
                 None if same else encode_line(msgs), split_bucket(cid))


def expected(spec: Spec, row: Sequence[Any], label: int | None) -> bool:
    """Whether a build under ``spec`` will likely want this ingested conversation (a records.ConvTuple) for its SFT
    or its preference files, given the score of its latest feedback event as far as the caller knows (None: none
    seen). A guess only: a wrong guess costs a wasted entry or a miss the build fills in, never a wrong example."""
    _, _, mode, _, _, _, inline_score, inline_rated, usable, _ = row
    score = inline_score if label is None else label
    # A rated conversation (score other than 0) is wanted for the preference files, whatever min_score says.
    return bool(usable) and mode in spec.modes and (score != 0 or (score >= spec.min_score and (
        label is not None or inline_rated or spec.include_unrated)))
