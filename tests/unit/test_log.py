"""The journal side of the logging chain: priorities, fields and the native protocol, against a real datagram
socket standing where journald's would (the real journald is exercised in tests/system)."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon import log


def parse_datagram(data: bytes) -> dict[str, str]:
    """The inverse of the native protocol, written from its description (systemd's journal-native docs)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            out[key.decode()] = value.decode()
            pos = nl + 1
        else:
            (size,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 9
            out[line.decode()] = data[start:start + size].decode()
            assert data[start + size:start + size + 1] == b"\n"
            pos = start + size + 1
    return out


@pytest.mark.parametrize(("level", "prio"), [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                                             (logging.ERROR, 3), (logging.CRITICAL, 2)])
def test_levels_map_to_syslog_priorities(level: int, prio: int) -> None:
    assert log.syslog_priority(level) == prio


def test_fields_carry_the_ids_of_the_line() -> None:
    line = json.dumps({"event": "job.spawn", "cycle_id": "c-1", "job_id": "j-2", "dataset_version": 3,
                       "counts": {"new": 1}, "level": "warning"})
    fields = log.journal_fields(line, logging.WARNING)
    assert fields == {"MESSAGE": line, "PRIORITY": "4", "SYSLOG_IDENTIFIER": "chatos-retrain",
                      "CHATOS_EVENT": "job.spawn", "CHATOS_CYCLE_ID": "c-1", "CHATOS_JOB_ID": "j-2",
                      "CHATOS_DATASET_VERSION": "3"}
    assert log.journal_fields("not json", logging.INFO) == {"MESSAGE": "not json", "PRIORITY": "6",
                                                            "SYSLOG_IDENTIFIER": "chatos-retrain"}


def test_the_datagram_round_trips_values_with_and_without_newlines() -> None:
    fields = {"MESSAGE": "two\nlines é", "PRIORITY": "3", "CHATOS_CYCLE_ID": "c-1"}
    data = log.journal_datagram(fields)
    assert data.startswith(b"MESSAGE\n") and b"PRIORITY=3\n" in data
    assert parse_datagram(data) == fields


def test_stream_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    with (tmp_path / "out").open("w") as f:
        st = os.fstat(f.fileno())
        assert log.stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not log.stream_is_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not log.stream_is_journal(f, {"JOURNAL_STREAM": "garbage"})
        assert not log.stream_is_journal(f, {})
    assert not log.stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """These tests reconfigure logging: put back what the session had."""
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)
    structlog.configure(**config)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def _journal_logger(path: str, stream: io.StringIO) -> logging.Handler:
    log.configure("info", "journal", stream=stream)
    root = logging.getLogger()
    handler = next(h for h in root.handlers if getattr(h, "_chatos_retrain", False))
    assert isinstance(handler, log.JournalHandler)
    handler.path = path
    return handler


def test_a_warning_reaches_the_journal_with_its_priority_and_cycle_id(journal: tuple[socket.socket, str]) -> None:
    sock, path = journal
    stream = io.StringIO()
    _journal_logger(path, stream)
    with structlog.contextvars.bound_contextvars(cycle_id="c-20261205-ab"):
        log.get("daemon.test").warning("training.backoff", failures=2, job_id="j-7")
    entry = parse_datagram(sock.recv(1 << 16))
    assert entry["PRIORITY"] == "4" and entry["CHATOS_CYCLE_ID"] == "c-20261205-ab"
    assert entry["CHATOS_JOB_ID"] == "j-7" and entry["CHATOS_EVENT"] == "training.backoff"
    message = json.loads(entry["MESSAGE"])
    assert message["event"] == "training.backoff" and message["failures"] == 2 and message["level"] == "warning"
    assert stream.getvalue() == ""  # nothing doubled on stdout


def test_without_a_journal_the_line_goes_to_the_stream_with_a_priority_prefix(tmp_path: Path) -> None:
    stream = io.StringIO()
    _journal_logger(str(tmp_path / "absent.sock"), stream)
    log.get("daemon.test").error("cycle.failed", reason="disk full")
    line = stream.getvalue()
    assert line.startswith("<3>{") and json.loads(line[3:])["reason"] == "disk full"
