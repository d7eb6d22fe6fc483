"""Fixtures for real training end to end: tiny models with real vocabularies, the real trainer as a subprocess.

Needs the training stack in this interpreter and llama.cpp's vocab/template files in the cache, both set up by
``.ci/train-setup.sh``; the Unsloth tests also need ``.venv-unsloth``. Anything missing skips with the reason
(a failure under ``CI=true``: ``helpers.need``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import need
from ollama_standin import StandinServer
from trainjobs import LLAMA_CPP_DIR, TIMEOUT_S, TINYMODEL, Job, make_job, trainer_env, training_stack_missing


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen2 and Llama checkpoints (real vocab + real chat template), built once per session."""
    reason = training_stack_missing()
    need(reason is None, str(reason))
    need((LLAMA_CPP_DIR / "models" / "ggml-vocab-qwen2.gguf").is_file(),
         f"llama.cpp vocab files missing in {LLAMA_CPP_DIR}: run .ci/train-setup.sh")
    out = tmp_path_factory.mktemp("tiny-models")
    argv = [sys.executable, str(TINYMODEL), str(out), "--family", "qwen2", "--family", "llama",
            "--llama-cpp-dir", str(LLAMA_CPP_DIR)]  # fmt: skip
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=trainer_env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    built = {json.loads(line)["family"]: Path(json.loads(line)["path"]) for line in proc.stdout.splitlines()}
    assert set(built) == {"qwen2", "llama"}
    return built


@pytest.fixture
def job_factory(tmp_path: Path) -> Callable[..., Job]:
    def factory(name: str, model: Path | str, **kw: Any) -> Job:
        return make_job(tmp_path / name, model, **kw)

    return factory


@pytest.fixture
def ollama_standin(tmp_path: Path) -> Iterator[StandinServer]:
    """The Ollama stand-in for the e2e cycles, answering chats with its canned reply.

    The GGUFs these cycles export are real (the real merge and converter) but come from tiny models with random
    weights: in the llama.cpp engine their greedy answer is usually empty, which the registry's smoke chat rightly
    fails for a real model. Running a real GGUF in the engine (xllamacpp) is tested on its own
    (tests/e2e/test_export_cpu.py: the stand-in with use_llama=True, a crafted stop, the registration's smoke check);
    here the engine would only test the random weights (the export child's own engine check still runs).
    """
    srv = StandinServer(tmp_path / "ollama-standin", use_llama=False).start()
    try:
        yield srv
    finally:
        srv.stop()
