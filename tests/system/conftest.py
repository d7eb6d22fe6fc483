"""Fixtures for the system tests: the cached rootfs, this tree as a wheel, and a booted container per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import container as ct  # the harness next to this file (pytest puts this folder on sys.path)
import pytest
from helpers import need


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """The cached Debian rootfs (built on first use; minutes once, then reused)."""
    reason = ct.impossible_reason()
    need(reason is None, str(reason))  # a failure under CI=true: .ci/system-setup.sh provides all of it
    return ct.ensure_rootfs()


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree, built once per session as a wheel."""
    need(ct.impossible_reason() is None, str(ct.impossible_reason()))
    return ct.build_project_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def box(rootfs: Path, project_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ct.Container]:
    """A freshly booted container with this tree installed in /opt/chatos-retrain/venv; powered off afterwards."""
    with ct.booted(rootfs, tmp_path_factory.mktemp("container")) as c:
        c.install_project(project_wheel)
        yield c
