"""The tokens the trainer trains on and ships (issues 14 and 18), for real on the CPU.

* The labels are exactly the assistant's tokens: each assistant message's content and the template's end-of-turn
  token, nothing of the system or user turns, for every template of the table on both vocabularies. The oracle is
  independent of the ``{% generation %}`` markers the trainer uses: character spans of the rendered text, mapped to
  tokens through the tokenizer's offsets.
* No backend edits the vocabulary: for every template x both families x both EOS conventions (instruct checkpoints
  end with the chat's end of turn, base checkpoints with the vocabulary's end of text), the special tokens' ids and a
  rendered chat's ids are the base tokenizer's after the trainer's own setup and in the saved adapter, on the
  transformers backend and the Unsloth backend (its venv, CPU). Unsloth's ``get_chat_template`` (``map_eos_token``)
  once swapped ``<|im_end|>`` and ``<|endoftext|>`` on a base-convention Qwen2 with ``chatml``.
* And in the GGUF: a real cycle on each backend (base-convention Qwen2, ``chatml``: the case that broke) trains,
  merges, converts and registers; the GGUF's token table (read with gguf-py) has the base's tokens at the base's ids.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import need
from ollama_standin import StandinServer
from trainjobs import LLAMA_CPP_DIR, TIMEOUT_S, TINYMODEL, UNSLOTH_PYTHON, trainer_env, training_stack_missing

from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.demo.storegen import generate_store
from daemon.publish.converter import default_cache_dir, installed
from daemon.state import State
from daemon.train import templates

pytestmark = pytest.mark.slow

TRAINER = Path(__file__).resolve().parents[2] / "daemon" / "trainer"
PROBE = Path(__file__).resolve().parent / "token_probe.py"
TEMPLATES = ("qwen-2.5", "chatml", "llama-3.1", "mistral")
FAMILIES = ("qwen2", "llama")


@pytest.fixture(scope="session")
def all_models(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family-convention -> model folder: the session's instruct models and base-convention twins."""
    out = tmp_path_factory.mktemp("tiny-base")
    proc = subprocess.run([sys.executable, str(TINYMODEL), str(out), "--family", "qwen2", "--family", "llama",
                           "--convention", "base", "--llama-cpp-dir", str(LLAMA_CPP_DIR)],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=trainer_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = {json.loads(x)["family"]: Path(json.loads(x)["path"]) for x in proc.stdout.splitlines()}
    return {**{f"{k}-instruct": v for k, v in tiny_models.items()}, **{f"{k}-base": v for k, v in base.items()}}


def _trainer_parts() -> Any:
    if str(TRAINER) not in sys.path:
        sys.path.insert(0, str(TRAINER))
    import qlora_tokens

    return qlora_tokens


def assistant_token_positions(tok: Any, text: str, messages: list[dict[str, str]], stop: str,
                              newlines: bool = False) -> set[int]:
    """Token positions (of ``text`` tokenized as a whole) inside an assistant content or the end-of-turn right after
    it (with ``newlines``, also the newline just before the content and just after the end of turn): found by
    character spans, not by the template's markers."""
    spans, at = [], 0
    for m in messages:
        start = text.index(m["content"], at)
        end = start + len(m["content"])
        at = end
        if m["role"] != "assistant":
            continue
        after = text[end:]
        stripped = len(after) - len(after.lstrip(" "))
        assert after[stripped:].startswith(stop), f"no {stop!r} after the assistant's content"
        end += stripped + len(stop)
        if newlines and text[start - 1] == "\n":
            start -= 1
        if newlines and text[end:end + 1] == "\n":
            end += 1
        spans.append((start, end))
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return {i for i, (a, b) in enumerate(enc["offset_mapping"])
            if b > a and any(s <= a and b <= e for s, e in spans)}


# Each template on the vocabulary it is used with, and its end-of-turn token (mistral's is the vocabulary's EOS).
PAIRS = [("qwen-2.5", "qwen2", "<|im_end|>"), ("chatml", "qwen2", "<|im_end|>"), ("llama-3.1", "llama", "<|eot_id|>"),
         ("mistral", "llama", "<|eot_id|>")]
# TRL's own patch of the Qwen2.5 template (the one template of the table TRL recognises and patches itself) also
# labels the newline that ends the assistant header and the one after the end of turn: the old path trained those too.
NEWLINES_TOO = {"qwen-2.5"}


@pytest.mark.parametrize(("template", "family", "end_of_turn"), PAIRS)
def test_labels_are_exactly_the_assistant_tokens_and_their_end_of_turn(
    template: str, family: str, end_of_turn: str, all_models: dict[str, Path]
) -> None:
    need(training_stack_missing() is None, str(training_stack_missing()))
    from transformers import AutoTokenizer

    qlora_tokens = _trainer_parts()
    block = templates.trainer_block(template)
    tok = AutoTokenizer.from_pretrained(str(all_models[f"{family}-instruct"]))
    tok.chat_template = block["jinja"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: pear apple"},
            {"role": "assistant", "content": "Sorted: apple pear."}, {"role": "user", "content": "And: fig date"},
            {"role": "assistant", "content": "Sorted: date fig."}]
    if template == "mistral":
        chat = chat[1:]  # the mistral template takes no system turn
    training = qlora_tokens.training_template(tok, block)
    ids, labels = qlora_tokens.tokenize_one(tok, chat, training, max_len=4096)
    text = tok.apply_chat_template(chat, tokenize=False, chat_template=block["jinja"])
    assert ids == tok(text, add_special_tokens=False)["input_ids"]  # the trained ids are the inference render's
    expected = assistant_token_positions(tok, text, chat, end_of_turn, newlines=template in NEWLINES_TOO)
    labelled = {i for i, t in enumerate(labels) if t != qlora_tokens.IGNORE}
    assert labelled == expected, (tok.convert_ids_to_tokens([ids[i] for i in sorted(labelled ^ expected)]))
    assert all(labels[i] == ids[i] for i in labelled)
    assert tok.convert_tokens_to_ids(end_of_turn) in [labels[i] for i in labelled]  # the model is taught to stop
    # cut to a length: the start is kept, and a conversation with no assistant token left is dropped
    short = qlora_tokens.tokenize(tok, [chat], training, max_len=min(expected) + 1)
    assert short.input_ids == [ids[:min(expected) + 1]] and short.trained_tokens == 1
    assert qlora_tokens.tokenize(tok, [chat], training, max_len=min(expected)).dropped == 1


def test_the_token_cache_returns_what_tokenizing_gives_and_keys_on_the_template(
    tmp_path: Path, all_models: dict[str, Path]
) -> None:
    need(training_stack_missing() is None, str(training_stack_missing()))
    from transformers import AutoTokenizer

    qlora_tokens = _trainer_parts()
    tok = AutoTokenizer.from_pretrained(str(all_models["qwen2-instruct"]))
    data = tmp_path / "train.jsonl"
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(5)]
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    blocks = [templates.trainer_block(n) for n in ("qwen-2.5", "chatml")]
    cold = [qlora_tokens.Tokenizer(tok, qlora_tokens.training_template(tok, b), 256, str(tmp_path / "c"))
            for b in blocks]
    first = [t.tokenize(convs, str(data)) for t in cold]
    assert not any(f.cached for f in first) and first[0].input_ids != first[1].input_ids  # two templates, two keys
    again = qlora_tokens.Tokenizer(tok, qlora_tokens.training_template(tok, blocks[0]), 256, str(tmp_path / "c"))
    hit = again.tokenize(convs, str(data))
    assert hit.cached and again.hits == 1
    assert (hit.input_ids, hit.labels) == (first[0].input_ids, first[0].labels)
    data.write_text(data.read_text() + json.dumps({"messages": convs[0]}) + "\n")  # a new dataset version: a miss
    assert not again.tokenize(convs + convs[:1], str(data)).cached


@pytest.mark.parametrize("backend", ["transformers", "unsloth"])
def test_trainer_setup_and_the_saved_adapter_keep_the_base_tokenizers_ids(
    backend: str, all_models: dict[str, Path], tmp_path: Path
) -> None:
    python = Path(sys.executable) if backend == "transformers" else UNSLOTH_PYTHON
    need(python.exists(), f"{python} missing: run .ci/train-setup.sh (builds the Unsloth venv)")
    from transformers import AutoTokenizer

    cases = [{"model": str(all_models[f"{fam}-{conv}"]), "template": templates.trainer_block(t)}
             for fam in FAMILIES for conv in ("instruct", "base") for t in TEMPLATES]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run([str(python), str(PROBE), backend, str(tmp_path / "out"), str(tmp_path / "cases.json")],
                          capture_output=True, text=True, timeout=TIMEOUT_S, env=trainer_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"case"')]
    assert len(seen) == len(cases)
    sys.path.insert(0, str(PROBE.parent))
    from token_probe import ids_of

    bases = {m: AutoTokenizer.from_pretrained(m) for m in {c["model"] for c in cases}}  # each loaded once
    for got in seen:
        case = cases[got["case"]]
        want = ids_of(bases[case["model"]], case["template"])
        where = f"{Path(case['model']).name} / {case['template']['name']}"
        assert got["setup"] == want, f"{backend}: ids moved at trainer setup ({where})"
        assert got["saved"] == want, f"{backend}: ids moved in the saved adapter ({where})"
        assert got["base_model_name_or_path"] == case["model"]  # the configured base, not a substitute


@pytest.mark.parametrize("backend", ["transformers", "unsloth"])
def test_a_base_convention_chatml_cycle_ships_a_gguf_with_the_bases_token_ids(
    backend: str, all_models: dict[str, Path], make_settings: Any, store: Path, tmp_path: Path
) -> None:
    python = Path(sys.executable) if backend == "transformers" else UNSLOTH_PYTHON
    need(python.exists(), f"{python} missing: run .ci/train-setup.sh (builds the Unsloth venv)")
    need(installed(default_cache_dir()) is not None,
         f"the converter is not set up in {default_cache_dir()}: run .ci/train-setup.sh")
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    model = all_models["qwen2-base"]
    generate_store(store, 40, days=1, seed=5, assistant_words=(4, 10), feedback_fraction=0.7)
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text("training:\n  learning_rate: 0.01\n  eval_steps: null\nlora:\n  r: 4\n")
    srv = StandinServer(tmp_path / "ollama-standin", use_llama=False).start()
    try:
        s = make_settings(
            training={"python": str(python), "base_model": str(model), "backend": backend, "chat_template": "chatml",
                      "max_steps": 2, "timeout": "10m", "env": {"OMP_NUM_THREADS": "1"},
                      "config_template": str(overrides)},
            policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0},
            dataset={"min_train_examples": 4, "min_eval_examples": 2},
            gate={"tolerance": 10.0, "min_new_gain": 0.0, "required": ["loss"], "checks": ["loss"]},
            export={"quantization": "q8_0", "smoke": {"require_stop": False}},
            ollama={"host": srv.url, "model_name": "tok-e2e", "timeout_s": 30},
        )
        with State(s.state_dir()) as st:
            r = run_cycle(s, st, CycleRequest(None))
            assert r.outcome == "registered", r.reason
            m = st.models.get(1)
            assert m is not None
            gguf = Path(m.gguf_path)
    finally:
        srv.stop()
    reader = GGUFReader(str(gguf))
    field = reader.fields["tokenizer.ggml.tokens"]
    vocab = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    base = AutoTokenizer.from_pretrained(str(model))
    for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert vocab[base.convert_tokens_to_ids(name)] == name, f"{backend}: {name} moved in the GGUF"
    eos = reader.fields["tokenizer.ggml.eos_token_id"]
    assert int(eos.parts[eos.data[0]][0]) == base.convert_tokens_to_ids("<|endoftext|>")  # the base's own EOS
