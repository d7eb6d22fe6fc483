"""Verbs over the store and the datasets: config, feedback, ingest, dataset build/list/show, forget."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from daemon import api, settings
from daemon.cli.common import EXIT_CONFIG, EXIT_DATA, EXIT_OK, CliError, config_errors, load, print_json
from daemon.dataset.builder import DatasetError, verify


def config_check(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else args.config
    try:
        _, used = settings.load(path)
    except settings.ConfigError as exc:
        config_errors(exc)
        return EXIT_CONFIG
    print(f"{used or 'environment/defaults'}: OK")
    return EXIT_OK


def config_show(args: argparse.Namespace) -> int:
    s = load(args)
    data = settings.dump(s)
    data["effective"] = {"state_dir": str(s.state_dir()), "runtime_dir": str(s.runtime_dir())}
    if args.json:
        print_json(data)
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return EXIT_OK


def feedback(args: argparse.Namespace) -> int:
    s = load(args)
    thumbs = True if args.up else False if args.down else None
    better = args.better
    try:
        if args.better_file is not None:
            better = Path(args.better_file).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"feedback not recorded: {args.better_file} is not UTF-8 (byte {exc.start})",
                       EXIT_CONFIG) from None
    except OSError as exc:
        raise CliError(f"feedback not recorded: cannot read {args.better_file}: {exc.strerror or exc}",
                       EXIT_CONFIG) from None
    try:
        path = api.give_feedback(s, args.conversation_id, thumbs_up=thumbs, quality=args.quality, note=args.note,
                                 better=better)
    except ValueError as exc:
        raise CliError(f"feedback not recorded: {exc}", EXIT_CONFIG) from None
    except OSError as exc:
        raise CliError(f"cannot write feedback under {s.store.root}: {exc.strerror or exc}") from None
    if args.json:
        print_json({"conversation_id": args.conversation_id, "path": str(path)})
    else:
        print(f"recorded feedback for {args.conversation_id} in {path}")
    return EXIT_OK


def ingest(args: argparse.Namespace) -> int:
    s = load(args)
    with api.open_state(s) as st:
        r = api.ingest(s, st)
    if args.json:
        print_json(r.as_dict())
    else:
        print(f"ingested {r.conversations} conversation record(s), {r.feedback_events} feedback event(s) from "
              f"{r.files_read} file(s); {r.rejected} rejected line(s), {r.deleted} deleted; {r.seconds:.3f}s")
    return EXIT_OK


def dataset_build(args: argparse.Namespace) -> int:
    s = load(args)
    with api.open_state(s) as st:
        try:
            result = api.build_dataset(s, st)
        except DatasetError as exc:
            if args.json:
                print_json({"created": False, "version": None, "path": None, "train_count": 0, "eval_count": 0,
                            "desirable": 0, "undesirable": 0, "pairs": 0, "message": str(exc)})
            raise CliError(f"no dataset built: {exc}", EXIT_DATA) from None
    if args.json:
        print_json(result.as_json())
    else:
        print(f"{result.message}: {result.path} ({result.train_count} train, {result.eval_count} eval)")
        print(f"preference examples: {result.desirable} desirable, {result.undesirable} undesirable, "
              f"{result.pairs} pairs (train + eval)")
    return EXIT_OK


def dataset_list(args: argparse.Namespace) -> int:
    s = load(args)
    with api.open_state(s) as st:
        rows = st.datasets.all()
    if args.json:
        print_json([{"version": r.version, "created_at": r.created_at, "path": r.path, "train_count": r.train_count,
                     "eval_count": r.eval_count, "content_hash": r.content_hash} for r in rows])
        return EXIT_OK
    if not rows:
        print("no dataset versions yet (chatos-retrain dataset build)")
    for r in rows:
        print(f"v{r.version}  {r.created_at}  {r.train_count:>6} train  {r.eval_count:>5} eval  {r.path}")
    return EXIT_OK


def dataset_show(args: argparse.Namespace) -> int:
    s = load(args)
    digits = str(args.version).lstrip("v")
    if not digits.isdigit():
        raise CliError(f"not a dataset version: {args.version!r} (expected N or vN)", EXIT_CONFIG)
    with api.open_state(s) as st:
        row = st.datasets.get(int(digits))
        pruned = digits in st.pruned.keys("dataset")
    if row is None:
        raise CliError(f"no dataset v{digits} (see: chatos-retrain dataset list)", EXIT_DATA)
    problems = ["its files were removed by disk retention (retention.keep_datasets)"] if pruned else verify(
        Path(row.path))
    man = dict(row.manifest)
    if args.json:
        print_json({**man, "path": row.path, "problems": problems})
        return EXIT_OK
    c = man["counts"]
    print(f"v{row.version}  created {row.created_at}\n  path: {row.path}")
    print(f"  train {c['train']}, eval {c['eval']}, duplicates removed {c['duplicates_removed']}")
    print(f"  by score: {c['by_score']}  by mode: {c['by_mode']}")
    print(f"  by model: {c['by_model']}")
    if "preference" in c:
        p = c["preference"]
        print(f"  preference: train {p['train']}, eval {p['eval']}; rejected {c.get('rejections_by_reason') or 'none'}")
    print(f"  PII scrubbed: {man['pii_scrubbed'] or 'none'}")
    print(f"  filters: {json.dumps(man['filters'])}")
    print(f"  content hash: {man['content_hash']}")
    print(f"  sources: {len(man['sources'])} file(s)")
    print("  files: OK" if not problems else "  PROBLEMS: " + "; ".join(problems))
    return EXIT_OK


def forget(args: argparse.Namespace) -> int:
    s = load(args)
    with api.open_state(s) as st:
        api.ingest(s, st)
        out = api.forget(s, st, args.conversation_id)
    if args.json:
        print_json(out)
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
