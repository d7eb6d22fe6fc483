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
    append("b1b2c3d4e5f6", thumbs_up=False, better="the answer I wanted", root=store)  # a correction (issue 12)
    assert Ingestor(state, store).scan().rejected == 0
    assert state.feedback.corrections() == {"b1b2c3d4e5f6": "the answer I wanted"}


README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_verb_table_lists_every_verb_and_no_other() -> None:
    from daemon.cli import VERBS

    text = README.read_text()
    table = text[text.index("| verb | what it does |"):text.index("Every verb has `--help`.")]
    first_cells = [line.split("|")[1] for line in table.splitlines()[2:] if line.startswith("| `")]
    listed = {m.group(1) for cell in first_cells for m in re.finditer(r"`([a-z][a-z-]*(?: [a-z]+)?)", cell)}
    listed = {name if name.split(" ")[0] in {v.name.split(" ")[0] for v in VERBS if " " in v.name} else
              name.split(" ")[0] for name in listed}
    assert listed == {v.name for v in VERBS}


def test_every_verb_has_help(capsys: Any) -> None:
    import pytest

    from daemon import cli

    for verb in cli.VERBS:
        with pytest.raises(SystemExit) as done:
            cli.main([*verb.name.split(" "), "--help"])
        assert done.value.code == 0
        assert verb.help.split(";")[0][:30] in " ".join(capsys.readouterr().out.split()), verb.name
