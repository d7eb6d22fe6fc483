"""``notify test``: a test event to every configured notifier, each one's result."""

from __future__ import annotations

import argparse

from daemon import notify
from daemon.cli.common import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, CliError, load, print_json


def notify_test(args: argparse.Namespace) -> int:
    s = load(args)
    if not notify.build(s):
        raise CliError("no notifier configured (notify.webhook.url, notify.desktop.enabled, notify.command.argv)",
                       EXIT_CONFIG)
    results = notify.send_test(s)
    if args.json:
        print_json({"ok": all(r["ok"] for r in results), "notifiers": results})
    else:
        for r in results:
            print(f"{r['notifier']:<8} {'ok' if r['ok'] else 'FAILED':<6} {r['detail']}")
    return EXIT_OK if all(r["ok"] for r in results) else EXIT_ERROR
