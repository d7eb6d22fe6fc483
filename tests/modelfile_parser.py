"""A Python re-implementation of Ollama's Modelfile parser, standing in for the real one (Go, which cannot run here).

It follows ``parser/parser.go`` (``ParseFile``, ``parseRuneForState``, ``unquote``) rune by rune: a state machine over
nil / command name / value / parameter name / message role / comment; commands are case-insensitive; ``#`` starts a
comment at the start of a line; a value is bare, ``"..."`` or ``\"\"\"...\"\"\"`` and ends at the first line break
where the text so far, trimmed (Go's ``strings.TrimSpace``), is complete: there are **no escapes**, a quoted value is
whatever lies between its quotes. Runes that are not printable (Go's ``strconv.IsPrint``) are dropped, except the
tabs, spaces and line breaks a value keeps. Errors as there: an unknown command or a bad character in one
(:class:`ParserError` with its line), an invalid message role, a parameter without a value or an unterminated quote
at the end (:class:`UnexpectedEOF`), no ``FROM`` (:class:`MissingFrom`). The input may start with a UTF-8 or UTF-16
byte order mark (``unicode.BOMOverride``).

:func:`create_request` then does what ``Modelfile.CreateRequest`` does with the commands (without hashing files:
``from`` keeps ``FROM``'s argument): template, system, licenses, messages, and the parameters typed the way
``api.FormatParams`` types them (unknown names are an error, deprecated ones are skipped, ``stop`` lines collect).
"""

from __future__ import annotations

import codecs
import struct
import unicodedata
from dataclasses import dataclass
from typing import Any

COMMANDS = frozenset({"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
                      "message", "requires"})
ROLES = frozenset({"system", "user", "assistant"})
INVALID_COMMAND = ('command must be one of "from", "license", "template", "system", "adapter", "draft", "renderer", '
                   '"parser", "parameter", "message", or "requires"')
INVALID_ROLE = 'message role must be one of "system", "user", or "assistant"'

# api.Options (Runner + Options) by JSON name: the kind FormatParams converts a Modelfile string to.
OPTION_KINDS: dict[str, str] = {
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "int", "use_mmap": "bool",
    "num_thread": "int", "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float",
    "min_p": "float", "typical_p": "float", "repeat_last_n": "int", "temperature": "float",
    "repeat_penalty": "float", "presence_penalty": "float", "frequency_penalty": "float", "stop": "list",
}
DEPRECATED = frozenset({"penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "mirostat",
                        "mirostat_tau", "mirostat_eta"})

# Go's unicode.IsSpace (what strings.TrimSpace trims)
_GO_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {chr(c) for c in range(0x2000,
                                                                                                            0x200B)}

_NIL, _NAME, _VALUE, _PARAMETER, _MESSAGE, _COMMENT = range(6)


class ModelfileError(Exception):
    """What ParseFile returns as an error."""


class ParserError(ModelfileError):
    def __init__(self, line: int, msg: str) -> None:
        super().__init__(f"(line {line}): {msg}")
        self.line = line
        self.msg = msg


class UnexpectedEOF(ModelfileError):
    """io.ErrUnexpectedEOF: a parameter or message without a value, or a quote still open at the end."""


class MissingFrom(ModelfileError):
    def __init__(self) -> None:
        super().__init__("no FROM line")


@dataclass(frozen=True)
class Command:
    name: str  # "model" for FROM, the lower-cased command, or a parameter's own name
    args: str


def _is_space(c: str) -> bool:
    return c in " \t"


def _is_newline(c: str) -> bool:
    return c in "\r\n"


def _is_alpha(c: str) -> bool:
    return "a" <= c <= "z" or "A" <= c <= "Z"


def _is_print(c: str) -> bool:
    """Go's strconv.IsPrint: letters, marks, numbers, punctuation, symbols and the ASCII space."""
    return c == " " or unicodedata.category(c)[0] in "LMNPS"


def _trim(s: str) -> str:
    start, end = 0, len(s)
    while start < end and s[start] in _GO_SPACE:
        start += 1
    while end > start and s[end - 1] in _GO_SPACE:
        end -= 1
    return s[start:end]


def unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
    return s, True


def _decode(data: bytes) -> str:
    for bom, codec in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_BE, "utf-16-be"),
                       (codecs.BOM_UTF16_LE, "utf-16-le")):
        if data.startswith(bom):
            return data[len(bom):].decode(codec, "replace")
    return data.decode("utf-8", "replace")


def _next_state(c: str, state: int) -> tuple[int, str]:
    """parseRuneForState: the next state and the rune to keep ("\\0" for none); raises as it returns errors."""
    if state == _NIL:
        if c == "#":
            return _COMMENT, "\0"
        if _is_space(c) or _is_newline(c):
            return _NIL, "\0"
        return _NAME, c
    if state == _NAME:
        if _is_alpha(c):
            return _NAME, c
        if _is_space(c):
            return _VALUE, "\0"
        raise _Invalid(INVALID_COMMAND)
    if state == _VALUE:
        return (_NIL, c) if _is_newline(c) or _is_space(c) else (_VALUE, c)
    if state == _PARAMETER:
        if _is_alpha(c) or "0" <= c <= "9" or c == "_":
            return _PARAMETER, c
        if _is_space(c):
            return _VALUE, "\0"
        raise _Eof()
    if state == _MESSAGE:
        if _is_alpha(c):
            return _MESSAGE, c
        if _is_space(c):
            return _VALUE, "\0"
        raise _Eof()
    return (_NIL, "\0") if _is_newline(c) else (_COMMENT, "\0")  # comment


class _Invalid(Exception):
    pass


class _Eof(Exception):
    pass


def parse(source: str | bytes) -> list[Command]:
    """ParseFile: the commands in order; a :class:`ModelfileError` where Ollama's parser fails."""
    text = _decode(source) if isinstance(source, bytes) else source
    commands: list[Command] = []
    name, role, buf, state, line = "", "", "", _NIL, 1
    for c in text:
        if _is_newline(c):
            line += 1
        try:
            nxt, r = _next_state(c, state)
        except _Eof:
            raise UnexpectedEOF(f"unexpected EOF: {buf}") from None
        except _Invalid as exc:
            raise ParserError(line, str(exc)) from None
        if nxt != state:
            if state == _NAME:
                word = buf.lower()
                if word not in COMMANDS:
                    raise ParserError(line, INVALID_COMMAND)
                if word == "from":
                    name = "model"
                elif word == "parameter":
                    nxt = _PARAMETER
                else:
                    name = word
                    if word == "message":
                        nxt = _MESSAGE
            elif state == _PARAMETER:
                name = buf
            elif state == _MESSAGE:
                if buf not in ROLES:
                    raise ParserError(line, INVALID_ROLE)
                role = buf
            elif state == _VALUE:
                value, ok = unquote(_trim(buf))
                if not ok or _is_space(r):
                    buf += r
                    continue
                if role:
                    value, role = f"{role}: {value}", ""
                commands.append(Command(name, value))
            buf, state = "", nxt
        if _is_print(r):
            buf += r
    if state == _VALUE:
        value, ok = unquote(_trim(buf))
        if not ok:
            raise UnexpectedEOF("unexpected EOF")
        commands.append(Command(name, f"{role}: {value}" if role else value))
    elif state not in (_NIL, _COMMENT):
        raise UnexpectedEOF("unexpected EOF")
    if not any(cmd.name == "model" for cmd in commands):
        raise MissingFrom()
    return commands


def _float32(s: str) -> float:
    value = float(s)  # strconv.ParseFloat(s, 32), kept as float32
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def _parse_bool(s: str) -> bool:
    if s in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if s in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ModelfileError(f"invalid bool value [{s}]")


def format_params(name: str, value: str) -> Any:
    """api.FormatParams for one PARAMETER line."""
    kind = OPTION_KINDS.get(name)
    if kind is None:
        raise ModelfileError(f"unknown parameter '{name}'")
    try:
        if kind == "float":
            return _float32(value)
        if kind == "int":
            return int(value, 10)
        if kind == "bool":
            return _parse_bool(value)
    except ValueError:
        raise ModelfileError(f"invalid {kind} value [{value}]") from None
    return [value]


def create_request(commands: list[Command]) -> dict[str, Any]:
    """Modelfile.CreateRequest's fields from the commands (``from``: FROM's argument, not hashed files)."""
    req: dict[str, Any] = {}
    params: dict[str, Any] = {}
    licenses: list[str] = []
    messages: list[dict[str, str]] = []
    for cmd in commands:
        if cmd.name == "model":
            req["from"] = cmd.args
        elif cmd.name in ("template", "system", "adapter", "draft", "renderer", "parser", "requires"):
            req[cmd.name] = cmd.args
        elif cmd.name == "license":
            licenses.append(cmd.args)
        elif cmd.name == "message":
            role, _, content = cmd.args.partition(": ")
            messages.append({"role": role, "content": content})
        elif cmd.name not in DEPRECATED:
            value = format_params(cmd.name, cmd.args)
            if isinstance(params.get(cmd.name), list):
                params[cmd.name] = params[cmd.name] + value
            else:
                params[cmd.name] = value
    if params:
        req["parameters"] = params
    if licenses:
        req["license"] = licenses
    if messages:
        req["messages"] = messages
    return req


def float32(value: float) -> float:
    """``value`` as Ollama keeps a float option (float32), to compare a create body's number with a parsed one."""
    return _float32(repr(float(value)))
