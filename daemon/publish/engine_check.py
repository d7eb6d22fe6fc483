"""Re-run llama.cpp's load check on a GGUF already exported (``rollback``: a version is served again only when its
file still loads). The same grandchild the export runs (``daemon/trainer/export_engine.py --spec FILE``), in the
trainer's interpreter (it has ``xllamacpp``; the service never loads a model), through ``daemon.proc``."""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import proc
from daemon.publish.export import EngineCheck
from daemon.settings import Settings
from daemon.train import templates

ENGINE_SCRIPT = Path(__file__).resolve().parent.parent / "trainer" / "export_engine.py"
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class LoadCheck:
    ok: bool
    reason: str  # one line: what llama.cpp said, or how long the load took
    facts: dict[str, Any]


def _why(code: int, stderr: str) -> str:
    """llama.cpp's own reason (its ``error loading model:`` line), else the last line the grandchild printed."""
    found = re.findall(r"error loading model: (.+)", stderr)
    if found:
        return str(found[-1]).strip()
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit {code}"


def check(settings: Settings, gguf: Path, chat_template: str | None) -> LoadCheck:
    """Load ``gguf`` in llama.cpp and answer the smoke prompt (``export.engine.*``); never raises for the GGUF's
    faults (a missing file, a failed load, a crash, a timeout are a failed check with its reason)."""
    if not gguf.is_file():
        return LoadCheck(False, f"its GGUF {gguf} is gone from disk: nothing to check", {})
    section = EngineCheck.of(settings).section(templates.get(chat_template or settings.training.chat_template))
    with tempfile.TemporaryDirectory(prefix="engine-check-") as tmp:
        spec, answers = Path(tmp) / "spec.json", Path(tmp) / "answers.json"
        spec.write_text(json.dumps({**section, "enabled": True, "gguf": str(gguf), "answer_path": str(answers)}))
        try:
            out = proc.run_command([str(settings.training.python), str(ENGINE_SCRIPT), "--spec", str(spec)],
                                   timeout=TIMEOUT_S, env={**os.environ, **settings.training.env})
        except (OSError, proc.TimeoutExpired) as exc:
            return LoadCheck(False, f"llama.cpp's check did not run: {exc}", {})
        facts = json.loads(answers.read_text()) if answers.is_file() else {}
    if out.returncode == 0 and facts.get("loaded"):
        return LoadCheck(True, f"llama.cpp loaded it in {facts.get('load_s')} s", facts)
    what = "crashed loading" if out.returncode < 0 else "could not load"
    return LoadCheck(False, f"llama.cpp {what} it: {_why(out.returncode, out.stderr + out.stdout)}", facts)
