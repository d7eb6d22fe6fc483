"""Docs examples are executed: the ChatOS patch in docs/chatos-integration.md writes events we ingest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from helpers import logs_file, rec, write_lines

from daemon.ingest.ingestor import Ingestor
from daemon.state import State

DOC = Path(__file__).resolve().parents[2] / "docs" / "chatos-integration.md"


def test_chatos_patch_writes_events_the_service_accepts(store: Path, state: State) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)  # the function ChatOS is asked to add
    append = namespace["append_feedback_event"]
    write_lines(logs_file(store), [rec("a1b2c3d4e5f6"), rec("b1b2c3d4e5f6")])
    append("a1b2c3d4e5f6", thumbs_up=True, feedback="great", root=store)
    append("b1b2c3d4e5f6", quality="good", root=store)
    assert append("b1b2c3d4e5f6", root=store) is None  # nothing to say: nothing written
    report = Ingestor(state, store).scan()
    assert report.feedback_events == 2 and report.rejected == 0
    assert {e.cid for e in state.examples.eligible(["normal", "code"], 1, False)} == {"a1b2c3d4e5f6", "b1b2c3d4e5f6"}
