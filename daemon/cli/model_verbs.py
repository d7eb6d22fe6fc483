"""Verbs over the exported models: setup export, models, rollback, export retry."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from daemon import api
from daemon.cli.common import EXIT_CONFIG, EXIT_DATA, EXIT_ERROR, EXIT_OK, CliError, load, print_json
from daemon.publish import converter, export, ollama, registry
from daemon.train import gate


def setup_export(args: argparse.Namespace) -> int:
    """Fetch the pinned llama.cpp converter (sha256-checked) into the cache, or validate export.llama_cpp_dir."""
    s = load(args)
    cache = Path(args.cache_dir) if args.cache_dir else converter.cache_dir_for(s.export.cache_dir)
    try:
        paths = converter.setup_converter(cache, llama_cpp_dir=s.export.llama_cpp_dir)
    except export.ExportError as exc:
        raise CliError(f"converter setup failed: {exc}") from None
    if args.json:
        print_json(paths.describe())
    else:
        print(f"converter ready: {paths.root} ({paths.source}"
              + (f" llama-cpp-python {paths.version}, sha256 {str(paths.sha256)[:12]}…" if paths.version else "") + ")")
    return EXIT_OK


def models(args: argparse.Namespace) -> int:
    s = load(args)
    with api.open_state(s) as st:
        rows = [_with_checks(m) for m in registry.lineage(st)]
    if args.json:
        print_json(rows)
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
        for line in gate.lines(m.get("eval")):
            print(f"     {line}")
    return EXIT_OK


def _with_checks(m: dict[str, Any]) -> dict[str, Any]:
    """A model version with the gate's checks that promoted it (each with the candidate's numbers beside those of
    the model it was compared with, ``versus``), lifted out of its ``eval`` numbers."""
    ev = m.get("eval") or {}
    return {**m, "checks": ev.get("checks") or [], "versus": ev.get("champion")}


def rollback(args: argparse.Namespace) -> int:
    s = load(args)
    to = None
    if args.to:
        digits = args.to.lstrip("v")
        if not digits.isdigit():
            raise CliError(f"not a model version: {args.to!r} (expected vN)", EXIT_CONFIG)
        to = int(digits)
    with api.open_state(s) as st:
        try:
            out = registry.rollback(s, st, to, force=args.force)
        except ValueError as exc:
            raise CliError(f"rollback refused: {exc}", EXIT_DATA) from None
        except ollama.OllamaError as exc:
            raise CliError(f"rollback failed, latest unchanged: {exc}") from None
    if args.json:
        print_json(out)
    else:
        print(f"{out['tag']} -> v{out['latest']} (was v{out['previous']}); GGUF check: {out['engine']}")
    return EXIT_OK


def export_retry(args: argparse.Namespace) -> int:
    s = load(args)
    with api.open_state(s) as st:
        done = registry.retry_pending(s, st, force=True)
    if args.json:
        print_json(done)
    elif not done:
        print("nothing pending")
    for m in done if not args.json else []:
        print(f"v{m['version']}: {m['status']}" + (f" ({m['last_error']})" if m.get("last_error") else ""))
    return EXIT_OK if all(m["status"] == "registered" for m in done) else EXIT_ERROR
