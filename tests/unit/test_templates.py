"""The chat-template table: complete entries, names, Jinja renders (as transformers renders them), the Ollama Go
templates rendering the same text (with Go's own text/template when a Go toolchain is present), and the config block."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import need, need_module

from daemon.train import templates
from daemon.train.templates import ChatTemplate, UnknownTemplate

jinja2 = need_module("jinja2", "jinja2 renders the templates (installed with the train extra)")
from jinja2 import nodes  # noqa: E402
from jinja2.ext import Extension  # noqa: E402
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

ALL = [templates.get(n) for n in templates.names()]
IDS = [t.name for t in ALL]

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "How do I reverse a list?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a dict by value?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Read a file line by line."},
    ],
    [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "Parse JSON."},
        {"role": "assistant", "content": "Use json.loads(text)."},
        {"role": "user", "content": "And write it?"},
    ],
]


class _Generation(Extension):
    """``{% generation %}...{% endgeneration %}`` as transformers parses it, without the mask bookkeeping."""

    tags = {"generation"}  # noqa: RUF012  (jinja2 declares it as an instance attribute)

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def render(source: str, messages: list[dict[str, str]], **kw: Any) -> str:
    """Render like ``tokenizer.apply_chat_template(..., tokenize=False)`` (same environment flags and globals)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    args = {"bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": False, **kw}
    return env.from_string(source).render(messages=messages, **args)


# ----------------------------------------------------------------------------------------------- table and names


def test_required_names_present_and_sorted() -> None:
    assert {"qwen-2.5", "chatml", "llama-3.1", "mistral"} <= set(templates.names())
    assert templates.names() == sorted(templates.names())


@pytest.mark.parametrize("t", ALL, ids=IDS)
def test_entry_complete(t: ChatTemplate) -> None:
    for field in ("name", "jinja", "training_jinja", "ollama_template", "instruction_part", "response_part"):
        assert isinstance(getattr(t, field), str) and getattr(t, field).strip(), field
    assert t.stop and all(isinstance(s, str) and s for s in t.stop)
    assert all(isinstance(a, str) and a for a in t.gguf_architectures)
    assert t.instruction_part != t.response_part
    assert templates.get(t.name) is t
    for alias in t.aliases:
        assert templates.get(alias) is t


def test_stop_tokens_and_markers_are_the_documented_ones() -> None:
    qwen, chatml, llama, mistral = (templates.get(n) for n in ("qwen-2.5", "chatml", "llama-3.1", "mistral"))
    assert qwen.stop == chatml.stop == ("<|im_end|>", "<|endoftext|>")
    assert llama.stop == ("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>")
    assert mistral.stop == ("[INST]", "[/INST]", "</s>")
    assert (qwen.instruction_part, qwen.response_part) == ("<|im_start|>user\n", "<|im_start|>assistant\n")
    assert llama.instruction_part == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert llama.response_part == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert (mistral.instruction_part, mistral.response_part) == ("[INST]", "[/INST]")
    assert qwen.gguf_architectures == ("qwen2",) and llama.gguf_architectures == ("llama",)


def test_llama_3_is_an_alias_of_llama_3_1_and_names_are_normalised() -> None:
    assert templates.get("llama-3").name == "llama-3.1"
    assert templates.get(" Qwen-2.5 ").name == "qwen-2.5"


@pytest.mark.parametrize("bad", ["vicuna", "", "qwen", "llama-2"])
def test_unknown_name_lists_the_names(bad: str) -> None:
    with pytest.raises(UnknownTemplate) as info:
        templates.get(bad)
    msg = str(info.value)
    assert repr(bad) in msg
    for name in templates.names():
        assert name in msg
    assert info.value.known == templates.names()
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------------ jinja


@pytest.mark.parametrize("t", ALL, ids=IDS)
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_jinja_renders_conversation_with_markers(t: ChatTemplate, conv: int) -> None:
    messages = CONVERSATIONS[conv]
    text = render(t.jinja, messages, add_generation_prompt=True)
    for m in messages:
        assert m["content"] in text
    assert t.instruction_part in text
    # The prompt ends where the model's answer starts: right after the response marker.
    assert text.endswith(t.response_part)
    answered = render(t.jinja, [*messages, {"role": "assistant", "content": "ANSWER-42"}])
    assert t.response_part + "ANSWER-42" in answered
    assert answered.count("ANSWER-42") == 1


@pytest.mark.parametrize("t", ALL, ids=IDS)
def test_training_variant_renders_exactly_like_the_inference_template(t: ChatTemplate) -> None:
    marker = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")
    if t.trl_recognised:
        assert not marker.search(t.training_jinja)
    else:
        assert len(marker.findall(t.training_jinja)) >= 2
    for messages in CONVERSATIONS:
        full = [*messages, {"role": "assistant", "content": "Done."}]
        for gen in (False, True):
            assert render(t.training_jinja, full, add_generation_prompt=gen) == render(
                t.jinja, full, add_generation_prompt=gen
            )


def test_qwen_default_system_prompt_matches_the_table() -> None:
    t = templates.get("qwen-2.5")
    assert t.default_system is not None
    assert t.default_system in render(t.jinja, CONVERSATIONS[0])
    assert t.default_system not in render(t.jinja, CONVERSATIONS[1])


def _llama_cpp_templates() -> Path:
    explicit = os.environ.get("CHATOS_RETRAIN_LLAMA_CPP_DIR")
    cache = Path(os.environ.get("CHATOS_RETRAIN_CACHE") or Path.home() / ".cache" / "chatos-retrain")
    return (Path(explicit) if explicit else cache / "llama.cpp-0.3.36") / "models" / "templates"


LLAMA_CPP_TEMPLATES = _llama_cpp_templates()  # read at import: the autouse fixture clears CHATOS_RETRAIN_* vars


@pytest.mark.parametrize(
    ("name", "filename"),
    [("qwen-2.5", "Qwen-Qwen2.5-7B-Instruct.jinja"), ("llama-3.1", "meta-llama-Llama-3.1-8B-Instruct.jinja")],
)
def test_real_templates_are_byte_exact(name: str, filename: str) -> None:
    path = LLAMA_CPP_TEMPLATES / filename
    need(path.is_file(), f"{path} missing: run .ci/train-setup.sh to extract llama.cpp's templates")
    assert templates.get(name).jinja == path.read_text(encoding="utf-8")


def test_qwen_template_is_the_one_trl_recognises() -> None:
    spec = importlib.util.find_spec("trl")  # locates the package without importing it (and torch)
    need(spec is not None and spec.origin is not None, "trl not installed in this interpreter (the train extra)")
    assert spec is not None and spec.origin is not None
    trl_dir = Path(spec.origin).parent / "chat_templates"
    assert templates.get("qwen-2.5").jinja == (trl_dir / "qwen2_5.jinja").read_text(encoding="utf-8")
    # llama-3.1 is not patched by TRL, hence our own generation-marker variant
    assert templates.get("llama-3.1").jinja == (trl_dir / "llama3_1.jinja").read_text(encoding="utf-8")
    assert not templates.get("llama-3.1").trl_recognised


# ------------------------------------------------------------------------------------------------------ ollama

_GO_BLOCK = re.compile(r"\{\{-?\s*(if|range|with|block|define|end)\b")


@pytest.mark.parametrize("t", ALL, ids=IDS)
def test_go_template_sanity(t: ChatTemplate) -> None:
    go = t.ollama_template
    assert ".Messages" in go and ".Role" in go and ".Content" in go
    assert "{%" not in go and "messages[" not in go  # no Jinja leaked in
    opened = sum(1 for m in _GO_BLOCK.finditer(go) if m.group(1) != "end")
    assert opened == sum(1 for m in _GO_BLOCK.finditer(go) if m.group(1) == "end")
    assert t.response_part in go
    assert any(stop in go for stop in t.stop)


_GO_MAIN = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Msg struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Template string `json:"template"`
	Messages []Msg  `json:"messages"`
}

// Like Ollama's template.Execute: system messages joined into .System, kept in .Messages.
func main() {
	var cases []Case
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		panic(err)
	}
	out := []string{}
	for _, c := range cases {
		var system []string
		for _, m := range c.Messages {
			if m.Role == "system" {
				system = append(system, m.Content)
			}
		}
		t := template.Must(template.New("t").Parse(c.Template))
		var b strings.Builder
		vars := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": c.Messages, "Tools": nil,
			"Prompt": "", "Response": ""}
		if err := t.Execute(&b, vars); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


def test_go_templates_render_what_the_jinja_renders(tmp_path: Path) -> None:
    go = shutil.which("go")
    need(go, "no Go toolchain: the Go templates are checked only for structure (.ci/go-setup.sh installs golang-go)")
    assert go is not None
    cases, expected = [], []
    for t in ALL:
        for messages in CONVERSATIONS:
            if t.name == "mistral" and messages[0]["role"] == "system" and len(messages) < 2:
                continue
            cases.append({"template": t.ollama_template, "messages": messages})
            # Ollama adds BOS itself from the GGUF's metadata: compare without it.
            expected.append(render(t.jinja, messages, add_generation_prompt=True, bos_token=""))
    (tmp_path / "main.go").write_text(_GO_MAIN)
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOPATH": str(tmp_path / "gopath"), "GO111MODULE": "off"}
    proc = subprocess.run(
        [go, "run", "main.go"],
        cwd=tmp_path,
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    for case, want, have in zip(cases, expected, got, strict=True):
        assert have == want, f"Go template differs for {case['messages']}"


# ------------------------------------------------------------------------------------------------ config block


@pytest.mark.parametrize("t", ALL, ids=IDS)
def test_trainer_block_survives_yaml_byte_for_byte(t: ChatTemplate) -> None:
    block = templates.trainer_block(t.name)
    assert set(block) == {"name", "jinja", "training_jinja", "instruction_part", "response_part", "stop", "known_names"}
    assert block["name"] == t.name and block["known_names"] == templates.names()
    back = yaml.safe_load(yaml.safe_dump({"template": block}, sort_keys=False, allow_unicode=True))["template"]
    assert back == block


def test_trainer_block_resolves_aliases_and_rejects_unknown() -> None:
    assert templates.trainer_block("llama-3")["name"] == "llama-3.1"
    with pytest.raises(UnknownTemplate):
        templates.trainer_block("nope")
