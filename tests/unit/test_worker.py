"""Single flight: one cycle at a time; triggers during a run fold into exactly one follow-up."""

from __future__ import annotations

import threading
from typing import Any

from daemon.cycle.pipeline import CycleRequest, CycleResult
from daemon.cycle.worker import Worker


class Gate:
    """A fake cycle that blocks until released, recording what it was asked to do."""

    def __init__(self) -> None:
        self.requests: list[CycleRequest] = []
        self.started = threading.Semaphore(0)
        self.release = threading.Semaphore(0)

    def __call__(self, request: CycleRequest, progress: Any) -> CycleResult:
        self.requests.append(request)
        progress("ingesting", f"run {len(self.requests)}")
        self.started.release()
        assert self.release.acquire(timeout=10)
        return CycleResult(f"c-{len(self.requests)}", "skipped", False, "ok", forced=request.forced)


def test_triggers_during_a_run_cause_exactly_one_follow_up() -> None:
    gate = Gate()
    w = Worker(gate)
    t1 = w.submit(CycleRequest({"a"}, origins=["watch"]))
    assert gate.started.acquire(timeout=10)
    seen: list[tuple[str, str]] = []
    followers = [w.submit(CycleRequest({f"p{i}"}, forced=(i == 3), origins=[f"t{i}"]),
                          on_progress=lambda p, d: seen.append((p, d))) for i in range(5)]
    assert w.busy
    gate.release.release()
    assert t1.done.wait(10) and t1.result is not None and t1.result.cycle_id == "c-1"
    assert gate.started.acquire(timeout=10)
    gate.release.release()
    for f in followers:
        assert f.done.wait(10)
        assert f.result is not None and f.result.cycle_id == "c-2"
    assert len(gate.requests) == 2
    follow = gate.requests[1]
    assert follow.paths == {f"p{i}" for i in range(5)} and follow.forced and len(follow.origins) == 5
    assert seen == [("ingesting", "run 2")] * 5
    assert w.close(5)


def test_a_full_scan_request_absorbs_path_requests() -> None:
    a = CycleRequest({"x"})
    a.merge(CycleRequest(None))
    a.merge(CycleRequest({"y"}))
    assert a.paths is None


def test_close_drops_the_queued_follow_up_and_refuses_new_work() -> None:
    gate = Gate()
    w = Worker(gate)
    first = w.submit(CycleRequest(set()))
    assert gate.started.acquire(timeout=10)
    queued = w.submit(CycleRequest(set()))
    closer = threading.Thread(target=w.close, args=(10,))
    closer.start()
    assert queued.done.wait(10) and queued.result is None
    gate.release.release()
    closer.join(10)
    assert first.result is not None and len(gate.requests) == 1
    late = w.submit(CycleRequest(set()))
    assert late.done.is_set() and late.result is None


def test_a_crashing_cycle_does_not_kill_the_worker() -> None:
    calls: list[int] = []

    def run(request: CycleRequest, progress: Any) -> CycleResult:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return CycleResult("c-ok", "skipped", False, "fine")

    w = Worker(run)
    t = w.submit(CycleRequest(set()))
    assert t.done.wait(10) and t.result is not None and t.result.outcome == "error"
    t2 = w.submit(CycleRequest(set()))
    assert t2.done.wait(10) and t2.result is not None and t2.result.cycle_id == "c-ok"
    assert w.alive
    w.close(5)
