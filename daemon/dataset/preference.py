"""Preference data of a dataset version (pure; issue 12): what thumbs-down votes and corrections teach, beside the
SFT files, for a trainer that learns from them (TRL's KTO and DPO trainers read these formats as they are).

- ``prefs_{train,eval}.jsonl``, KTO conversational, one line per rated conversation (score > 0 desirable, < 0
  undesirable; 0 never): ``{"prompt": [messages before the last assistant turn], "completion": [that turn],
  "label": true|false}``.
- ``pairs_{train,eval}.jsonl``, DPO conversational, one line per down-voted conversation with a correction:
  ``{"prompt": [...], "chosen": [{"role": "assistant", "content": correction}], "rejected": [the original turn]}``.

The examples are the SFT examples' own (same filters, PII scrub, deletion rule), cut after their last assistant
turn, deduplicated by the SFT dedup key over prompt + completion, and split by the SFT rule (eval pins, then the
id's bucket), so a conversation is in eval for every kind or for none. Lines are cut out of the SFT line's bytes
(no decode and re-encode per example: a build makes tens of thousands) and are byte for byte
``json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\\n"``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.codec import messages_json
from daemon.dataset import examples, pii
from daemon.dataset.selection import Example, Selection, _dedup, by_cid, example_line, split_bucket
from daemon.settings import DatasetSettings

PREFS_FILES = ("prefs_train.jsonl", "prefs_eval.jsonl")
PAIRS_FILES = ("pairs_train.jsonl", "pairs_eval.jsonl")
# One line per line of the train file, in its order: "<conversation id>\t<dataset version where it first appeared>".
PREFS_IDS, PAIRS_IDS = "prefs_train_ids.tsv", "pairs_train_ids.tsv"
DESIRABLE, UNDESIRABLE = "desirable", "undesirable"

MISPLACED = "correction without a thumbs-down"
IDENTICAL = "chosen and rejected are identical after normalisation"
EMPTY = "the correction is empty"
NO_PROMPT = "no prompt before the last assistant turn"

_HEAD = b'{"messages":['  # an SFT line: _HEAD + messages + _TAIL
_TAIL = b"]}\n"
_LAST = b',{"role":"assistant","content":'  # never inside a JSON string: there every '"' is escaped
_NEXT = b',{"role":'


# One line of a preference file: (conversation id, score, source, cut). A plain tuple: a build makes tens of
# thousands. cut < 0: source is the line (pairs); else source is the example's SFT line, cut where its last message
# starts, and the KTO line is made from it as the file is written (:class:`Lines`), so a build never holds the
# ~40 MB of KTO lines of a 100k-record store at once.
PrefLine = tuple[str, int, bytes, int]


@dataclass
class Preferences:
    """The preference examples of a version, split, with their lines, and what was rejected."""

    prefs_train: list[PrefLine] = field(default_factory=list)  # KTO lines
    prefs_eval: list[PrefLine] = field(default_factory=list)
    pairs_train: list[PrefLine] = field(default_factory=list)  # DPO lines
    pairs_eval: list[PrefLine] = field(default_factory=list)
    variants: dict[str, str] = field(default_factory=dict)  # pair's conversation id -> digest of its correction
    rejections: list[tuple[str, str]] = field(default_factory=list)  # (cid, reason), sorted
    duplicates_removed: int = 0

    def counts(self) -> dict[str, dict[str, int]]:
        def part(prefs: list[PrefLine], pairs: list[PrefLine]) -> dict[str, int]:
            up = sum(1 for p in prefs if p[1] > 0)
            return {DESIRABLE: up, UNDESIRABLE: len(prefs) - up, "pairs": len(pairs)}

        return {"train": part(self.prefs_train, self.pairs_train), "eval": part(self.prefs_eval, self.pairs_eval)}

    def variant(self, kind: str, line: PrefLine) -> str:
        """What a member's example says: its label (prefs), or its correction's digest (pairs)."""
        if kind == "pairs":
            return self.variants[line[0]]
        return DESIRABLE if line[1] > 0 else UNDESIRABLE

    def totals(self) -> dict[str, int]:
        c = self.counts()
        return {k: c["train"][k] + c["eval"][k] for k in (DESIRABLE, UNDESIRABLE, "pairs")}

    def manifest_part(self) -> dict[str, Any]:
        """What the manifest records: counts.preference, counts.preference_duplicates_removed,
        counts.rejections_by_reason, rejections."""
        return {
            "preference": self.counts(),
            "preference_duplicates_removed": self.duplicates_removed,
            "rejections_by_reason": dict(sorted(Counter(r for _, r in self.rejections).items())),
            "rejections": [{"conversation_id": cid, "reason": reason} for cid, reason in self.rejections],
        }


def normalised(text: str) -> str:
    """Whitespace stripped and collapsed, case folded (what makes a correction the same as the answer)."""
    return " ".join(text.split()).casefold()


def _cut(line: bytes) -> int:
    """Where the last message of an SFT line starts (the offset of its leading comma), when the line is in the
    canonical compact form and that message is an assistant turn after at least one other; else -1."""
    idx = line.rfind(_LAST)
    if idx <= len(_HEAD) or not line.startswith(_HEAD) or not line.endswith(_TAIL):
        return -1
    return idx if line.find(_NEXT, idx + 1) == -1 else -1


def trimmed(ex: Example) -> Example | None:
    """``ex`` cut after its last assistant turn, its line canonical (the example itself when it already is); None
    when no message comes before that turn."""
    line = example_line(ex)
    if _cut(line) > 0:
        if not ex.key and not ex.messages:  # dedup needs one of them (cached examples have their key)
            return ex._replace(messages=tuple(examples.line_messages(line)), line=line)
        return ex if ex.line else ex._replace(line=line)
    msgs = list(ex.messages or examples.line_messages(line))
    last = max((i for i, (role, _) in enumerate(msgs) if role == "assistant"), default=-1)
    if last <= 0:
        return None
    kept = tuple(msgs[:last + 1])
    return ex._replace(messages=kept, line=examples.encode_line(kept), key=b"")


def kto_line(line: bytes, desirable: bool) -> bytes:
    """The KTO line of a trimmed example's SFT line."""
    idx = _cut(line)
    return b"".join((b'{"prompt":', line[len(_HEAD) - 1:idx], b'],"completion":[', line[idx + 1:-len(_TAIL)],
                     b'],"label":true}\n' if desirable else b'],"label":false}\n'))


def pair_line(line: bytes, chosen: str) -> bytes:
    """The DPO line of a trimmed example's SFT line and a correction."""
    idx = _cut(line)
    return b"".join((b'{"prompt":', line[len(_HEAD) - 1:idx], b'],"chosen":',
                     messages_json([("assistant", chosen)]).encode(), b',"rejected":[', line[idx + 1:-len(_TAIL)],
                     b"]}\n"))


def select(
    candidates: Iterable[Example], corrections: dict[str, str], misplaced: Iterable[str], cfg: DatasetSettings,
    pins: set[str], keep_prefs: Callable[[], set[str]], keep_pairs: Callable[[], set[str]],
) -> Preferences:
    """Preference examples from ``candidates`` (the rated conversations' examples, before SFT dedup; those scored 0
    are skipped), ``corrections`` (conversation id -> the correction that counts) and ``misplaced`` (ids with a
    correction but no thumbs-down). ``pins``: the eval pins, the SFT split's new ones included. ``keep_*``: the
    previous version's members of each kind, which win among duplicates (as SFT's)."""
    out = Preferences()
    rejections = [(cid, MISPLACED) for cid in misplaced]
    prefs: list[Example] = []
    pairs: list[Example] = []
    kto: dict[str, tuple[bytes, int]] = {}  # cid -> (its SFT line, where the completion starts)
    head = len(_HEAD)
    # Flat on purpose: this runs once per rated conversation (tens of thousands).
    for ex in candidates:
        score = ex.score
        if score == 0:
            continue
        line = ex.line
        idx = line.rfind(_LAST)
        if idx > head and (ex.key or ex.messages) and line.startswith(_HEAD) and line.endswith(_TAIL) and line.find(
                _NEXT, idx + 1) == -1:
            cut = ex  # the common case: a cached example, already cut after its last assistant turn
        else:
            trim = trimmed(ex)
            if trim is None:
                rejections.append((ex.cid, NO_PROMPT))
                continue
            cut, line = trim, trim.line
            idx = _cut(line)
        kto[cut.cid] = (line, idx)
        prefs.append(cut)
        if score > 0:
            continue
        better = corrections.get(ex.cid)
        if better is None:
            continue
        if cfg.pii_scrub and pii.may_contain(better, cfg.pii_kinds):
            better = pii.scrub(better, cfg.pii_kinds, Counter())
        msgs = cut.messages or tuple(examples.line_messages(line))
        if not better.strip():
            rejections.append((ex.cid, EMPTY))
        elif normalised(better) == normalised(msgs[-1][1]):
            rejections.append((ex.cid, IDENTICAL))
        else:
            pairs.append(cut._replace(messages=(*msgs, ("assistant", better)), line=pair_line(line, better),
                                      key=b""))
            out.variants[ex.cid] = hashlib.blake2b(better.encode(), digest_size=8).hexdigest()
    if cfg.dedup:
        kept = Selection([])
        _dedup(prefs, keep_prefs, kept)
        prefs = kept.examples
        out.duplicates_removed = kept.duplicates_removed
        kept = Selection([])
        _dedup(pairs, keep_pairs, kept)
        pairs = kept.examples
        out.duplicates_removed += kept.duplicates_removed
    else:
        prefs.sort(key=by_cid)
        pairs.sort(key=by_cid)
    fraction = cfg.eval_fraction
    p_train, p_eval, d_train, d_eval = out.prefs_train, out.prefs_eval, out.pairs_train, out.pairs_eval
    for ex in prefs:
        cid = ex.cid
        in_eval = cid in pins or (ex.bucket if ex.bucket >= 0 else split_bucket(cid)) < fraction
        (p_eval if in_eval else p_train).append((cid, ex.score, *kto[cid]))
    for ex in pairs:
        cid = ex.cid
        in_eval = cid in pins or (ex.bucket if ex.bucket >= 0 else split_bucket(cid)) < fraction
        (d_eval if in_eval else d_train).append((cid, ex.score, ex.line, -1))
    out.rejections = sorted(set(rejections))
    return out


class Lines:
    """A preference file's bytes, as chunks of ``size`` lines, made each time it is iterated (once for the digest,
    once by the writer): a KTO line exists only while its chunk does."""

    def __init__(self, part: Sequence[PrefLine], size: int = 1024) -> None:
        self.part, self.size = part, size

    def __iter__(self) -> Iterator[bytes]:
        head, tail = len(_HEAD), len(_TAIL)
        for i in range(0, len(self.part), self.size):
            yield b"".join([
                src if cut < 0 else b"".join((b'{"prompt":', src[head - 1:cut], b'],"completion":[',
                                              src[cut + 1:-tail],
                                              b'],"label":true}\n' if score > 0 else b'],"label":false}\n'))
                for _, score, src, cut in self.part[i:i + self.size]])


def digest(chunked: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunked:
        h.update(chunk)
    return h.hexdigest()
