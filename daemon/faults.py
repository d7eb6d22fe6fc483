"""Named crash points for the fault-injection harness (tests/faults/): off unless ``CHATOS_RETRAIN_FAULT`` is set.

``CHATOS_RETRAIN_FAULT=<point>`` makes the process die at that point the way ``kill -9`` would (``os._exit(137)``:
no cleanup, no flush, no rollback); ``<point>@<n>`` waits for the n-th time the point is reached; ``<point>:term``
sends the process a SIGTERM there instead (a clean stop requested at exactly that moment). The environment is read
once, at import; with the variable unset :func:`point` is a single comparison.
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("CHATOS_RETRAIN_FAULT", "")
_NAME, _, _ACTION = _SPEC.partition(":")
_NAME, _, _NTH = _NAME.partition("@")
_WANTED = int(_NTH) if _NTH.isdigit() else 1
_hits = 0


def point(name: str) -> None:
    """A place where a crash must be survivable; dies here when the harness asked for it."""
    global _hits
    if not _NAME or name != _NAME:
        return
    _hits += 1
    if _hits != _WANTED:
        return
    os.write(2, f"chatos-retrain: fault point {name} reached ({_ACTION or 'exit'})\n".encode())
    if _ACTION == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    os._exit(137)
