"""``chatos-retrain``: a thin adapter over the Python API (:mod:`daemon.api`, :mod:`daemon.demo.run`, the stages).

The verbs are one table (:data:`VERBS`): a name (two words for a sub-verb), its help, its arguments and its handler.
The parser is built from it; every verb has ``--help`` and takes ``--config`` before or after it. Expected errors
are one line on stderr and a named exit code (0 ok, 1 error, 2 bad configuration or usage, 3 not enough data or
unknown id), never a traceback. ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon import log, settings
from daemon.cli import data_verbs as data
from daemon.cli import model_verbs as models
from daemon.cli import service_verbs as service
from daemon.cli.common import EXIT_CONFIG, EXIT_ERROR, CliError
from daemon.cli.demo_verb import demo
from daemon.cli.metrics_verb import metrics
from daemon.cli.notify_verb import notify_test
from daemon.cli.report_verb import report
from daemon.ingest.feedback import QUALITIES
from daemon.state import StateError

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Arg:
    """One argument: ``add_argument(*flags, **options)``; ``group`` names a mutually exclusive group, required
    unless its name starts with ``?``."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    group: str | None = None


def arg(*flags: str, group: str | None = None, **options: Any) -> Arg:
    return Arg(flags, options, group)


JSON = arg("--json", action="store_true", help="print one JSON object instead of text")
DEMO_DIR = os.path.join(os.environ.get("XDG_DATA_HOME", "~/.local/share"), "chatos-retrain", "demo")


@dataclass(frozen=True)
class Verb:
    name: str  # "status", or "dataset build" for a sub-verb
    help: str
    handler: Handler
    args: tuple[Arg, ...] = ()


# Groups of sub-verbs: their own help line.
GROUPS = {
    "config": "check or show the configuration",
    "dataset": "build, list or show dataset versions",
    "job": "show one training job",
    "setup": "one-time setup steps",
    "export": "retry pending Ollama registrations",
    "notify": "check the notifiers",
}

VERBS: tuple[Verb, ...] = (
    Verb("config check", "validate a config file; prints every error as At 'section.key': message", data.config_check,
         (arg("file", nargs="?", help="file to check (default: --config or the search path)"),)),
    Verb("config show", "print the effective configuration (YAML, or --json)", data.config_show, (JSON,)),
    Verb("feedback", "record thumbs up/down or a quality rating for a conversation", data.feedback, (
        arg("conversation_id"),
        arg("--up", group="vote", action="store_true", help="thumbs up (score 1)"),
        arg("--down", group="vote", action="store_true", help="thumbs down (score -1)"),
        arg("--quality", group="vote", choices=QUALITIES, help="a ChatOS quality rating"),
        arg("--note", help="free-text feedback kept with the event"),
        arg("--better", group="?correction", metavar="TEXT",
            help="with --down: the answer that should have been given (a preference pair for training)"),
        arg("--better-file", group="?correction", metavar="PATH", help="--better, read from a UTF-8 file"), JSON)),
    Verb("ingest", "read what is new in the ChatOS store into state", data.ingest, (JSON,)),
    Verb("dataset build", "ingest, then write the next dataset version if the eligible set changed",
         data.dataset_build, (JSON,)),
    Verb("dataset list", "list dataset versions", data.dataset_list, (JSON,)),
    Verb("dataset show", "show one version's manifest and check its files", data.dataset_show,
         (arg("version", help="N or vN"), JSON)),
    Verb("status", "live state from the running service, else state only: phase, last cycle and why, store counts, "
         "disk", service.status, (JSON,)),
    Verb("metrics", "the Prometheus metrics (text exposition format) from state: cycles by outcome, last promotion, "
         "model version, jobs, examples, feedback, pending registrations, disk", metrics, (
        arg("--out", metavar="FILE", help="write FILE atomically (mode 0644) instead of printing, e.g. into "
            "node_exporter's textfile collector folder"), JSON)),
    Verb("report", "one self-contained HTML page with plots: the gate's checks per version, loss curves, tokens/s "
         "and wall time, examples and feedback per day, dataset versions, latest and its rollbacks (needs the "
         "report extra: matplotlib)", report, (
        arg("--out", metavar="DIR", help="write DIR/index.html (default: <state dir>/report)"),
        arg("--open", action="store_true", help="open the page in a web browser when one is found"), JSON)),
    Verb("run", "run the service in the foreground (what systemd starts)", service.run),
    Verb("trigger", "run a cycle now, ignoring thresholds; single flight: during a running cycle it folds into "
         "exactly one follow-up; without a service it runs here", service.trigger,
         (arg("--wait", action="store_true", help="wait for the cycle and show its progress"), JSON)),
    Verb("reload", "ask the running service to reload its configuration", service.reload, (JSON,)),
    Verb("jobs", "list training jobs", service.jobs, (arg("--limit", type=int, default=20), JSON)),
    Verb("job show", "a job's row, metrics, result and the tail of its log", service.job_show, (
        arg("job_id"), arg("--lines", type=int, default=40, help="log lines to show"), JSON)),
    Verb("cancel", "cancel the running training job (SIGTERM to its group, grace, SIGKILL)", service.cancel,
         (arg("job_id", nargs="?", help="the job to cancel (default: the running one)"),)),
    Verb("doctor", "pre-flight checks for training: interpreter, imports, GPU, disk, template", service.doctor,
         (JSON,)),
    Verb("forget", "delete a conversation for good, rebuild the dataset, list models that saw it", data.forget,
         (arg("conversation_id"), JSON)),
    Verb("setup export", "fetch the pinned llama.cpp GGUF converter (sha256-checked) into the cache",
         models.setup_export, (arg("--cache-dir", help="where to put it (default: export.cache_dir, else the "
                                                       "service's cache: $CACHE_DIRECTORY or ~/.cache/chatos-retrain)"),
                               JSON)),
    Verb("models", "model versions with their lineage (job, dataset, GGUF, Ollama tag)", models.models, (JSON,)),
    Verb("rollback", "move <model_name>:latest back (to the previous version, or --to vN) once its GGUF loads in "
         "llama.cpp again", models.rollback,
         (arg("--to", help="the version to point latest at, e.g. v3"),
          arg("--force", action="store_true", help="also to a version that learned chats since deleted or un-voted, "
              "or whose GGUF no longer passes llama.cpp's load check"),
          JSON)),
    Verb("export retry", "register every pending or failed-to-reach-Ollama version now", models.export_retry,
         (JSON,)),
    Verb("notify test", "send a test event to every configured notifier (webhook, desktop, command) and show each "
         "result; exit 1 when one fails", notify_test, (JSON,)),
    Verb("install-unit", "render and install the systemd unit for this install's paths", service.install_unit, (
        arg("--user", action="store_true", help="a systemd --user unit instead of a system unit"),
        arg("--force", action="store_true", help="replace a different existing unit file"),
        arg("--print", action="store_true", help="print the unit instead of installing it"))),
    Verb("demo", "the embedded default: a generated demo store with its own config and state, a tiny local model, "
         "then the service (or one cycle)", demo, (
        arg("--dir", default=DEMO_DIR, help="where the demo store, config and state live (default: %(default)s)"),
        arg("--records", type=int, default=400, help="chat requests in a new demo store"),
        arg("--once", action="store_true", help="run one cycle and exit instead of running the service"))),
)


def _add_args(p: argparse.ArgumentParser, args: Sequence[Arg]) -> None:
    groups: dict[str, Any] = {}
    for a in args:
        target: Any = p
        if a.group is not None:
            if a.group not in groups:
                groups[a.group] = p.add_mutually_exclusive_group(required=not a.group.startswith("?"))
            target = groups[a.group]
        target.add_argument(*a.flags, **a.options)
    _add_common(p)


VERBOSE_HELP = "also print the log records of info level (a verb prints only warnings and errors by default)"


def _add_common(p: argparse.ArgumentParser) -> None:
    """What every verb takes after its name too: ``--config`` and ``-v``."""
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file (same as the global --config)")
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)


def make_parser() -> argparse.ArgumentParser:
    """The parser, built from :data:`VERBS`."""
    parser = argparse.ArgumentParser(prog="chatos-retrain",
                                     description="Continuous LoRA retraining from a ChatOS conversation store.")
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default: /etc/chatos-retrain/retrain.yaml, "
                             "then ~/.config/chatos-retrain/retrain.yaml, else built-in defaults)")
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help=VERBOSE_HELP)
    top = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    nested: dict[str, Any] = {}
    for verb in VERBS:
        head, _, tail = verb.name.partition(" ")
        if tail:
            if head not in nested:
                group = top.add_parser(head, help=GROUPS[head], description=GROUPS[head])
                _add_common(group)
                nested[head] = group.add_subparsers(dest="action", metavar="ACTION", required=True)
            p = nested[head].add_parser(tail, help=verb.help, description=verb.help)
        else:
            p = top.add_parser(head, help=verb.help, description=verb.help)
        _add_args(p, verb.args)
        p.set_defaults(func=verb.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    func: Handler = args.func
    # Until a verb loads its settings (the demo prepares its folder first): records to stderr, warnings unless -v.
    log.configure("info" if args.verbose else "warning", "auto", stream=sys.stderr)
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
    except settings.ConfigError as exc:  # pragma: no cover - load() turns these into CliError
        print(f"chatos-retrain: {exc}", file=sys.stderr)
        return EXIT_CONFIG


__all__ = ["VERBS", "Verb", "main", "make_parser"]
