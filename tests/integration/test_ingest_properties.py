"""Property tests on the cursor: any split of appended bytes is ingested exactly once."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from helpers import fb, rec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.ingest.ingestor import Ingestor
from daemon.state import State


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 12), cuts=st.lists(st.integers(0, 10_000), max_size=15), data=st.data())
def test_random_chunks_are_ingested_exactly_once(n: int, cuts: list[int], data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        (root / "logs").mkdir(parents=True)
        (root / "feedback").mkdir()
        logs = b"".join((json.dumps(rec(f"{i:012x}", answer="é" * (i % 3) + "a")) + "\n").encode() for i in range(n))
        fbs = b"".join((json.dumps(fb(f"{i:012x}", i % 2 == 0)) + "\n").encode() for i in range(n))
        state = State(Path(tmp) / "state")
        ing = Ingestor(state, root)
        for name, blob in (("logs/conversations_2026-01-01.jsonl", logs), ("feedback/feedback_2026-01-01.jsonl", fbs)):
            points = sorted({c % (len(blob) + 1) for c in cuts} | {0, len(blob)})
            target = root / name
            target.touch()
            for a, b in zip(points, points[1:], strict=False):
                with target.open("ab") as f:
                    f.write(blob[a:b])
                if data.draw(st.booleans()):
                    ing = Ingestor(state, root)  # a restart between appends
                ing.scan()
        ing.scan()
        assert state.conn.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == n
        assert state.conn.execute("SELECT COUNT(*) FROM sightings").fetchone()[0] == n
        assert state.conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == n
        assert state.conn.execute("SELECT COUNT(*) FROM rejects").fetchone()[0] == 0
        assert state.conn.execute("SELECT COUNT(*) FROM labels WHERE score = 1").fetchone()[0] == (n + 1) // 2
        state.close()
