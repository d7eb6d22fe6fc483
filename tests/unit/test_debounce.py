"""Debouncer with a fake clock: bursts, steady streams hitting the ceiling, ignore prefixes, deadlines."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.ingest.debounce import Debouncer

STORE = "/home/u/ChatOS-Memory"


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


def test_empty_debouncer_has_nothing_due() -> None:
    d = Debouncer(settle_s=5, max_wait_s=60)
    assert d.due(0.0) is None
    assert d.due(1e9) is None
    assert d.next_deadline() is None
    assert d.pending == 0


def test_burst_becomes_one_batch_after_the_quiet_gap() -> None:
    clock = FakeClock()
    d = Debouncer(settle_s=5, max_wait_s=60)
    for i in range(10):
        d.observe(f"{STORE}/logs/2025-01-0{i % 3 + 1}.jsonl", clock())
        clock.advance(0.2)
    last_event = clock.t - 0.2
    assert d.pending == 3
    assert d.next_deadline() == pytest.approx(last_event + 5)
    clock.t = last_event + 4.999
    assert d.due(clock()) is None
    clock.t = last_event + 5
    batch = d.due(clock())
    assert batch == frozenset(f"{STORE}/logs/2025-01-0{n}.jsonl" for n in (1, 2, 3))
    # The batch was handed over once and cleared.
    assert d.pending == 0
    assert d.due(clock.advance(100)) is None
    assert d.next_deadline() is None


def test_each_event_restarts_the_gap() -> None:
    clock = FakeClock(0.0)
    d = Debouncer(settle_s=2, max_wait_s=60)
    d.observe(f"{STORE}/a.jsonl", clock())
    clock.advance(1.5)
    assert d.due(clock()) is None
    d.observe(f"{STORE}/b.jsonl", clock())
    clock.advance(1.5)  # 3 s after the first event, 1.5 s after the second: still settling
    assert d.due(clock()) is None
    assert d.next_deadline() == pytest.approx(3.5)
    clock.advance(0.5)
    assert d.due(clock()) == frozenset({f"{STORE}/a.jsonl", f"{STORE}/b.jsonl"})


def test_steady_stream_is_cut_at_the_ceiling() -> None:
    clock = FakeClock(0.0)
    d = Debouncer(settle_s=5, max_wait_s=30)
    batches: list[tuple[float, frozenset[str]]] = []
    # An event every second for 100 s: the gap never elapses, so only the ceiling releases batches.
    for i in range(100):
        d.observe(f"{STORE}/f{i}.jsonl", clock())
        batch = d.due(clock())
        if batch is not None:
            batches.append((clock(), batch))
        clock.advance(1.0)
    assert [t for t, _ in batches] == [30.0, 61.0, 92.0]
    # The ceiling counts from the first event of each batch, and no path is lost or repeated.
    assert len(batches[0][1]) == 31  # events at t=0..30
    seen = [p for _, b in batches for p in b]
    assert len(seen) == len(set(seen))
    assert d.pending == 100 - len(seen)
    assert d.next_deadline() == pytest.approx(min(99 + 5, 93 + 30))


def test_next_deadline_is_the_earlier_of_gap_and_ceiling() -> None:
    d = Debouncer(settle_s=10, max_wait_s=15)
    d.observe(f"{STORE}/x.jsonl", 100.0)
    assert d.next_deadline() == 110.0
    d.observe(f"{STORE}/x.jsonl", 108.0)
    assert d.next_deadline() == 115.0  # gap would end at 118, the ceiling wins
    assert d.due(114.999) is None
    assert d.due(115.0) == frozenset({f"{STORE}/x.jsonl"})


def test_ignored_prefixes_never_trigger() -> None:
    state = "/var/lib/chatos-retrain"
    d = Debouncer(settle_s=1, max_wait_s=5, ignore=[state, Path(STORE) / "datasets", f"{STORE}/jobs/"])
    d.observe(f"{state}/state.sqlite-wal", 0.0)
    d.observe(state, 0.0)
    d.observe(f"{STORE}/datasets/v3/train.jsonl", 0.0)
    d.observe(Path(STORE) / "jobs" / "j1" / "metrics.jsonl", 0.0)
    assert d.pending == 0
    assert d.next_deadline() is None
    assert d.due(100.0) is None
    # Whole path components only: a sibling that merely shares the prefix's spelling still counts.
    d.observe(f"{state}-other/x.jsonl", 1.0)
    d.observe(f"{STORE}/datasets.jsonl", 1.0)
    assert d.due(2.0) == frozenset({f"{state}-other/x.jsonl", f"{STORE}/datasets.jsonl"})


def test_ignored_events_do_not_restart_the_gap() -> None:
    d = Debouncer(settle_s=2, max_wait_s=10, ignore=["/state"])
    d.observe(f"{STORE}/a.jsonl", 0.0)
    d.observe("/state/state.sqlite", 1.9)
    assert d.next_deadline() == 2.0
    assert d.due(2.0) == frozenset({f"{STORE}/a.jsonl"})


def test_set_ignore_replaces_the_prefixes_and_normalises_them() -> None:
    d = Debouncer(settle_s=1, max_wait_s=1, ignore=["/old"])
    d.set_ignore(["/new/./state/", "/new//jobs"])
    assert d.ignore == ("/new/jobs", "/new/state")
    assert d.ignored("/new/state/x") and d.ignored("/new/jobs/../jobs/y")
    assert not d.ignored("/old/x")


def test_flush_takes_the_pending_batch_early() -> None:
    d = Debouncer(settle_s=5, max_wait_s=60)
    d.observe(f"{STORE}/a.jsonl", 0.0)
    assert d.flush() == frozenset({f"{STORE}/a.jsonl"})
    assert d.flush() == frozenset()
    assert d.due(1e6) is None


@pytest.mark.parametrize(("settle", "ceiling"), [(0, 5), (-1, 5), (5, 4)])
def test_rejects_impossible_knobs(settle: float, ceiling: float) -> None:
    with pytest.raises(ValueError):
        Debouncer(settle_s=settle, max_wait_s=ceiling)
