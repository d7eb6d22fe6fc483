"""Crash anywhere (issue 6): kill the real service at many points, restart it, check nothing was lost or doubled.

    .venv/bin/python bench/crash_anywhere.py --kills 50 [--seed 0] [--records 1500] [--sigterm 0.2] [--faults 0.35]

Each round changes the generated ChatOS store (new records, feedback, some chats deleted), runs
``python -m daemon --config X run`` with the fake trainer (also the merge/convert child) and the Ollama stand-in (a
separate process), and stops it with ``kill -9`` (or SIGTERM) a random delay after one of its log events or at a named
fault point in daemon code (``CHATOS_RETRAIN_FAULT``). Then: crash-consistency checks on what it left, a restart, a
check that the start-up cycle alone recovered everything, one ``trigger --wait`` cycle, a SIGTERM stop that must
exit 0, and a full check against the ground truth read from the store files (see tests/faults/crash_harness.py).

Prints one table row per kill (plan, where it landed, exit status, violations) and a summary line. Exit status 1 when
any round found a violation.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "faults")]

import crash_harness as h  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=50, help="rounds, one kill each (default 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", type=int, default=1500, help="records in the generated store (default 1500)")
    p.add_argument("--sigterm", type=float, default=0.2, help="fraction of rounds stopped by SIGTERM (default 0.2)")
    p.add_argument("--faults", type=float, default=0.35, help="fraction of rounds using a fault point (default 0.35)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed after)")
    p.add_argument("--json", type=Path, default=None, help="also write every round as JSON to this file")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="crash-anywhere-"))
    print(f"{'#':>3} {'plan':<46} {'targeted':<22} {'landed':<24} {'exit':>5} {'s':>5}  violations")
    started = time.monotonic()

    def row(i: int, r: h.RoundResult) -> None:
        v = "; ".join(r.violations) if r.violations else "-"
        print(f"{i + 1:>3} {r.plan.describe():<46} {r.plan.phase:<22} {r.landed:<24} {r.exit_code!s:>5} "
              f"{r.seconds:5.1f}  {v}", flush=True)

    try:
        results = h.campaign(work / "world", a.kills, seed=a.seed, n_records=a.records, sigterm_fraction=a.sigterm,
                             fault_fraction=a.faults, on_round=row)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    landed = collections.Counter(r.landed for r in results)
    bad = [r for r in results if r.violations]
    kills = sum(r.plan.signal == signal.SIGKILL for r in results)
    faults = sum(r.plan.fault is not None for r in results)
    print(f"\nsummary: {len(results)} kills ({kills} kill -9, {len(results) - kills} SIGTERM; "
          f"{faults} at fault points, {len(results) - faults} timed) in {time.monotonic() - started:.0f}s; landed: "
          + ", ".join(f"{k} {n}" for k, n in sorted(landed.items(), key=lambda kv: -kv[1]))
          + f"; rounds with violations: {len(bad)}; violations: {sum(len(r.violations) for r in results)}")
    if a.json:
        a.json.write_text(json.dumps([{"plan": r.plan.describe(), "targeted": r.plan.phase, "landed": r.landed,
                                       "last_event": r.last_event, "exit": r.exit_code, "seconds": round(r.seconds, 2),
                                       "violations": r.violations} for r in results], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
