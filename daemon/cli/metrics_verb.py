"""``chatos-retrain metrics``: the Prometheus metrics from state, on stdout, as JSON, or written to a textfile."""

from __future__ import annotations

import argparse
from pathlib import Path

from daemon import api
from daemon.cli.common import EXIT_ERROR, EXIT_OK, CliError, load, print_json
from daemon.cycle import metrics as prom


def metrics(args: argparse.Namespace) -> int:
    """The exposition on stdout; ``--out FILE`` replaces FILE atomically (0644); ``--json`` prints the snapshot."""
    s = load(args)
    with api.open_state(s) as st:
        snap = prom.gather(s, st)
    if args.json:
        print_json(snap.as_json())
        return EXIT_OK
    text = prom.render(snap)
    if args.out is None:
        print(text, end="")
        return EXIT_OK
    out = Path(args.out).expanduser().absolute()
    try:
        prom.write_textfile(out, text)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}", EXIT_ERROR) from None
    return EXIT_OK
