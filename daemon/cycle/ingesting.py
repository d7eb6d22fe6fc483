"""Stage: read what is new in the store (the changed files, or everything) into state."""

from __future__ import annotations

from daemon.cycle.context import Cycle
from daemon.ingest import ingestor


def run(cycle: Cycle) -> bool:
    paths = cycle.request.paths
    cycle.step("ingesting", "full scan" if paths is None else f"{len(paths)} changed file(s)")
    with cycle.timed("ingest"):
        report = ingestor.ingest(cycle.settings, cycle.state, None if paths is None else sorted(paths))
    cycle.result.counts["ingest"] = {k: v for k, v in report.as_dict().items() if k != "seconds"}
    return True
