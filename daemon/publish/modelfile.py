"""An Ollama ``Modelfile`` beside each exported GGUF (pure but for :func:`write_beside`), for operators whose Ollama
runs on another host: copy the export folder there and run ``ollama create NAME -f Modelfile`` in it.

What it says comes from the same :class:`~daemon.publish.ollama.ModelSpec` the HTTP registration sends in its
``/api/create`` body (``registry.model_spec``): ``FROM ./<gguf>``, the Go ``TEMPLATE``, one ``PARAMETER stop`` per
stop string, one ``PARAMETER`` per configured option, and ``SYSTEM`` when one is configured.

Quoting follows Ollama's parser (``parser/parser.go``), which has no escapes: a value is a bare word, ``"..."`` or
``\"\"\"...\"\"\"``, and it ends at the first line break where the text so far (trimmed) is a complete quoted string.
So a multi-line template may hold ``\"\"\"`` anywhere but at the end of a line (spaces aside): that would close
any quote. Each value is written in the first form that reads back exactly; one that no form carries (a line ending
in ``\"\"\"``, or a character the parser drops: control characters other than tab and line breaks, non-ASCII spaces)
is refused with a one-line ValueError.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon.publish.ollama import ModelSpec

FILENAME = "Modelfile"

_PARAMETER_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # what the parser's parameter-name state accepts
_TRIM = " \t\r\n"  # the whitespace Go's strings.TrimSpace removes among the characters a value may hold
_LINE_BREAKS = "\r\n"


def render(gguf_name: str, template: str, stop: Sequence[str], parameters: Mapping[str, Any],
           system: str | None, *, comment: str | None = None) -> str:
    """The Modelfile text: ``FROM ./gguf_name``, ``TEMPLATE``, ``PARAMETER stop`` per stop string (after the
    ``parameters``, whose own ``stop`` is ignored as in the create body), ``SYSTEM`` when set. ``comment`` (one
    line) goes first as a ``#`` line. ValueError (one line) for anything Ollama's parser would read differently."""
    if not gguf_name or "/" in gguf_name or "\\" in gguf_name or gguf_name in (".", ".."):
        raise ValueError(f"GGUF file name {gguf_name!r} must be a plain file name")
    lines: list[str] = []
    if comment is not None:
        if any(c in _LINE_BREAKS for c in comment) or not _printable(comment):
            raise ValueError("the Modelfile comment must be one printable line")
        lines.append(f"# {comment}")
    lines.append(from_line(gguf_name))
    lines.append(f"TEMPLATE {_quote('TEMPLATE', template, long=True)}")
    for name, value in parameters.items():
        if name == "stop":
            continue
        lines.extend(_parameter(name, v) for v in _values(name, value))
    lines.extend(_parameter("stop", s) for s in stop)
    if system is not None:
        lines.append(f"SYSTEM {_quote('SYSTEM', system, long=True)}")
    return "\n".join(lines) + "\n"


def render_spec(gguf_name: str, spec: ModelSpec, *, comment: str | None = None) -> str:
    """:func:`render` for a :class:`ModelSpec` (what the registration sends)."""
    return render(gguf_name, spec.template, spec.stop, spec.options, spec.system, comment=comment)


def from_line(gguf_name: str) -> str:
    """``FROM ./<gguf_name>``: relative, so the folder can be copied to another host as it is."""
    value = f"./{gguf_name}"
    if not _bare_ok(value):
        raise ValueError(f"GGUF file name {gguf_name!r} cannot be written bare in FROM")
    return f"FROM {value}"


def path_beside(gguf_path: str | Path) -> Path:
    """Where the Modelfile of ``gguf_path`` lives: ``Modelfile`` in the GGUF's folder."""
    return Path(gguf_path).parent / FILENAME


def names(text: str, gguf_name: str) -> bool:
    """True when a Modelfile's ``text`` is built from ``gguf_name`` (a folder's Modelfile names its newest GGUF)."""
    return from_line(gguf_name) in text.splitlines()


def describes(gguf_path: str | Path) -> Path | None:
    """The Modelfile beside ``gguf_path`` when there is one and it names that GGUF; else None."""
    path = path_beside(gguf_path)
    try:
        return path if names(path.read_text(encoding="utf-8"), Path(gguf_path).name) else None
    except (OSError, ValueError):  # none, unreadable, or a GGUF name no Modelfile could have named
        return None


def write_beside(gguf_path: str | Path, spec: ModelSpec, *, comment: str | None = None) -> Path:
    """Write the Modelfile beside ``gguf_path`` atomically (a temporary file renamed into place; left alone when it
    already says the same); its path. ValueError when the spec cannot be written (see :func:`render`), OSError from
    the file system."""
    gguf = Path(gguf_path)
    text = render_spec(gguf.name, spec, comment=comment)
    path = path_beside(gguf)
    try:
        if path.read_text(encoding="utf-8") == text:
            return path
    except (OSError, ValueError):
        pass
    tmp = path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# -- quoting (pure) ----------------------------------------------------------------------------------------------------


def _printable(text: str) -> bool:
    """Go's strconv.IsPrint for every character, tab and line breaks allowed: the parser drops the others."""
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _unquote(s: str) -> tuple[str, bool]:
    """parser.go's unquote of a trimmed value: (value, complete)."""
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def _reads_back(opener: str, value: str) -> bool:
    """True when ``opener + value + opener`` reads back as ``value``: it does not end at an earlier line break (where
    the text so far, trimmed, would already be complete) and unquotes to ``value`` at the end."""
    for i, c in enumerate(value):
        if c in _LINE_BREAKS and _unquote((opener + value[:i]).strip(_TRIM))[1]:
            return False
    return _unquote((opener + value + opener).strip(_TRIM)) == (value, True)


def _bare_ok(value: str) -> bool:
    return (bool(value) and not any(c in _LINE_BREAKS for c in value) and _printable(value)
            and _unquote(value.strip(_TRIM)) == (value, True))


def _quote(what: str, value: str, *, long: bool) -> str:
    """``value`` in the first form Ollama's parser reads back exactly: bare (short values only), then ``"..."``
    and ``\"\"\"...\"\"\"`` (tried first for ``long`` values: templates and system prompts)."""
    if not _printable(value):
        bad = next(c for c in value if not (c.isprintable() or c in "\t\r\n"))
        raise ValueError(f"{what} holds {bad!r}, which Ollama's Modelfile parser drops")
    if not long and _bare_ok(value):
        return value
    for opener in ('"""', '"') if long else ('"', '"""'):
        if _reads_back(opener, value):
            return f"{opener}{value}{opener}"
    raise ValueError(f"{what} cannot be quoted for a Modelfile: a line of it ends in \"\"\", which closes any quote "
                     "(Ollama's parser has no escapes)")


def _values(name: str, value: Any) -> list[str]:
    """A configured option as the parser's strings: one per list element (Ollama collects repeated lines)."""
    out: list[str] = []
    for v in value if isinstance(value, list | tuple) else [value]:
        if isinstance(v, bool):
            out.append("true" if v else "false")
        elif isinstance(v, float):
            out.append(repr(v))
        elif isinstance(v, int | str):
            out.append(str(v))
        else:
            raise ValueError(f"parameter {name!r}: a {type(v).__name__} cannot be a Modelfile PARAMETER")
    return out


def _parameter(name: str, value: str) -> str:
    if not _PARAMETER_NAME.match(name):
        raise ValueError(f"parameter name {name!r} is not letters, digits and _ (Ollama's Modelfile parser)")
    return f"PARAMETER {name} {_quote(f'PARAMETER {name}', value, long=False)}"
