"""``chatos-retrain report``: gather the report's values from state, draw and write the page, print its path.

matplotlib (the ``report`` extra) is imported here only when the verb runs, never by the service."""

from __future__ import annotations

import argparse
import sys
import webbrowser
from pathlib import Path

from daemon import api
from daemon.cli.common import EXIT_CONFIG, EXIT_OK, CliError, load, print_json
from daemon.report import data

REPORT_DIR = "report"  # under the state dir, unless --out


def report(args: argparse.Namespace) -> int:
    s = load(args)
    with api.open_state(s) as st:
        values = data.gather(s, st)
    try:
        from daemon.report import page
    except ImportError as exc:
        raise CliError(f"the report needs matplotlib ({exc}): pip install 'chatos-retrain[report]'",
                       EXIT_CONFIG) from None
    out_dir = Path(args.out).expanduser().absolute() if args.out else s.state_dir() / REPORT_DIR
    text = page.render(values)
    try:
        path = page.write(out_dir, text)
    except OSError as exc:
        raise CliError(f"cannot write the report into {out_dir}: {exc.strerror or exc}") from None
    if args.json:
        print_json({"path": str(path), "plots": page.plot_count(text), "report": values.as_json()})
    else:
        print(path)
    if args.open and not webbrowser.open(path.as_uri()):
        print(f"no browser found to open it: open {path.as_uri()} yourself", file=sys.stderr)
    return EXIT_OK
