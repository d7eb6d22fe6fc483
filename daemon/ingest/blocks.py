"""A block of lines of one data file, parsed into what ingest stores per line (or why a line is rejected).

Ingest runs :func:`parse_block` on every block it reads; the parse worker (``ingest.worker``) runs it in a child
process during a bulk ingest.
"""

from __future__ import annotations

from datetime import datetime

from daemon.codec import messages_json
from daemon.ingest.fast_paths import fast_feedback_parser, parse_fields
from daemon.ingest.records import (
    ConvTuple,
    FeedbackTuple,
    Kind,
    Rejected,
    Rejection,
    line_hash,
    parse_feedback,
    rated,
    score,
)


def parse_block(
    lines: list[bytes], kind: Kind, known: set[str] | frozenset[str] = frozenset(),
    pairs: list[list[tuple[str, str]] | None] | None = None,
) -> list[ConvTuple | FeedbackTuple | Rejected]:
    """Each line of a ``logs``, ``training`` or ``feedback`` file as ingest stores it, or why it is rejected.
    ``known``: ids whose content is known to come from a higher-ranked source already; a ``training`` line for one
    of those carries no messages (ingest only records where it was seen). ``pairs``, when given, gets each
    conversation line's messages as (role, content) pairs (None for a rejected line)."""
    out: list[ConvTuple | FeedbackTuple | Rejected] = []
    if kind == "feedback":
        fast_path = fast_feedback_parser()
        for data in lines:
            fast = fast_path(data) if fast_path is not None else None
            if fast is not None:
                out.append(fast)
                continue
            ev = parse_feedback(data)
            if isinstance(ev, Rejection):
                out.append(Rejected(ev.reason, line_hash(data)))
            else:
                ts = ev.timestamp or datetime.now().isoformat(timespec="microseconds")
                out.append((ev.conversation_id, ev.thumbs_up, ev.quality, ev.note, ts, ev.score, ev.better))
        return out
    skip = known if kind == "training" else frozenset()
    for data in lines:
        f = parse_fields(data, kind)
        if isinstance(f, Rejection):
            out.append(Rejected(f.reason, line_hash(data)))
            if pairs is not None:
                pairs.append(None)
            continue
        if pairs is not None:
            pairs.append(f.messages)
        cid, thumbs, quality = f.conversation_id, f.thumbs_up, f.quality
        msgs = None if cid in skip else messages_json(f.messages)
        out.append((cid, msgs, f.mode, f.model, quality, thumbs, score(thumbs, quality), rated(thumbs, quality),
                    f.usable, f.started_at))
    return out
