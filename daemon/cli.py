"""``chatos-retrain``: a thin adapter over :mod:`daemon.api`.

Expected errors are one line on stderr and a named exit code, never a traceback. ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from daemon import api, log, proc, settings
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.dataset.builder import DatasetError, verify
from daemon.demo import storegen
from daemon.ingest.feedback import QUALITIES
from daemon.publish import converter, export, ollama, registry
from daemon.service import control, unit
from daemon.service.lifecycle import SOCKET_NAME, Service
from daemon.state import StateError
from daemon.train import doctor, runner

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2  # bad configuration or usage
EXIT_DATA = 3  # not enough data, unknown dataset version ...


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _load(args: argparse.Namespace) -> settings.Settings:
    try:
        s, _ = settings.load(args.config)
    except settings.ConfigError as exc:
        for line in exc.errors:
            print(f"{exc.source}: {line}", file=sys.stderr)
        raise CliError("", EXIT_CONFIG) from None
    log.configure(s.log.level, s.log.format, stream=sys.stderr)
    return s


# -- verbs ---------------------------------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else args.config
    try:
        _, used = settings.load(path)
    except settings.ConfigError as exc:
        for line in exc.errors:
            print(f"{exc.source}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{used or 'environment/defaults'}: OK")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    s = _load(args)
    data = settings.dump(s)
    data["effective"] = {"state_dir": str(s.state_dir()), "runtime_dir": str(s.runtime_dir())}
    if args.json:
        _print_json(data)
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return EXIT_OK


def cmd_feedback(args: argparse.Namespace) -> int:
    s = _load(args)
    thumbs = True if args.up else False if args.down else None
    try:
        path = api.give_feedback(s, args.conversation_id, thumbs_up=thumbs, quality=args.quality, note=args.note)
    except ValueError as exc:
        raise CliError(f"feedback not recorded: {exc}", EXIT_CONFIG) from None
    except OSError as exc:
        raise CliError(f"cannot write feedback under {s.store.root}: {exc.strerror or exc}") from None
    if args.json:
        _print_json({"conversation_id": args.conversation_id, "path": str(path)})
    else:
        print(f"recorded feedback for {args.conversation_id} in {path}")
    return EXIT_OK


def cmd_ingest(args: argparse.Namespace) -> int:
    s = _load(args)
    with api.open_state(s) as st:
        report = api.ingest(s, st)
    if args.json:
        _print_json(report.as_dict())
    else:
        r = report
        print(f"ingested {r.conversations} conversation record(s), {r.feedback_events} feedback event(s) from "
              f"{r.files_read} file(s); {r.rejected} rejected line(s), {r.deleted} deleted; {r.seconds:.3f}s")
    return EXIT_OK


def cmd_dataset_build(args: argparse.Namespace) -> int:
    s = _load(args)
    with api.open_state(s) as st:
        try:
            result = api.build_dataset(s, st)
        except DatasetError as exc:
            if args.json:
                _print_json({"created": False, "version": None, "path": None, "train_count": 0, "eval_count": 0,
                             "message": str(exc)})
            raise CliError(f"no dataset built: {exc}", EXIT_DATA) from None
    if args.json:
        _print_json(result.as_json())
    else:
        print(f"{result.message}: {result.path} ({result.train_count} train, {result.eval_count} eval)")
    return EXIT_OK


def cmd_dataset_list(args: argparse.Namespace) -> int:
    s = _load(args)
    with api.open_state(s) as st:
        rows = st.datasets.all()
    if args.json:
        _print_json([{"version": r.version, "created_at": r.created_at, "path": r.path, "train_count": r.train_count,
                      "eval_count": r.eval_count, "content_hash": r.content_hash} for r in rows])
        return EXIT_OK
    if not rows:
        print("no dataset versions yet (chatos-retrain dataset build)")
    for r in rows:
        print(f"v{r.version}  {r.created_at}  {r.train_count:>6} train  {r.eval_count:>5} eval  {r.path}")
    return EXIT_OK


def cmd_dataset_show(args: argparse.Namespace) -> int:
    s = _load(args)
    version = int(str(args.version).lstrip("v")) if str(args.version).lstrip("v").isdigit() else None
    if version is None:
        raise CliError(f"not a dataset version: {args.version!r} (expected N or vN)", EXIT_CONFIG)
    with api.open_state(s) as st:
        row = st.datasets.get(version)
    if row is None:
        raise CliError(f"no dataset v{version} (see: chatos-retrain dataset list)", EXIT_DATA)
    problems = verify(Path(row.path))
    man = dict(row.manifest)
    if args.json:
        man["path"] = row.path
        man["problems"] = problems
        _print_json(man)
        return EXIT_OK
    c = man["counts"]
    print(f"v{row.version}  created {row.created_at}\n  path: {row.path}")
    print(f"  train {c['train']}, eval {c['eval']}, duplicates removed {c['duplicates_removed']}")
    print(f"  by score: {c['by_score']}  by mode: {c['by_mode']}")
    print(f"  by model: {c['by_model']}")
    print(f"  PII scrubbed: {man['pii_scrubbed'] or 'none'}")
    print(f"  filters: {json.dumps(man['filters'])}")
    print(f"  content hash: {man['content_hash']}")
    print(f"  sources: {len(man['sources'])} file(s)")
    print("  files: OK" if not problems else "  PROBLEMS: " + "; ".join(problems))
    return EXIT_OK


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except OSError:
        return False


def _socket(s: settings.Settings) -> Path:
    return s.runtime_dir() / SOCKET_NAME


def cmd_status(args: argparse.Namespace) -> int:
    s = _load(args)
    try:
        live = control.request(_socket(s), {"cmd": "status"}, timeout=10.0)
    except control.ControlUnavailable:
        live = None
    if live is not None:
        if args.json:
            _print_json(live)
            return EXIT_OK
        svc, last = live["service"], live.get("last_cycle") or {}
        print(f"service:   running (pid {svc['pid']}, since {svc['started_at']}), watcher: {svc['watcher']}")
        print(f"phase:     {svc['status']}")
        if last:
            print(f"last cycle: {last['cycle_id']} -> {last['outcome']}: {last['reason']}")
        print(f"next window: {svc['next_window'] or ('always open' if not svc['windows'] else 'none')}")
        status = api.StoreStatus(**live["store"])
    else:
        with api.open_state(s) as st:
            status = api.store_status(s, st)
            last = cycle.summary if (cycle := st.cycles.last()) else None
        if args.json:
            _print_json({"service": None, "last_cycle": last, "store": status.as_json()})
            return EXIT_OK
        print("service:   not running (state only)")
    c = status.conversations
    print(f"store:     {status.store_root}" + ("" if _is_dir(Path(status.store_root)) else "  (missing or unreadable)"))
    print(f"state:     {status.state_dir}")
    print(f"files:     {status.files_tracked} tracked")
    print(f"conversations: {c['total']} total, {c['eligible']} eligible ({c['positive']} positive), "
          f"{c['deleted']} deleted, {c['unusable']} unusable, {c['rejected_lines']} rejected line(s)")
    print(f"feedback:  {status.feedback_events} event(s), {status.feedback_waiting} waiting for their conversation")
    latest = f"v{status.latest_dataset}" if status.latest_dataset else "none"
    print(f"dataset:   latest {latest}; {status.new_eligible_since_dataset} new eligible since")
    print(f"model:     latest {status.latest_model or 'none'}")
    for m in status.pending_registrations or []:
        print(f"pending:   {m['tag']} (attempt {m['attempts']}, next try {m['next_attempt_at']}): {m['last_error']}")
    print(f"as of:     last ingest {status.last_ingest_at or 'never'} (chatos-retrain ingest reads what is new)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """Run the service in the foreground (systemd's ExecStart)."""
    try:
        s, used = settings.load(args.config)
    except settings.ConfigError as exc:
        for line in exc.errors:
            print(f"{exc.source}: {line}", file=sys.stderr)
        return EXIT_CONFIG
    log.configure(s.log.level, s.log.format)
    svc = Service(used, initial=s)
    svc.install_signals()
    return svc.run()


def _print_progress(update: dict[str, Any]) -> None:
    if not update.get("heartbeat"):
        print(f"  {update.get('phase')}: {update.get('detail', '')}", file=sys.stderr)


def cmd_trigger(args: argparse.Namespace) -> int:
    """Run a cycle now (thresholds ignored, single flight kept): through the service, or here when none runs."""
    s = _load(args)
    try:
        result = control.request(
            _socket(s), {"cmd": "trigger", "wait": args.wait}, timeout=None if args.wait else 30.0,
            on_progress=_print_progress if (args.wait and not args.json) else None,
        )
    except control.ControlUnavailable:
        with api.open_state(s) as st:
            local = run_cycle(s, st, CycleRequest(None, forced=True, origins=["cli"]),
                              progress=None if args.json else lambda p, d: _print_progress({"phase": p, "detail": d}))
        result = {**local.as_json(), "ran": "in this process (no service running)"}
    except control.ControlError as exc:
        raise CliError(f"trigger refused: {exc}") from None
    if args.json:
        _print_json(result)
    elif "cycle_id" in result:
        print(f"{result['cycle_id']}: {result['outcome']}: {result['reason']}")
    else:
        print("cycle queued in the running service (use --wait to follow it)")
    return EXIT_ERROR if result.get("outcome") == "error" else EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    s = _load(args)
    try:
        result = control.request(_socket(s), {"cmd": "reload"}, timeout=60.0)
    except control.ControlUnavailable as exc:
        raise CliError(f"service not running: {exc}") from None
    except control.ControlError as exc:
        raise CliError(f"reload failed: {exc}") from None
    if args.json:
        _print_json(result)
    elif result.get("reloaded"):
        print("configuration reloaded")
    else:
        for line in result.get("errors", []):
            print(line, file=sys.stderr)
        raise CliError("new configuration rejected; the service keeps the old one", EXIT_CONFIG)
    return EXIT_OK


def cmd_jobs(args: argparse.Namespace) -> int:
    s = _load(args)
    with api.open_state(s) as st:
        rows = [j.as_dict() for j in st.jobs.recent(limit=args.limit)]
    if args.json:
        _print_json(rows)
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


def cmd_job_show(args: argparse.Namespace) -> int:
    s = _load(args)
    with api.open_state(s) as st:
        row = job.as_dict() if (job := st.jobs.get(args.job_id)) else None
    if row is None:
        raise CliError(f"no job {args.job_id} (see: chatos-retrain jobs)", EXIT_DATA)
    tail = runner.log_tail(Path(row["log_path"]), args.lines)
    if args.json:
        _print_json({**row, "log_tail": tail})
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


def cmd_cancel(args: argparse.Namespace) -> int:
    s = _load(args)
    try:
        res = control.request(_socket(s), {"cmd": "cancel", "job_id": args.job_id}, timeout=30.0)
        print(f"cancelling {res['cancelling']}")
        return EXIT_OK
    except control.ControlUnavailable:
        pass
    except control.ControlError as exc:
        raise CliError(str(exc), EXIT_DATA) from None
    with api.open_state(s) as st:
        running = [r.job_id for r in st.jobs.recent(status="running")]
        target = args.job_id or (running[0] if running else None)
        if target is None or not runner.cancel_detached(st, target):
            raise CliError(f"no running job{' ' + args.job_id if args.job_id else ''} to cancel", EXIT_DATA)
    print(f"cancelled {target}")
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    s = _load(args)
    checks = doctor.run(s)
    if args.json:
        _print_json([c.__dict__ | {"line": c.line()} for c in checks])
    else:
        for c in checks:
            print(c.line())
    return EXIT_OK if all(c.ok for c in checks) else EXIT_ERROR


def cmd_install_unit(args: argparse.Namespace) -> int:
    """Render the systemd unit for this install (this venv's entry point, this config) and install it."""
    s = _load(args)
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


def cmd_forget(args: argparse.Namespace) -> int:
    s = _load(args)
    with api.open_state(s) as st:
        api.ingest(s, st)
        out = api.forget(s, st, args.conversation_id)
    if args.json:
        _print_json(out)
        return EXIT_OK if out["known"] else EXIT_DATA
    if not out["known"]:
        raise CliError(f"unknown conversation {args.conversation_id} (nothing to forget)", EXIT_DATA)
    print(f"{args.conversation_id}: {'marked deleted' if out['newly_deleted'] else 'already deleted'}; "
          f"dataset: {out['rebuilt'].get('message')}")
    if out["datasets_with_it"]:
        print(f"it was in dataset version(s): {', '.join(f'v{v}' for v in out['datasets_with_it'])}")
    for m in out["models_trained_on_it"]:
        print(f"model {m['tag']} ({m['status']}) was trained on it: roll back or retrain to remove its influence")
    return EXIT_OK


def cmd_setup_export(args: argparse.Namespace) -> int:
    """Fetch the pinned llama.cpp converter (sha256-checked) into the cache, or validate export.llama_cpp_dir."""
    s = _load(args)
    try:
        paths = converter.setup_converter(Path(args.cache_dir) if args.cache_dir else converter.default_cache_dir(),
                                          llama_cpp_dir=s.export.llama_cpp_dir)
    except export.ExportError as exc:
        raise CliError(f"converter setup failed: {exc}") from None
    if args.json:
        _print_json(paths.describe())
    else:
        print(f"converter ready: {paths.root} ({paths.source}"
              + (f" llama-cpp-python {paths.version}, sha256 {str(paths.sha256)[:12]}…" if paths.version else "") + ")")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    s = _load(args)
    with api.open_state(s) as st:
        rows = registry.lineage(st)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    if not rows:
        print("no model versions yet")
    for m in rows:
        ev = m.get("eval") or {}
        loss = ev.get("candidate_eval_loss")
        print(f"v{m['version']:<3} {m['status']:<10} {m['tag']:<32} {'latest' if m['latest'] else '':<6} "
              f"job {m['job_id']}  dataset v{m['dataset_version']}  gguf {m['gguf_sha256'][7:19]}"
              + (f"  eval {loss:.4f}" if isinstance(loss, int | float) else "")
              + (f"  ({m['last_error']})" if m.get("last_error") and m["status"] != "registered" else ""))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    s = _load(args)
    to = None
    if args.to:
        digits = args.to.lstrip("v")
        if not digits.isdigit():
            raise CliError(f"not a model version: {args.to!r} (expected vN)", EXIT_CONFIG)
        to = int(digits)
    with api.open_state(s) as st:
        try:
            out = registry.rollback(s, st, to)
        except ValueError as exc:
            raise CliError(f"rollback refused: {exc}", EXIT_DATA) from None
        except ollama.OllamaError as exc:
            raise CliError(f"rollback failed, latest unchanged: {exc}") from None
    if args.json:
        _print_json(out)
    else:
        print(f"{out['tag']} -> v{out['latest']} (was v{out['previous']})")
    return EXIT_OK


def cmd_export_retry(args: argparse.Namespace) -> int:
    s = _load(args)
    with api.open_state(s) as st:
        done = registry.retry_pending(s, st, force=True)
    if args.json:
        _print_json(done)
    elif not done:
        print("nothing pending")
    for m in done if not args.json else []:
        print(f"v{m['version']}: {m['status']}" + (f" ({m['last_error']})" if m.get("last_error") else ""))
    return EXIT_OK if all(m["status"] == "registered" for m in done) else EXIT_ERROR


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default: a generated demo ChatOS store with its own config and state, a tiny local base model
    (real Qwen2 vocabulary, random weights) when the training stack is installed, and the service on it."""
    base = Path(args.dir).expanduser().absolute()
    store = base / "ChatOS-Memory"
    cfg = base / "retrain.yaml"
    if not store.exists():
        truth = storegen.generate_store(store, args.records, days=7, seed=42, feedback_fraction=0.5,
                                        assistant_words=(8, 40))
        print(f"generated a demo ChatOS store: {store} ({len(truth.conversations)} conversations, "
              f"{truth.feedback_events} feedback events)", file=sys.stderr)
    if not cfg.exists():
        model = _demo_model(base)
        # a tiny random model needs a large learning rate to learn anything in 20 steps
        (base / "job-overrides.yaml").write_text("training:\n  learning_rate: 0.01\n  eval_steps: null\n"
                                                 "lora:\n  r: 8\n", encoding="utf-8")
        cfg.write_text(demo_config(model), encoding="utf-8")
    args.config = cfg
    s = _load(args)
    if args.once:
        with api.open_state(s) as st:
            result = run_cycle(s, st, CycleRequest(None, forced=True, origins=["demo"]),
                               progress=lambda p, d: _print_progress({"phase": p, "detail": d}))
        print(f"{result.cycle_id}: {result.outcome}: {result.reason}")
        print(f"next: chatos-retrain --config {cfg} status")
        return EXIT_ERROR if result.outcome in ("error", "train_failed", "export_failed") else EXIT_OK
    print(f"running the service on {store} (config {cfg}); Ctrl-C stops it.\n"
          f"  in another terminal: chatos-retrain --config {cfg} status\n"
          f"                      chatos-retrain --config {cfg} trigger --wait", file=sys.stderr)
    log.configure(s.log.level, s.log.format)
    svc = Service(cfg, initial=s)
    svc.install_signals()
    return svc.run()


def _demo_model(base: Path) -> Path | None:
    """Build the demo's tiny base model with the trainer's interpreter (this one), or None without torch."""
    probe = proc.run_command([sys.executable, "-c", "import torch, transformers, trl, peft, gguf"], timeout=300)
    if probe.returncode != 0:
        print("training stack not installed (pip install torch==2.13.0 -e '.[train]'): the demo stops at datasets",
              file=sys.stderr)
        return None
    try:
        conv = converter.setup_converter(converter.default_cache_dir(), llama_cpp_dir=None)
    except export.ExportError as exc:
        print(f"no demo model: {exc}", file=sys.stderr)
        return None
    print("building a tiny local base model (real Qwen2 vocabulary, random weights)...", file=sys.stderr)
    out = proc.run_command([sys.executable, str(runner.TRAINER_SCRIPT.parent / "tinymodel.py"), str(base / "models"),
                              "--family", "qwen2", "--llama-cpp-dir", str(conv.root)], timeout=900)
    if out.returncode != 0:
        print(f"no demo model: {(out.stderr.strip().splitlines() or ['tinymodel failed'])[-1]}", file=sys.stderr)
        return None
    return Path(json.loads(out.stdout.strip().splitlines()[-1])["path"])


def demo_config(model: Path | None) -> str:
    text = (
        "# Demo configuration written by `chatos-retrain demo`; paths are relative to this file.\n"
        "store:\n  root: ChatOS-Memory\nstate:\n  dir: state\n"
        "watch:\n  settle_s: 2s\n"
        "policy:\n  min_new_examples: 10\n  min_total_examples: 20\n  cooldown: 0s\n  max_runs_per_day: 50\n"
        "training:\n  backend: transformers\n  max_steps: 20\n  timeout: 30m\n"
        "  env: {OMP_NUM_THREADS: '1'}\n"
    )
    if model is not None:
        text += f"  base_model: {model}\n  config_template: job-overrides.yaml\n"
        text += "gate:\n  tolerance: 0.05\nexport:\n  quantization: f16\n  smoke:\n    require_stop: false\n"
    return text


# -- parser ----------------------------------------------------------------------------------------------------


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chatos-retrain",
        description="Continuous LoRA retraining from a ChatOS conversation store.",
    )
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default: /etc/chatos-retrain/retrain.yaml, "
                             "then ~/.config/chatos-retrain/retrain.yaml, else built-in defaults)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p_cfg = sub.add_parser("config", help="check or show the configuration")
    cfg_sub = p_cfg.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = cfg_sub.add_parser("check", help="validate a config file; prints every error as At 'section.key': message")
    p.add_argument("file", nargs="?", help="file to check (default: --config or the search path)")
    p.set_defaults(func=cmd_config_check)
    p = cfg_sub.add_parser("show", help="print the effective configuration (YAML, or --json)")
    _json_flag(p)
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("feedback", help="record thumbs up/down or a quality rating for a conversation")
    p.add_argument("conversation_id")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--up", action="store_true", help="thumbs up (score 1)")
    g.add_argument("--down", action="store_true", help="thumbs down (score -1)")
    g.add_argument("--quality", choices=QUALITIES, help="a ChatOS quality rating")
    p.add_argument("--note", help="free-text feedback kept with the event")
    _json_flag(p)
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("ingest", help="read what is new in the ChatOS store into state")
    _json_flag(p)
    p.set_defaults(func=cmd_ingest)

    p_ds = sub.add_parser("dataset", help="build, list or show dataset versions")
    ds_sub = p_ds.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = ds_sub.add_parser("build", help="ingest, then write the next dataset version if the eligible set changed")
    _json_flag(p)
    p.set_defaults(func=cmd_dataset_build)
    p = ds_sub.add_parser("list", help="list dataset versions")
    _json_flag(p)
    p.set_defaults(func=cmd_dataset_list)
    p = ds_sub.add_parser("show", help="show one version's manifest and check its files")
    p.add_argument("version", help="N or vN")
    _json_flag(p)
    p.set_defaults(func=cmd_dataset_show)

    p = sub.add_parser("status", help="store, state and dataset counts")
    _json_flag(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("run", help="run the service in the foreground (what systemd starts)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("trigger", help="run a cycle now, ignoring thresholds (not single flight)")
    p.add_argument("--wait", action="store_true", help="wait for the cycle and show its progress")
    _json_flag(p)
    p.set_defaults(func=cmd_trigger)

    p = sub.add_parser("reload", help="ask the running service to reload its configuration")
    _json_flag(p)
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("jobs", help="list training jobs")
    p.add_argument("--limit", type=int, default=20)
    _json_flag(p)
    p.set_defaults(func=cmd_jobs)

    p_job = sub.add_parser("job", help="show one training job")
    job_sub = p_job.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = job_sub.add_parser("show", help="a job's row, metrics, result and the tail of its log")
    p.add_argument("job_id")
    p.add_argument("--lines", type=int, default=40, help="log lines to show")
    _json_flag(p)
    p.set_defaults(func=cmd_job_show)

    p = sub.add_parser("cancel", help="cancel the running training job (SIGTERM to its group, grace, SIGKILL)")
    p.add_argument("job_id", nargs="?", help="the job to cancel (default: the running one)")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("doctor", help="pre-flight checks for training: interpreter, imports, GPU, disk, template")
    _json_flag(p)
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("forget", help="delete a conversation for good, rebuild the dataset, list models that saw it")
    p.add_argument("conversation_id")
    _json_flag(p)
    p.set_defaults(func=cmd_forget)

    p_setup = sub.add_parser("setup", help="one-time setup steps")
    setup_sub = p_setup.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = setup_sub.add_parser("export", help="fetch the pinned llama.cpp GGUF converter (sha256-checked) into the cache")
    p.add_argument("--cache-dir", help="where to put it (default: $XDG_CACHE_HOME/chatos-retrain)")
    _json_flag(p)
    p.set_defaults(func=cmd_setup_export)

    p = sub.add_parser("models", help="model versions with their lineage (job, dataset, GGUF, Ollama tag)")
    _json_flag(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("rollback", help="move <model_name>:latest back (to the previous version, or --to vN)")
    p.add_argument("--to", help="the version to point latest at, e.g. v3")
    _json_flag(p)
    p.set_defaults(func=cmd_rollback)

    p_exp = sub.add_parser("export", help="retry pending Ollama registrations")
    exp_sub = p_exp.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = exp_sub.add_parser("retry", help="register every pending or failed-to-reach-Ollama version now")
    _json_flag(p)
    p.set_defaults(func=cmd_export_retry)

    p = sub.add_parser("install-unit", help="render and install the systemd unit for this install's paths")
    p.add_argument("--user", action="store_true", help="a systemd --user unit instead of a system unit")
    p.add_argument("--force", action="store_true", help="replace a different existing unit file")
    p.add_argument("--print", action="store_true", help="print the unit instead of installing it")
    p.set_defaults(func=cmd_install_unit)

    p = sub.add_parser("demo", help="generate a demo store with its own config and state, ingest it, build a dataset")
    p.add_argument("--dir", default=os.path.join(os.environ.get("XDG_DATA_HOME", "~/.local/share"),
                                                 "chatos-retrain", "demo"),
                   help="where the demo store, config and state live (default: %(default)s)")
    p.add_argument("--records", type=int, default=400, help="chat requests in a new demo store")
    p.add_argument("--once", action="store_true", help="run one cycle and exit instead of running the service")
    p.set_defaults(func=cmd_demo)
    _config_everywhere(parser)
    return parser


def _config_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--config`` is accepted after the verb too (``chatos-retrain run --config FILE``, as units write it)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("--config" in a.option_strings for a in sub._actions):
                    sub.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                                     help="config file (same as the global --config)")
                _config_everywhere(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CliError as exc:
        if str(exc):
            print(f"chatos-retrain: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except StateError as exc:  # the state database cannot be opened or written (disk full ...): one line
        print(f"chatos-retrain: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a dataset or job file on a full or read-only disk: one line, not a traceback
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        print(f"chatos-retrain: cannot write {exc.filename or 'a file'}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    except settings.ConfigError as exc:  # pragma: no cover - _load turns these into CliError
        print(f"chatos-retrain: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
