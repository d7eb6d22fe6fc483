"""The harness's pure parts (no container needed, so not marked ``system``): mirror, release, journal, pid 1."""

from __future__ import annotations

import json

import container as ct
import pytest

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_mirror_from_deb822_sources() -> None:
    assert ct.configured_mirror({"debian.sources": DEB822}, "bookworm") == "http://deb.debian.org/debian"
    assert ct.configured_mirror({"debian.sources": DEB822}, "trixie") is None


def test_mirror_skips_disabled_stanzas_and_deb_src() -> None:
    text = ("Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n\n"
            "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
            "Types: deb\nURIs: http://on.example/debian\nSuites: bookworm\n")
    assert ct.configured_mirror({"x.sources": text}, "bookworm") == "http://on.example/debian"


def test_mirror_from_one_line_sources_list() -> None:
    text = ("# deb http://commented.example/debian bookworm main\n"
            "deb-src http://src.example/debian bookworm main\n"
            "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main contrib\n")
    assert ct.configured_mirror({"sources.list": text}, "bookworm") == "http://mirror.example/debian"


def test_os_codename() -> None:
    assert ct.os_codename('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\n') == "bookworm"
    assert ct.os_codename("ID=debian\n") is None


def test_parse_journal_reads_our_json_lines_and_byte_arrays() -> None:
    ours = {"event": "cycle.summary", "cycle_id": "c1", "level": "info", "timestamp": "t"}
    lines = [
        json.dumps({"MESSAGE": json.dumps(ours), "__CURSOR": "a"}),
        json.dumps({"MESSAGE": list(b"plain \xff text"), "__CURSOR": "b"}),
        json.dumps({"MESSAGE": "{not json", "__CURSOR": "c"}),
        "",
    ]
    entries = ct.parse_journal("\n".join(lines))
    assert [e["msg"] for e in entries] == [ours, None, None]
    assert entries[1]["MESSAGE"] == "plain \ufffd text"


@pytest.mark.parametrize(("status", "init"), [
    ("Name:\tsystemd\nNSpid:\t4242\t1\n", True),
    ("Name:\tbash\nNSpid:\t4243\t57\n", False),
    ("Name:\tinit\nNSpid:\t1\n", False),  # the host's own pid 1 is not a container's
])
def test_nspid_is_init(status: str, init: bool) -> None:
    assert ct.nspid_is_init(status) is init


def test_recipe_changes_with_dependencies() -> None:
    a = ct.recipe("bookworm", ["pyyaml>=6", "httpx"])
    assert a == ct.recipe("bookworm", ["httpx", "pyyaml>=6"])  # order does not matter
    assert a["deps"] != ct.recipe("bookworm", ["httpx"])["deps"] and a["base"] == ct.recipe("bookworm", [])["base"]
