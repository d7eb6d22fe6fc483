"""Shared fixtures: a real temp ChatOS store, settings pointing at it, and a real state database."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ollama_standin import ollama_standin  # noqa: F401  (a fixture for every test)

from daemon import settings as settings_mod
from daemon.state import State


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's config, env overrides or systemd variables."""
    import os

    for key in list(os.environ):
        if key.startswith("CHATOS_RETRAIN_") or key in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "NOTIFY_SOCKET"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(settings_mod, "SEARCH_PATH", (tmp_path / "no-such-config.yaml",))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "ChatOS-Memory"
    for sub in ("logs", "training_data", "feedback"):
        (root / sub).mkdir(parents=True)
    return root


@pytest.fixture
def make_settings(tmp_path: Path, store: Path) -> Any:
    def make(**sections: dict[str, Any]) -> settings_mod.Settings:
        data: dict[str, Any] = {"store": {"root": str(store)}, "state": {"dir": str(tmp_path / "state")}}
        for k, v in sections.items():
            data.setdefault(k, {}).update(v)
        return settings_mod.Settings(**data)

    return make


FAKE_TRAINER = Path(__file__).resolve().parent / "fakes" / "fake_trainer.py"


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    """A fake trainer *interpreter* (tests/fakes/fake_trainer.py behind a shell wrapper) for ``training.python``."""
    p = tmp_path / "bin" / "fake-python"
    p.parent.mkdir()
    p.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_TRAINER}" "$@"\n')
    p.chmod(0o755)
    return p


@pytest.fixture
def base_model(tmp_path: Path) -> Path:
    """A folder that passes for a local base model (the fake trainer never loads it)."""
    d = tmp_path / "models" / "tiny"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    st = State(tmp_path / "state")
    yield st
    st.close()

