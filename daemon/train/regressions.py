"""The operator's regression prompts (pure): a YAML list of prompts with deterministic expectations, checked on the
exported GGUF's answers by the gate's ``regressions`` check.

The file (``gate.regressions_file``)::

    - id: arithmetic                     # unique, names the case in every failure
      prompt: "What is 2 + 2? Answer with the number only."   # or messages: [{role, content}, ...]
      max_tokens: 32                     # optional, 1..4096 (default 128)
      expect:                            # at least one of:
        contains: "4"                    # a string or a list: each must appear (case-sensitive)
        not_contains: ["5", "I cannot"]  # none may appear
        regex: "^\\s*4\\b"               # a pattern or a list (Python re.search; (?i) for any case)
        json: true                       # the whole answer parses as JSON
        max_words: 5                     # at most this many words
        must_stop: true                  # it ended on its own (a stop token), not at max_tokens

:func:`load` returns the cases or raises :class:`RegressionFileError` (one line naming the entry); :func:`evaluate`
takes the answers ``[{"id", "content", "finish_reason", "stopped"}]`` and returns one :class:`Failure` per failed
case (its id, what failed and an excerpt of what came back).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_MAX_TOKENS = 128
EXPECTATIONS = ("contains", "not_contains", "regex", "json", "max_words", "must_stop")
ROLES = ("system", "user", "assistant")
EXCERPT = 80


class RegressionFileError(ValueError):
    """The regressions file cannot be used: one line naming the file and the entry."""


@dataclass(frozen=True, slots=True)
class Case:
    id: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int = DEFAULT_MAX_TOKENS
    contains: tuple[str, ...] = ()
    not_contains: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    json: bool = False
    max_words: int | None = None
    must_stop: bool = False

    def request(self) -> dict[str, Any]:
        """What the engine runs: ``{"id", "messages", "max_tokens"}``."""
        return {"id": self.id, "messages": [dict(m) for m in self.messages], "max_tokens": self.max_tokens}


@dataclass(frozen=True, slots=True)
class Failure:
    id: str
    why: str
    got: str

    def line(self) -> str:
        return f"{self.id}: {self.why}; got {self.got!r}"

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "why": self.why, "got": self.got}


def excerpt(text: str, n: int = EXCERPT) -> str:
    """``text`` on one line, at most ``n`` characters (an ellipsis when cut)."""
    one = " ".join(text.split())
    return one if len(one) <= n else one[: n - 1] + "…"


def _strings(v: Any, what: str) -> tuple[str, ...]:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{what} must be a non-empty string or a list of them")
    return tuple(items)


def _messages(entry: dict[str, Any]) -> tuple[dict[str, str], ...]:
    if ("prompt" in entry) == ("messages" in entry):
        raise ValueError("needs exactly one of 'prompt' and 'messages'")
    if "prompt" in entry:
        p = entry["prompt"]
        if not isinstance(p, str) or not p.strip():
            raise ValueError("prompt must be a non-empty string")
        return ({"role": "user", "content": p},)
    msgs = entry["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise ValueError("messages must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] needs a role in {ROLES} and a string content")
        out.append({"role": str(m["role"]), "content": str(m["content"])})
    if out[-1]["role"] != "user":
        raise ValueError("messages must end with a user message")
    return tuple(out)


def _case(entry: Any, seen: set[str]) -> Case:
    if not isinstance(entry, dict):
        raise ValueError("must be a mapping with id, prompt (or messages) and expect")
    unknown = sorted(set(entry) - {"id", "prompt", "messages", "max_tokens", "expect"})
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(str, unknown))}")
    cid = entry.get("id")
    if not isinstance(cid, str | int) or isinstance(cid, bool) or not str(cid).strip():
        raise ValueError("needs an 'id' (a non-empty string)")
    cid = str(cid)
    if cid in seen:
        raise ValueError(f"id {cid!r} is used twice")
    if cid == "smoke":
        raise ValueError("id 'smoke' is the export's own smoke chat: use another id")
    messages = _messages(entry)
    max_tokens = entry.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise ValueError("max_tokens must be an integer in 1..4096")
    expect = entry.get("expect")
    if not isinstance(expect, dict) or not expect:
        raise ValueError("needs 'expect' with at least one of " + ", ".join(EXPECTATIONS))
    unknown = sorted(set(map(str, expect)) - set(EXPECTATIONS))
    if unknown:
        raise ValueError(f"expect: unknown expectation(s) {', '.join(unknown)} (known: {', '.join(EXPECTATIONS)})")
    kw: dict[str, Any] = {}
    for key in ("contains", "not_contains", "regex"):
        if key in expect:
            kw[key] = _strings(expect[key], f"expect.{key}")
    for pattern in kw.get("regex", ()):
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"expect.regex {pattern!r} is not a valid pattern ({e})") from None
    for key in ("json", "must_stop"):
        if key in expect:
            if not isinstance(expect[key], bool):
                raise ValueError(f"expect.{key} must be true or false")
            kw[key] = expect[key]
    if "max_words" in expect:
        n = expect["max_words"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError("expect.max_words must be an integer >= 1")
        kw["max_words"] = n
    return Case(cid, messages, max_tokens, **kw)


def parse(doc: Any, where: str = "regressions file") -> list[Case]:
    """The cases of a parsed YAML document (a list), or :class:`RegressionFileError` naming the first bad entry."""
    if not isinstance(doc, list) or not doc:
        raise RegressionFileError(f"{where}: must be a non-empty YAML list of cases")
    cases: list[Case] = []
    seen: set[str] = set()
    for i, entry in enumerate(doc, 1):
        try:
            case = _case(entry, seen)
        except ValueError as e:
            name = entry.get("id") if isinstance(entry, dict) else None
            label = f"entry {i}" + (f" (id {name!r})" if isinstance(name, str | int) and name != "" else "")
            raise RegressionFileError(f"{where}: {label}: {e}") from None
        seen.add(case.id)
        cases.append(case)
    return cases


def load(path: Path) -> list[Case]:
    """Read and check ``path``; :class:`RegressionFileError` with one line when it cannot be used."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RegressionFileError(f"{path}: cannot read: {e.strerror or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RegressionFileError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    return parse(doc, str(path))


def _json_ok(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def check(case: Case, answer: dict[str, Any] | None) -> list[str]:
    """What ``answer`` fails of ``case``'s expectations (empty: it meets them all)."""
    if answer is None:
        return ["no answer"]
    if answer.get("error"):
        return [f"no answer ({excerpt(str(answer['error']))})"]
    content = answer.get("content")
    if not isinstance(content, str):
        return ["no answer text"]
    why = [f"does not contain {s!r}" for s in case.contains if s not in content]
    why += [f"contains {s!r}" for s in case.not_contains if s in content]
    why += [f"does not match /{p}/" for p in case.regex if re.search(p, content) is None]
    if case.json and not _json_ok(content.strip()):
        why.append("is not valid JSON")
    if case.max_words is not None and len(content.split()) > case.max_words:
        why.append(f"has {len(content.split())} words (at most {case.max_words})")
    if case.must_stop and answer.get("stopped") is not True:
        why.append(f"did not stop on its own (finish_reason {answer.get('finish_reason')!r})")
    return why


def evaluate(answers: Sequence[dict[str, Any]], cases: Sequence[Case]) -> list[Failure]:
    """One :class:`Failure` per case whose answer (matched by id) fails an expectation, in the cases' order."""
    by_id = {str(a.get("id")): a for a in answers if isinstance(a, dict)}
    out = []
    for case in cases:
        answer = by_id.get(case.id)
        why = check(case, answer)
        if why:
            got = answer.get("content") if answer is not None else None
            out.append(Failure(case.id, "; ".join(why), excerpt(got) if isinstance(got, str) else ""))
    return out
