"""Verbs around the running service and its jobs: run, status, trigger, reload, jobs, job show, cancel, doctor,
install-unit. Each asks the running service over its control socket when one runs, else works on state here."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from daemon import api, disk, log, settings
from daemon.cli.common import (
    EXIT_CONFIG,
    EXIT_DATA,
    EXIT_ERROR,
    EXIT_OK,
    CliError,
    config_errors,
    is_dir,
    load,
    print_json,
    print_progress,
    socket_path,
)
from daemon.cycle.context import Outcome
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.service import control, unit
from daemon.service.lifecycle import Service
from daemon.train import doctor as preflight
from daemon.train import gate, ray_jobs, runner
from daemon.train.ray_client import RayError


def run(args: argparse.Namespace) -> int:
    """Run the service in the foreground (systemd's ExecStart)."""
    try:
        s, used = settings.load(args.config)
    except settings.ConfigError as exc:
        config_errors(exc)
        return EXIT_CONFIG
    log.configure(s.log.level, s.log.format)
    svc = Service(used, initial=s)
    svc.install_signals()
    return svc.run()


def _print_store(status: api.StoreStatus) -> None:
    c = status.conversations
    print(f"store:     {status.store_root}" + ("" if is_dir(Path(status.store_root)) else "  (missing or unreadable)"))
    print(f"state:     {status.state_dir}")
    print(f"files:     {status.files_tracked} tracked")
    print(f"conversations: {c['total']} total, {c['eligible']} eligible ({c['positive']} positive), "
          f"{c['deleted']} deleted, {c['unusable']} unusable, {c['rejected_lines']} rejected line(s)")
    print(f"feedback:  {status.feedback_events} event(s), {status.feedback_waiting} waiting for their conversation")
    latest = f"v{status.latest_dataset}" if status.latest_dataset else "none"
    print(f"dataset:   latest {latest}; {status.new_eligible_since_dataset} new eligible since")
    print(f"model:     latest {status.latest_model or 'none'}")
    if status.job:
        print(f"job:       {status.job['job_id']} on dataset v{status.job['dataset_version']}: {status.job['line']}")
    elif status.waiting:
        print(f"training:  {'ready' if status.waiting['train'] else 'waits'}: {status.waiting['reason']}")
        print(f"           expected {status.waiting['next']}")
    for m in status.pending_registrations or []:
        print(f"pending:   {m['tag']} (attempt {m['attempts']}, next try {m['next_attempt_at']}): {m['last_error']}")
    if status.disk:
        d = status.disk
        print(f"disk:      state {disk.human(d['state'])}, datasets {disk.human(d['datasets'])}, "
              f"jobs {disk.human(d['jobs'])}, exports {disk.human(d['exports'])}; {disk.human(d['free'])} free")
    champ = status.model
    if champ:
        how = (f"built on {len(champ['lineage']) - 1} version(s) before it" if champ["init"] == "champion"
               else "trained from the base")
        print(f"champion:  {champ['champion_job']} (dataset v{champ['dataset_version']}, {how})"
              + (f": {champ['plan']}" if champ.get("plan") else ""))
        if champ.get("note"):
            print(f"           {champ['note']}")
        if champ.get("next_plan"):
            print(f"next run:  {champ['next_plan']} (on the latest dataset)")
    for label, judged in (("champion", (status.gate or {}).get("champion")),
                          ("last candidate", (status.gate or {}).get("last_candidate"))):
        if judged:
            print(f"gate:      {label} {judged['job_id']} ({judged['status']})")
            for line in judged.get("lines") or []:
                print(f"           {line}")
    print(f"as of:     last ingest {status.last_ingest_at or 'never'} (chatos-retrain ingest reads what is new)")


def _print_last(last: dict[str, Any]) -> None:
    if last:
        print(f"last cycle: {last['cycle_id']} -> {last['outcome']}: {last['reason']}")
        counts = last.get("counts") or {}
        if counts.get("plan"):
            print(f"  plan:    {counts['plan'].get('line')}")
        if counts.get("learned"):
            print(f"  {counts['learned']}")
        for line in gate.lines(counts.get("gate")):
            print(f"  gate:    {line}")


def status(args: argparse.Namespace) -> int:
    s = load(args)
    try:
        live = control.request(socket_path(s), {"cmd": "status"}, timeout=10.0)
    except control.ControlUnavailable:
        live = None
    if live is not None:
        if args.json:
            print_json(live)
            return EXIT_OK
        svc, last = live["service"], live.get("last_cycle") or {}
        print(f"service:   running (pid {svc['pid']}, since {svc['started_at']}), watcher: {svc['watcher']}")
        print(f"phase:     {svc['status']}")
        _print_last(last)
        print(f"next window: {svc['next_window'] or ('always open' if not svc['windows'] else 'none')}")
        store = api.StoreStatus(**live["store"])
    else:
        with api.open_state(s) as st:
            store = api.store_status(s, st)
            last = cycle.summary if (cycle := st.cycles.last()) else {}
        if args.json:
            print_json({"service": None, "last_cycle": last or None, "store": store.as_json()})
            return EXIT_OK
        print("service:   not running (state only)")
        _print_last(last)  # why it waits, or how the last cycle ended, also when no service runs
    _print_store(store)
    return EXIT_OK


def trigger(args: argparse.Namespace) -> int:
    """Run a cycle now (thresholds ignored, single flight kept): through the service, or here when none runs."""
    s = load(args)
    try:
        result = control.request(
            socket_path(s), {"cmd": "trigger", "wait": args.wait}, timeout=None if args.wait else 30.0,
            on_progress=print_progress if (args.wait and not args.json) else None,
        )
    except control.ControlUnavailable:
        with api.open_state(s) as st:
            local = run_cycle(s, st, CycleRequest(None, forced=True, origins=["cli"]),
                              progress=None if args.json else lambda p, d: print_progress({"phase": p, "detail": d}))
        result = {**local.as_json(), "ran": "in this process (no service running)"}
    except control.ControlError as exc:
        raise CliError(f"trigger refused: {exc}") from None
    if args.json:
        print_json(result)
    elif "cycle_id" in result:
        print(f"{result['cycle_id']}: {result['outcome']}: {result['reason']}")
        counts = result.get("counts") or {}
        if counts.get("plan"):
            print(f"plan:    {counts['plan'].get('line')}")
        if counts.get("learned"):
            print(f"         {counts['learned']}")
    else:
        print("cycle queued in the running service (use --wait to follow it)")
    return EXIT_ERROR if result.get("outcome") == Outcome.ERROR else EXIT_OK


def reload(args: argparse.Namespace) -> int:
    s = load(args)
    try:
        result = control.request(socket_path(s), {"cmd": "reload"}, timeout=60.0)
    except control.ControlUnavailable as exc:
        raise CliError(f"service not running: {exc}") from None
    except control.ControlError as exc:
        raise CliError(f"reload failed: {exc}") from None
    if args.json:
        print_json(result)
    elif result.get("reloaded"):
        print("configuration reloaded")
    else:
        for line in result.get("errors", []):
            print(line, file=sys.stderr)
        raise CliError("new configuration rejected; the service keeps the old one", EXIT_CONFIG)
    return EXIT_OK


def jobs(args: argparse.Namespace) -> int:
    s = load(args)
    with api.open_state(s) as st:
        rows = [j.as_dict() for j in st.jobs.recent(limit=args.limit)]
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("no training jobs yet")
    for r in rows:
        m = r.get("latest_metrics") or {}
        loss = m.get("train_loss")
        print(f"{r['job_id']}  {r['status']:<11} dataset v{r['dataset_version']}  step {m.get('step', '-')}"
              + (f"  loss {loss:.4f}" if isinstance(loss, int | float) else "")
              + (f"  {r['error']}" if r.get("error") else ""))
    return EXIT_OK


def job_show(args: argparse.Namespace) -> int:
    s = load(args)
    with api.open_state(s) as st:
        row: dict[str, Any] | None = job.as_dict() if (job := st.jobs.get(args.job_id)) else None
    if row is None:
        raise CliError(f"no job {args.job_id} (see: chatos-retrain jobs)", EXIT_DATA)
    tail = runner.log_tail(Path(row["log_path"]), args.lines)
    if args.json:
        print_json({**row, "log_tail": tail})
        return EXIT_OK
    for k in ("job_id", "status", "dataset_version", "cycle_id", "pid", "created_at", "started_at", "finished_at",
              "exit_code", "error", "job_dir"):
        print(f"{k + ':':<16} {row.get(k)}")
    if row.get("latest_metrics"):
        print(f"{'latest:':<16} {json.dumps(row['latest_metrics'])}")
    if row.get("result"):
        print(f"{'result:':<16} {json.dumps(row['result'])}")
    print(f"--- last {len(tail)} line(s) of {row['log_path']}")
    for line in tail:
        print(line)
    return EXIT_OK


def cancel(args: argparse.Namespace) -> int:
    s = load(args)
    try:
        res = control.request(socket_path(s), {"cmd": "cancel", "job_id": args.job_id}, timeout=30.0)
        print(f"cancelling {res['cancelling']}")
        return EXIT_OK
    except control.ControlUnavailable:
        pass
    except control.ControlError as exc:
        raise CliError(str(exc), EXIT_DATA) from None
    with api.open_state(s) as st:
        running = [r.job_id for r in st.jobs.recent(status="running")]
        target = args.job_id or (running[0] if running else None)
        try:  # a Ray job is stopped on its cluster; a local trainer by its process group
            done = target is not None and (ray_jobs.cancel_detached(s.ray, st, target)
                                           or runner.cancel_detached(st, target))
        except RayError as exc:
            raise CliError(f"cannot cancel {target}: {exc}", EXIT_ERROR) from None
        if not done:
            raise CliError(f"no running job{' ' + args.job_id if args.job_id else ''} to cancel", EXIT_DATA)
    print(f"cancelled {target}")
    return EXIT_OK


def doctor(args: argparse.Namespace) -> int:
    s = load(args)
    checks = preflight.run(s)
    if args.json:
        print_json([c.__dict__ | {"line": c.line()} for c in checks])
    else:
        for c in checks:
            print(c.line())
    return EXIT_OK if all(c.ok for c in checks) else EXIT_ERROR


def install_unit(args: argparse.Namespace) -> int:
    """Render the systemd unit for this install (this venv's entry point, this config) and install it."""
    s = load(args)
    used = settings.find_config(args.config)
    python = Path(sys.executable)
    store_root = s.store.root if used is not None and not args.user else None
    try:
        text = unit.render_unit(
            user_mode=args.user, python=python, config=used.absolute() if used else None, store_root=store_root,
            module=unit.entry_point_missing(python), stop_timeout_s=s.service.stop_timeout_s,
        )
    except ValueError as exc:
        raise CliError(f"cannot render the unit: {exc}", EXIT_CONFIG) from None
    if args.print:
        print(text, end="")
        return EXIT_OK
    try:
        res = unit.install_unit(text, user_mode=args.user, force=args.force, store_root=store_root)
    except unit.UnitExistsError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    except PermissionError:
        raise CliError("permission denied writing the unit: run as root, or use --user", EXIT_ERROR) from None
    print(f"{'wrote' if res.written else 'unchanged'}: {res.path}")
    for cmd in res.next_commands:
        print(f"  {cmd}")
    return EXIT_OK
