"""The operator's regression prompts: the file's checks (a bad entry is one line naming it) and each expectation on
the answers the exported GGUF gave."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from daemon.train import regressions
from daemon.train.regressions import Case, RegressionFileError, evaluate, load, parse

GOOD = """
- id: arithmetic
  prompt: "What is 2 + 2? Answer with the number only."
  max_tokens: 16
  expect: {contains: "4", not_contains: ["5", "I cannot"], max_words: 3, must_stop: true}
- id: json
  messages:
    - {role: system, content: "You answer in JSON."}
    - {role: user, content: "Give me an object with key a = 1."}
  expect: {json: true, regex: ['"a"\\s*:\\s*1']}
"""


def test_a_good_file_loads_into_cases(tmp_path: Path) -> None:
    f = tmp_path / "regressions.yaml"
    f.write_text(GOOD)
    cases = load(f)
    assert [c.id for c in cases] == ["arithmetic", "json"]
    a, j = cases
    assert a.messages == ({"role": "user", "content": "What is 2 + 2? Answer with the number only."},)
    assert a.contains == ("4",) and a.not_contains == ("5", "I cannot") and a.max_words == 3 and a.must_stop
    assert a.request() == {"id": "arithmetic", "messages": [dict(a.messages[0])], "max_tokens": 16}
    assert j.json and j.regex == ('"a"\\s*:\\s*1',) and j.max_tokens == regressions.DEFAULT_MAX_TOKENS
    assert [m["role"] for m in j.messages] == ["system", "user"]


@pytest.mark.parametrize(("doc", "message"), [
    ("{}", "must be a non-empty YAML list of cases"),
    ("[]", "must be a non-empty YAML list of cases"),
    ("- just a string", "entry 1: must be a mapping"),
    ("- {prompt: hi, expect: {contains: x}}", "entry 1: needs an 'id'"),
    ("- {id: a, expect: {contains: x}}", "entry 1 (id 'a'): needs exactly one of 'prompt' and 'messages'"),
    ("- {id: a, prompt: hi, messages: [{role: user, content: hi}], expect: {contains: x}}",
     "entry 1 (id 'a'): needs exactly one of 'prompt' and 'messages'"),
    ("- {id: a, prompt: '  ', expect: {contains: x}}", "prompt must be a non-empty string"),
    ("- {id: a, messages: [{role: user, content: hi}, {role: assistant, content: yo}], expect: {contains: x}}",
     "messages must end with a user message"),
    ("- {id: a, messages: [{role: bot, content: hi}], expect: {contains: x}}", "messages[0] needs a role"),
    ("- {id: a, prompt: hi}", "entry 1 (id 'a'): needs 'expect' with at least one of contains"),
    ("- {id: a, prompt: hi, expect: {}}", "needs 'expect'"),
    ("- {id: a, prompt: hi, expect: {startswith: x}}", "expect: unknown expectation(s) startswith"),
    ("- {id: a, prompt: hi, expect: {contains: []}}", "expect.contains must be a non-empty string or a list"),
    ("- {id: a, prompt: hi, expect: {not_contains: [x, 3]}}", "expect.not_contains must be a non-empty string"),
    ("- {id: a, prompt: hi, expect: {regex: '(unclosed'}}", "expect.regex '(unclosed' is not a valid pattern"),
    ("- {id: a, prompt: hi, expect: {json: 'yes'}}", "expect.json must be true or false"),
    ("- {id: a, prompt: hi, expect: {must_stop: 1}}", "expect.must_stop must be true or false"),
    ("- {id: a, prompt: hi, expect: {max_words: 0}}", "expect.max_words must be an integer >= 1"),
    ("- {id: a, prompt: hi, max_tokens: 0, expect: {json: true}}", "max_tokens must be an integer in 1..4096"),
    ("- {id: a, prompt: hi, temperature: 0, expect: {json: true}}", "entry 1 (id 'a'): unknown key(s) temperature"),
    ("- {id: smoke, prompt: hi, expect: {json: true}}", "entry 1 (id 'smoke'): id 'smoke' is the export's own"),
    ("- {id: a, prompt: hi, expect: {json: true}}\n- {id: a, prompt: ho, expect: {json: true}}",
     "entry 2 (id 'a'): id 'a' is used twice"),
])
def test_a_bad_file_is_one_line_naming_the_entry(tmp_path: Path, doc: str, message: str) -> None:
    f = tmp_path / "r.yaml"
    f.write_text(doc)
    with pytest.raises(RegressionFileError) as err:
        load(f)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{f}: ") and message in text, text


def test_an_unreadable_or_unparsable_file(tmp_path: Path) -> None:
    with pytest.raises(RegressionFileError, match="cannot read"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- [unclosed\n")
    with pytest.raises(RegressionFileError, match="not valid YAML") as err:
        load(bad)
    assert "\n" not in str(err.value)


def case(**expect: Any) -> Case:
    return parse([{"id": "c", "prompt": "p", "expect": expect}])[0]


def answer(content: str, stopped: bool = True, **kw: Any) -> list[dict[str, Any]]:
    return [{"id": "c", "content": content, "finish_reason": "stop" if stopped else "length", "stopped": stopped,
             **kw}]


@pytest.mark.parametrize(("expect", "content", "stopped", "why"), [
    ({"contains": "4"}, "It is 4.", True, None),
    ({"contains": "4"}, "It is four.", True, "does not contain '4'"),
    ({"contains": ["Paris", "France"]}, "Paris.", True, "does not contain 'France'"),
    ({"not_contains": "sorry"}, "Sure: 4", True, None),
    ({"not_contains": ["sorry", "cannot"]}, "sorry, I cannot", True, "contains 'sorry'; contains 'cannot'"),
    ({"regex": r"^\d+$"}, "42", True, None),
    ({"regex": r"(?i)^yes"}, "YES indeed", True, None),
    ({"regex": r"^\d+$"}, "42 apples", True, "does not match /^\\d+$/"),
    ({"json": True}, ' {"a": 1}\n', True, None),
    ({"json": True}, "```json\n{}\n```", True, "is not valid JSON"),
    ({"max_words": 3}, "one two three", True, None),
    ({"max_words": 3}, "one two three four", True, "has 4 words (at most 3)"),
    ({"must_stop": True}, "ok", True, None),
    ({"must_stop": True}, "ok and then", False, "did not stop on its own (finish_reason 'length')"),
    ({"must_stop": False}, "cut", False, None),
])
def test_each_expectation(expect: dict[str, Any], content: str, stopped: bool, why: str | None) -> None:
    failures = evaluate(answer(content, stopped), [case(**expect)])
    if why is None:
        assert failures == []
    else:
        assert [(f.id, f.why) for f in failures] == [("c", why)]
        assert failures[0].got == " ".join(content.split())


def test_a_missing_answer_an_engine_error_and_a_long_excerpt() -> None:
    c = case(contains="x")
    assert [f.why for f in evaluate([], [c])] == ["no answer"]
    assert evaluate([{"id": "c", "error": "engine crashed"}], [c])[0].why == "no answer (engine crashed)"
    long = evaluate(answer("word " * 100), [c])[0]
    assert len(long.got) == regressions.EXCERPT and long.got.endswith("…")
    assert long.line().startswith("c: does not contain 'x'; got 'word word")
