"""PII scrub (pure): emails, phone numbers, API keys/tokens and IPv4 addresses become placeholders.

Conservative on purpose: a pattern that also eats ordinary text (version numbers, code literals) costs training
quality; a missed secret is worse, so the secret patterns are the broad ones.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable

PLACEHOLDER = {"email": "[EMAIL]", "phone": "[PHONE]", "secret": "[SECRET]", "ipv4": "[IPV4]"}

_SECRET = re.compile(
    r"""(?x)
    \b(?:
        sk-(?:proj-|ant-)?[A-Za-z0-9_\-]{20,}          # OpenAI / Anthropic style
      | gh[pousr]_[A-Za-z0-9]{36,}                     # GitHub tokens
      | github_pat_[A-Za-z0-9_]{40,}
      | xox[abprs]-[A-Za-z0-9\-]{10,}                  # Slack
      | AKIA[0-9A-Z]{16}                               # AWS access key id
      | AIza[0-9A-Za-z_\-]{35}                         # Google API key
      | hf_[A-Za-z0-9]{30,}                            # Hugging Face
      | glpat-[A-Za-z0-9_\-]{20,}                      # GitLab
      | eyJ[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}\.[A-Za-z0-9_\-]{10,}   # JWT
    )
    | (?<=Bearer\ )[A-Za-z0-9._~+/\-]{16,}=*
    | (?i:(?<=api_key=)|(?<=apikey=)|(?<=token=)|(?<=secret=)|(?<=password=))[^\s&"']{8,}
    | -----BEGIN\ [A-Z ]*PRIVATE\ KEY-----[\s\S]*?-----END\ [A-Z ]*PRIVATE\ KEY-----
    """
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"
)
# International (+CC ...) or NANP-like (3-3-4 with separators); needs separators so plain integers survive.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .\-]?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]\d{2,4}){2,4}"
    r"|\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}|\d{3}[.\-]\d{3}[.\-]\d{4})(?!\w)"
)

_ORDER = (("secret", _SECRET), ("email", _EMAIL), ("ipv4", _IPV4), ("phone", _PHONE))
# Cheap necessary conditions: each pattern can only match text holding one of its hints. Most of the patterns start
# with a lookbehind or an alternation, so the regex engine tries them at every position (3-10 MB/s); the hints are
# plain substring searches, and most chat text holds none of them (~20x faster scrub on prose).
_SECRET_HINTS = ("=", "_", "sk-", "xox", "AKIA", "AIza", "glpat-", "eyJ", "Bearer ", "-----BEGIN ")
_DIGIT = re.compile(r"\d")


def _has_digit(text: str) -> bool:
    if text.isascii():  # O(1) in CPython; then ten substring searches beat the regex
        return any(d in text for d in "0123456789")
    return _DIGIT.search(text) is not None  # \d also matches non-ASCII digits, as the patterns do


def _may_match(kind: str, text: str) -> bool:
    if kind == "email":
        return "@" in text
    if kind == "secret":
        return any(h in text for h in _SECRET_HINTS)
    return _has_digit(text)  # ipv4, phone


# The single characters among the hints (digits for ipv4/phone, "@" for email, "=" "_" for secrets): bytes.translate
# deleting every other byte finds any of them in one C pass.
_HINT_BYTES = {"email": b"@", "ipv4": b"0123456789", "phone": b"0123456789", "secret": b"=_"}
# The longer secret hints, each behind one of its characters: a one-byte search runs at memchr speed, a longer one
# at a tenth of that. ("xox" stands behind "-": its pattern needs "xox" and a "-".)
_MULTI_HINTS = ((b"-", (b"sk-", b"xox", b"glpat-", b"-----BEGIN ")), (b"K", (b"AKIA",)), (b"z", (b"AIza",)),
                (b"J", (b"eyJ",)), (b"B", (b"Bearer ",)))
# The two tables must name the same longer hints: tests/unit/test_dataset_core.py checks it.


def _hint_bytes_absent(kinds: frozenset[str]) -> bytes:
    keep = {c for k in kinds for c in _HINT_BYTES.get(k, b"")}
    return bytes(c for c in range(256) if c not in keep)


_ABSENT: dict[frozenset[str], bytes] = {}


def may_contain(text: str | bytes, kinds: Iterable[str]) -> bool:
    """False when no message of a conversation can hold a match, judged from its JSON text (one look at the whole
    instead of one per message). The hints hold no character JSON escapes, so a message's hint shows in its JSON
    too; a ``\\u`` escape could hide one, so its presence answers True. Given the JSON as UTF-8 bytes, it looks at
    every single-character hint in one pass (a non-ASCII digit, which ``\\d`` also matches, is never ASCII, so
    non-ASCII text takes the careful way)."""
    if isinstance(text, bytes):
        enabled = frozenset(kinds)
        if not text.isascii():
            return may_contain(text.decode(), enabled)
        absent = _ABSENT.get(enabled)
        if absent is None:
            absent = _ABSENT[enabled] = _hint_bytes_absent(enabled)
        if (b"\\" in text and b"\\u" in text) or text.translate(None, absent):
            return True
        return "secret" in enabled and any(c in text and any(h in text for h in hs) for c, hs in _MULTI_HINTS)
    enabled = frozenset(kinds)
    if "\\u" in text or ("email" in enabled and "@" in text):
        return True
    if ("ipv4" in enabled or "phone" in enabled) and _has_digit(text):  # one look for both
        return True
    return "secret" in enabled and _may_match("secret", text)


def scrub(text: str, kinds: Iterable[str], counts: Counter[str] | None = None) -> str:
    """Replace every match of the enabled ``kinds`` with its placeholder; add what was replaced to ``counts``."""
    enabled = set(kinds)
    for kind, pattern in _ORDER:
        if kind not in enabled or not _may_match(kind, text):
            continue
        text, n = pattern.subn(PLACEHOLDER[kind], text)
        if n and counts is not None:
            counts[kind] += n
    return text


# What the scrub's output depends on: cached scrubbed examples (dataset.example_cfg) are redone when this changes.
SIGNATURE = hashlib.sha256(
    repr((PLACEHOLDER, [(kind, p.pattern, p.flags) for kind, p in _ORDER])).encode()
).hexdigest()[:16]
