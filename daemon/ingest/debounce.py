"""Debounce file-change hints into batches: a quiet gap restarted by each event, and a ceiling under a steady stream.

Pure and clock-free: every call takes ``now`` (seconds on a monotonic clock) from the caller, so tests drive it with
a fake clock and the service wakes at ``next_deadline()`` with an interruptible wait. The two knobs mirror watchfiles'
``step`` (quiet gap, ``watch.settle_s``) and ``debounce`` (ceiling, ``watch.max_wait_s``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def _norm(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.fspath(path))


class Debouncer:
    """Collects changed paths; ``due(now)`` hands the batch over once the store has been quiet for ``settle_s``,
    or ``max_wait_s`` after the batch's first event, whichever comes first.

    Paths under an ``ignore`` prefix (our own state dir, datasets, jobs folders) are dropped by ``observe`` so the
    service's own writes never trigger a cycle.
    """

    def __init__(self, settle_s: float, max_wait_s: float, ignore: Iterable[str | os.PathLike[str]] = ()) -> None:
        if settle_s <= 0:
            raise ValueError("settle_s must be > 0")
        if max_wait_s < settle_s:
            raise ValueError("max_wait_s must be >= settle_s")
        self.settle_s = float(settle_s)
        self.max_wait_s = float(max_wait_s)
        self._ignore: tuple[str, ...] = ()
        self.set_ignore(ignore)
        self._paths: set[str] = set()
        self._first: float | None = None
        self._last: float | None = None

    @property
    def ignore(self) -> tuple[str, ...]:
        """Normalised path prefixes whose events are dropped (a prefix matches itself and everything below it)."""
        return self._ignore

    def set_ignore(self, prefixes: Iterable[str | os.PathLike[str]]) -> None:
        """Replace the ignore prefixes (on reload, when the state dir may have moved)."""
        self._ignore = tuple(sorted({_norm(p) for p in prefixes if os.fspath(p)}))

    def ignored(self, path: str | os.PathLike[str]) -> bool:
        """True when ``path`` is one of the ignore prefixes or lies below one (whole path components only)."""
        p = _norm(path)
        return any(p == prefix or p.startswith(prefix.rstrip(os.sep) + os.sep) for prefix in self._ignore)

    def observe(self, path: str | os.PathLike[str], now: float) -> None:
        """Record a change hint at ``now``: restarts the quiet gap; the ceiling counts from the batch's first event."""
        if self.ignored(path):
            return
        if not self._paths:
            self._first = now
        self._last = now
        self._paths.add(os.fspath(path))

    def next_deadline(self) -> float | None:
        """When the pending batch becomes due (the earlier of gap end and ceiling), or None when nothing is pending."""
        if self._first is None or self._last is None:
            return None
        return min(self._last + self.settle_s, self._first + self.max_wait_s)

    def due(self, now: float) -> frozenset[str] | None:
        """The batch if its gap has passed or its ceiling is reached at ``now`` (and start a new one), else None."""
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return None
        return self.flush()

    def flush(self) -> frozenset[str]:
        """Take whatever is pending now, due or not (used on shutdown and before a full rescan)."""
        batch = frozenset(self._paths)
        self._paths.clear()
        self._first = self._last = None
        return batch

    @property
    def pending(self) -> int:
        """How many distinct paths wait in the current batch."""
        return len(self._paths)
