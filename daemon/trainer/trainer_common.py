"""What the trainer's scripts share: exit codes, the expected-failure exceptions, SIGTERM, stderr lines, atomic JSON.

Imported as a sibling (``import trainer_common``) by ``train_qlora.py``, ``merge_export.py``, ``tinymodel.py`` and
their parts, under the trainer's interpreter: standard library only, nothing of the service. Each script puts its
own folder first on ``sys.path`` before importing its parts, so this module and the ``qlora_*`` / ``export_*`` parts
(names no installed distribution uses; a unit test checks) are always the files beside the script.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_TERMINATED = 128 + signal.SIGTERM


class Failure(Exception):
    """An expected failure: one line for the operator and the exit code that names it."""

    exit_code = EXIT_FAILED


class ConfigError(Failure):
    """The config (or the argument naming it) is unusable: exit 2."""

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, raw: Any = None) -> None:
        super().__init__(message)
        self.raw = raw  # the parsed YAML, if any: the trainer still reports into its metrics path when usable


class Terminated(BaseException):
    """SIGTERM arrived (timeout or cancel from the service); unwinds like KeyboardInterrupt."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


def catch_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated`, so ``finally`` blocks and the last report still run."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def sayer(name: str) -> Callable[[str], None]:
    """``say(msg)``: one ``[name] msg`` line on stderr, flushed (the runner tails it into the job's log)."""

    def say(msg: str) -> None:
        print(f"[{name}] {msg}", file=sys.stderr, flush=True)

    return say


def config_argument(argv: list[str] | None, description: str, help: str) -> str:
    """The one argument both scripts take, ``--config PATH`` (argparse exits 2 without it)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", required=True, help=help)
    return str(p.parse_args(argv).config)


def write_json_atomic(
    path: str | Path, obj: dict[str, Any], *, allow_nan: bool = False, default: Callable[[Any], Any] | None = None
) -> None:
    """tmp + fsync + rename: readers see no file or the whole file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=allow_nan, default=default)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def versions(names: Iterable[str]) -> dict[str, str | None]:
    """The installed version of each distribution, None when it is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def unparsable_sentencepiece(path: Path, *, has_json: bool) -> bool:
    """A ``tokenizer.model`` the GGUF converter would die on: sentencepiece rejects it (or, without sentencepiece, a
    ``tokenizer.json`` is there to convert from instead)."""
    if not path.is_file():
        return False
    try:
        import sentencepiece
    except ImportError:
        return has_json
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception:
        return True
    return False


def one_line(exc: BaseException) -> str:
    """The trainer's error text: type name and the whole message on one line (metrics' ``error``, up to 2000 chars)."""
    text = " ".join(str(exc).split())
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:2000]


def first_line(exc: BaseException | str) -> str:
    """The export's error text: the message's first line (or the type name), up to 400 chars."""
    text = str(exc).strip() or (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return text.splitlines()[0][:400] if text else "unknown error"


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError, or an allocator RuntimeError, possibly chained."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
            return True
        if isinstance(e, RuntimeError) and ("out of memory" in str(e).lower() or "can't allocate memory" in str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False
