"""The Modelfile beside each exported GGUF: it reads back, through a re-implementation of Ollama's parser
(``tests/modelfile_parser.py``), as exactly the model the HTTP registration creates; the parser stand-in itself
rejects what Ollama's parser rejects; retention removes the Modelfile with its GGUF."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import modelfile_parser as mp
import pytest

from daemon.cycle import pruning
from daemon.cycle.retention_plan import Plan
from daemon.publish import modelfile, ollama, registry
from daemon.state import State
from daemon.train import templates

GGUF = "chatos-v3.q8_0.gguf"


def read_back(text: str) -> dict[str, Any]:
    return mp.create_request(mp.parse(text))


# -- the parser stand-in: it is Ollama's parser, failures included ------------------------------------------------


def test_parser_reads_commands_case_insensitively_with_comments_and_quotes() -> None:
    text = ('# a comment\n\nfrom ./m.gguf\nAdapter ./lora\nLICENSE MIT\nPARAMETER temperature 0.5\n'
            'parameter stop "### User: "\nTEMPLATE """   {{ .Prompt }}\n\n{{ .Response }}   """    \n'
            'SYSTEM "You are \'quoted\' "\nMESSAGE user Hey there!\nREQUIRES 0.5.0\n')
    assert mp.parse(text) == [
        mp.Command("model", "./m.gguf"), mp.Command("adapter", "./lora"), mp.Command("license", "MIT"),
        mp.Command("temperature", "0.5"), mp.Command("stop", "### User: "),
        mp.Command("template", "   {{ .Prompt }}\n\n{{ .Response }}   "),
        mp.Command("system", "You are 'quoted' "), mp.Command("message", "user: Hey there!"),
        mp.Command("requires", "0.5.0"),
    ]


@pytest.mark.parametrize(("value", "expected"), [
    ("### User:", "### User:"), ("### User: ", "### User:"), ('"### User: "', "### User: "),
    ('"""### User:"""', "### User:"), ('"""### User:\n"""', "### User:\n"), ("<|eot_id|>", "<|eot_id|>"),
    ('""', ""), ('"""' + '""' + '"""', '""'), ('"""\'\'"\'""\'"""', "''\"'\"\"'"),
])
def test_parser_values_have_no_escapes(value: str, expected: str) -> None:
    assert mp.parse(f"FROM foo\nPARAMETER stop {value}\n")[1] == mp.Command("stop", expected)


def test_parser_ends_a_triple_quoted_value_at_the_first_line_that_completes_it() -> None:
    # a \"\"\" right before a line break closes the value: what follows is read as commands
    with pytest.raises(mp.ParserError):
        mp.parse('FROM foo\nTEMPLATE """a"""\nb"""\n')
    # anywhere else it is text
    assert mp.parse('FROM foo\nTEMPLATE """a""" b\nc"""\n')[1].args == 'a""" b\nc'


@pytest.mark.parametrize(("text", "error"), [
    ("FROM foo\nBADCOMMAND x\n", mp.ParserError),
    ("FROM\nfoo\n", mp.ParserError),
    ("FROM foo\nMESSAGE badguy hi\n", mp.ParserError),
    ("FROM foo\nPARAMETER param1\n", mp.UnexpectedEOF),
    ('FROM foo\nSYSTEM """never closed\n', mp.UnexpectedEOF),
    ('FROM foo\nSYSTEM """closed with two""\n', mp.UnexpectedEOF),
    ('FROM foo\nSYSTEM "\n', mp.UnexpectedEOF),
    ("PARAMETER temperature 1\n", mp.MissingFrom),
    ("", mp.MissingFrom),
])
def test_parser_rejects_what_ollama_rejects(text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        mp.parse(text)


def test_parser_drops_unprintable_runes_and_reads_a_bom() -> None:
    assert mp.parse("FROM fo\x01o\n")[0].args == "foo"
    assert mp.parse(b"\xef\xbb\xbfFROM foo\n") == [mp.Command("model", "foo")]
    assert mp.parse(b"\xff\xfe" + "FROM foo\n".encode("utf-16-le")) == [mp.Command("model", "foo")]


def test_create_request_types_parameters_like_format_params() -> None:
    req = read_back('FROM ./m.gguf\nPARAMETER num_ctx 4096\nPARAMETER temperature 0.7\nPARAMETER use_mmap false\n'
                    'PARAMETER stop a\nPARAMETER stop "b c "\nPARAMETER mirostat 1\n')
    assert req == {"from": "./m.gguf", "parameters": {"num_ctx": 4096, "temperature": mp.float32(0.7),
                                                      "use_mmap": False, "stop": ["a", "b c "]}}
    with pytest.raises(mp.ModelfileError, match="unknown parameter"):
        read_back("FROM x\nPARAMETER not_an_option 1\n")
    with pytest.raises(mp.ModelfileError):
        read_back("FROM x\nPARAMETER num_ctx lots\n")


# -- render: what is written reads back exactly -------------------------------------------------------------------


def spec(template: str = "qwen-2.5", options: Mapping[str, Any] | None = None,
         system: str | None = None) -> ollama.ModelSpec:
    t = templates.get(template)
    return ollama.ModelSpec(template=t.ollama_template, stop=t.stop, options=dict(options or {}), system=system)


@pytest.mark.parametrize("name", templates.names())
def test_every_template_round_trips_byte_for_byte(name: str) -> None:
    s = spec(name, {"temperature": 0.6, "num_ctx": 8192, "top_k": 40, "use_mmap": True},
             system='You are "helpful".\nAnswer in one line.  ')
    text = modelfile.render_spec(GGUF, s, comment="chatos:v3, by chatos-retrain")
    req = read_back(text)
    assert req["from"] == f"./{GGUF}"
    assert req["template"] == templates.get(name).ollama_template  # byte-equal
    assert req["system"] == 'You are "helpful".\nAnswer in one line.  '
    assert req["parameters"] == {"temperature": mp.float32(0.6), "num_ctx": 8192, "top_k": 40, "use_mmap": True,
                                 "stop": list(templates.get(name).stop)}
    assert text.startswith("# chatos:v3, by chatos-retrain\nFROM ./chatos-v3.q8_0.gguf\nTEMPLATE \"\"\"")
    assert text.count("PARAMETER stop ") == len(templates.get(name).stop)


def test_no_system_no_system_line() -> None:
    text = modelfile.render(GGUF, "{{ .Prompt }}", ["</s>"], {}, None)
    assert "SYSTEM" not in text and read_back(text) == {
        "from": f"./{GGUF}", "template": "{{ .Prompt }}", "parameters": {"stop": ["</s>"]}}


@pytest.mark.parametrize("template", [
    'before """ inside a line\nafter',  # \"\"\" mid-line: triple quotes still carry it
    'a line ending in a quote "\nmore',
    '"""starts and ends with them"""',
    'ends with a quote"\n',
    '   padded, "quoted"\n\n  ',
    "tab\tand\r\nCRLF",
])
def test_templates_with_quotes_round_trip(template: str) -> None:
    assert read_back(modelfile.render(GGUF, template, ["x"], {}, None))["template"] == template


def test_a_template_no_quoting_can_carry_is_refused_in_one_line() -> None:
    bad = 'a line that ends in triple quotes """  \nwould close any quote'
    with pytest.raises(ValueError, match="TEMPLATE cannot be quoted") as err:
        modelfile.render(GGUF, bad, ["x"], {}, None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match='PARAMETER stop cannot be quoted'):
        modelfile.render(GGUF, "T", ['x"""\ny'], {}, None)
    with pytest.raises(ValueError, match="drops"):
        modelfile.render(GGUF, "a\x00b", ["x"], {}, None)
    with pytest.raises(ValueError, match="drops"):
        modelfile.render(GGUF, "ok", ["x"], {}, "non\u00a0breaking")


@pytest.mark.parametrize("value", [
    "### User:", " leading", "trailing ", '"quoted"', '"', 'say "hi"', "", "two\nlines", "#hash",
    "<|im_end|>", "a  b",
])
def test_parameter_values_are_quoted_as_the_parser_reads_them(value: str) -> None:
    text = modelfile.render(GGUF, "T", [value], {}, None)
    assert read_back(text)["parameters"]["stop"] == [value]


def test_parameter_quoting_is_minimal() -> None:
    text = modelfile.render(GGUF, "T", ["<|im_end|>", "trailing "], {"temperature": 0.5, "seed": 7}, None)
    assert "PARAMETER stop <|im_end|>\n" in text and 'PARAMETER stop "trailing "\n' in text
    assert "PARAMETER temperature 0.5\n" in text and "PARAMETER seed 7\n" in text


def test_options_render_by_type_and_bad_ones_are_refused() -> None:
    text = modelfile.render(GGUF, "T", ["s"], {"use_mmap": False, "top_p": 1e-05, "stop": ["ignored"],
                                               "num_gpu": [1]}, None)
    assert read_back(text)["parameters"] == {"use_mmap": False, "top_p": mp.float32(1e-05), "num_gpu": 1,
                                             "stop": ["s"]}
    with pytest.raises(ValueError, match="dict"):
        modelfile.render(GGUF, "T", [], {"temperature": {"a": 1}}, None)
    with pytest.raises(ValueError, match="parameter name"):
        modelfile.render(GGUF, "T", [], {"top-k": 1}, None)
    with pytest.raises(ValueError, match="plain file name"):
        modelfile.render("../x.gguf", "T", [], {}, None)


# -- the Modelfile and the registration describe the same model ---------------------------------------------------


class RecordingClient:
    """Stands in for OllamaClient: records the /api/create body the real client would send (same create_body)."""

    def __init__(self, architecture: str) -> None:
        self.architecture = architecture
        self.bodies: list[dict[str, Any]] = []

    def ensure_blob(self, path: str, digest: str) -> str:
        return digest

    def create(self, name: str, files: Mapping[str, str], *, template: str | None = None, system: str | None = None,
               parameters: Mapping[str, Any] | None = None) -> list[str]:
        self.bodies.append(ollama.create_body(name, files, template=template, system=system, parameters=parameters))
        return ["success"]

    def show(self, name: str) -> dict[str, Any]:
        body = self.bodies[-1]
        stops = "\n".join(f"stop {json.dumps(s)}" for s in body["parameters"]["stop"])
        return {"details": {"format": "gguf"}, "model_info": {"general.architecture": self.architecture},
                "template": body["template"], "parameters": stops}

    def copy(self, src: str, dst: str) -> None:
        pass

    def tags(self) -> list[dict[str, Any]]:
        return []

    def delete(self, name: str) -> None:
        pass

    def close(self) -> None:
        pass


def add_version(state: State, s: Any, gguf: Path, template: str, architecture: str) -> int:
    gguf.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_bytes(b"GGUF")
    return registry.add_version(state, job_id="j-1", dataset_version=1, manifest_hash="h", gguf_path=str(gguf),
                                gguf_sha256="sha256:" + "0" * 64, gguf_size=4, architecture=architecture,
                                chat_template=template, eval_numbers={}, settings=s)


@pytest.mark.parametrize(("template", "architecture"), [("qwen-2.5", "qwen2"), ("llama-3.1", "llama")])
def test_the_modelfile_and_the_create_body_describe_the_same_model(
    make_settings: Any, state: State, tmp_path: Path, template: str, architecture: str
) -> None:
    s = make_settings(ollama={"model_name": "chatos", "system": 'Be brief.\nSay "done" at the end.',
                              "parameters": {"temperature": 0.7, "num_ctx": 4096, "repeat_penalty": 1.1,
                                             "stop": ["overridden"]}},
                      export={"smoke": {"enabled": False}})
    gguf = tmp_path / "state" / "exports" / "j-1" / "chatos-v1.q8_0.gguf"
    v = add_version(state, s, gguf, template, architecture)
    written = registry.write_modelfile(s, gguf, v, registry.model_spec(s, template))  # what export writes
    client = RecordingClient(architecture)
    row = registry.register(s, state, v, client=client)  # type: ignore[arg-type]
    assert row["status"] == "registered", row
    assert written == modelfile.path_beside(gguf) == gguf.parent / "Modelfile"
    [body] = client.bodies
    req = read_back(written.read_text(encoding="utf-8"))
    assert req["from"] == f"./{gguf.name}" and "chatos:v1" in written.read_text().splitlines()[0]
    assert req["template"] == body["template"] == templates.get(template).ollama_template
    assert req["system"] == body["system"] == s.ollama.system
    sent = {k: mp.float32(x) if isinstance(x, float) else x for k, x in body["parameters"].items()}
    assert req["parameters"] == sent
    assert sent["stop"] == list(templates.get(template).stop)
    assert registry.lineage(state)[0]["modelfile"] == str(written)


def test_write_beside_is_atomic_and_idempotent(tmp_path: Path) -> None:
    gguf = tmp_path / GGUF
    path = modelfile.write_beside(gguf, spec())
    first = path.stat().st_mtime_ns, path.stat().st_ino
    assert modelfile.write_beside(gguf, spec()) == path and (path.stat().st_mtime_ns, path.stat().st_ino) == first
    modelfile.write_beside(gguf, spec(system="now with a system prompt"))
    assert read_back(path.read_text())["system"] == "now with a system prompt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Modelfile"]  # no temporary file left


def test_an_unwritable_modelfile_is_a_warning_not_a_failure(make_settings: Any, tmp_path: Path) -> None:
    s = make_settings(ollama={"system": 'a line ending in triple quotes """\nmore'})
    assert registry.write_modelfile(s, tmp_path / GGUF, 1, registry.model_spec(s, "qwen-2.5")) is None
    assert not (tmp_path / "Modelfile").exists()


def test_retention_removes_the_modelfile_with_its_gguf(make_settings: Any, state: State, tmp_path: Path) -> None:
    s = make_settings()
    old = add_version(state, s, state.dir / "exports" / "j-1" / "m-v1.q8_0.gguf", "qwen-2.5", "qwen2")
    other = state.dir / "exports" / "j-2" / "m-v2.q8_0.gguf"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"GGUF")
    mf_old = registry.write_modelfile(s, state.dir / "exports" / "j-1" / "m-v1.q8_0.gguf", old,
                                      registry.model_spec(s, "qwen-2.5"))
    mf_other = registry.write_modelfile(s, other, 2, registry.model_spec(s, "qwen-2.5"))
    assert mf_old and mf_other
    # a folder whose Modelfile names another GGUF keeps it
    stray = state.dir / "exports" / "j-2" / "m-v0.q8_0.gguf"
    stray.write_bytes(b"GGUF")
    done = pruning.execute(state, Plan(ggufs=[(old, str(mf_old.parent / "m-v1.q8_0.gguf")), (9, str(stray))]), "t")
    assert done["ggufs"] == 2 and not mf_old.exists() and not (mf_old.parent / "m-v1.q8_0.gguf").exists()
    assert mf_other.exists() and other.exists() and not stray.exists()
    assert registry.lineage(state)[0]["modelfile"] is None
