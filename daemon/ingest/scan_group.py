"""The transaction a scan's files share: several files' writes commit together, each file in its own savepoint.

Fewer, larger commits make a cold ingest ~25% cheaper (the id indexes' pages are written to the WAL once per group
instead of once per file); a savepoint per file lets an unreadable file undo only its own writes, and a crash undoes
the whole group, cursors included, so nothing is lost or counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from daemon.state import State


class ScanGroup:
    """The transaction a scan's files share: opened at the first write, committed every ``limit`` bytes read."""

    def __init__(self, state: State, limit: int) -> None:
        self.state = state
        self.limit = limit
        self.read = 0
        self._stack: ExitStack | None = None

    @contextmanager
    def atomic(self) -> Iterator[None]:
        if self._stack is None:
            self._stack = ExitStack()
            self._stack.enter_context(self.state.transaction())
            self.read = 0
        with self.state.atomic():
            yield

    def add(self, nbytes: int) -> None:
        self.read += nbytes
        if self.read >= self.limit:
            self.commit()

    def commit(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def abort(self, exc: BaseException) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.__exit__(type(exc), exc, exc.__traceback__)
