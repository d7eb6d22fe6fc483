"""The ``demo`` verb: parse, call :mod:`daemon.demo.run`, print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daemon import api, log
from daemon.cli.common import EXIT_ERROR, EXIT_OK, load, print_progress
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.demo import run as demo_run
from daemon.service.lifecycle import Service


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def demo(args: argparse.Namespace) -> int:
    """The embedded default: the demo folder (made once), then one cycle (``--once``) or the service."""
    cfg = demo_run.prepare(Path(args.dir).expanduser().absolute(), args.records, _say)
    args.config = cfg
    s = load(args)
    if args.once:
        with api.open_state(s) as st:
            result = run_cycle(s, st, CycleRequest(None, forced=True, origins=["demo"]),
                               progress=lambda p, d: print_progress({"phase": p, "detail": d}))
        print(f"{result.cycle_id}: {result.outcome}: {result.reason}")
        print(f"next: chatos-retrain --config {cfg} status")
        return EXIT_ERROR if result.outcome.failed else EXIT_OK
    print(f"running the service on {s.store.root} (config {cfg}); Ctrl-C stops it.\n"
          f"  in another terminal: chatos-retrain --config {cfg} status\n"
          f"                      chatos-retrain --config {cfg} trigger --wait", file=sys.stderr)
    log.configure(s.log.level, s.log.format)
    svc = Service(cfg, initial=s)
    svc.install_signals()
    return svc.run()
