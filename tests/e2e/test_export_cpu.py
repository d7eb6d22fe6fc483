"""GGUF export end to end on CPU: tiny Qwen2 / Llama models with real vocabularies, a LoRA adapter with random
weights (training is tested elsewhere), the real ``merge_export.py`` child running the real converter, the GGUF read
back by the ``gguf`` reader, by transformers and by llama.cpp's engine (``xllamacpp``, the child's step 6), and the
verdict by ``daemon.publish.export.outcome``. A GGUF corrupted after the converter is caught by the engine and never
reaches Ollama; the Ollama stand-in runs the exported GGUF in the same engine.

Needs the training stack + ``sentencepiece`` + ``xllamacpp`` in this interpreter and the extracted llama.cpp files
(``.ci/train-setup.sh`` or ``chatos-retrain setup export``); the Unsloth test also needs ``.venv-unsloth``. Anything
missing skips with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import need
from trainjobs import LLAMA_CPP_DIR, TIMEOUT_S, UNSLOTH_PYTHON, trainer_env

from daemon.publish import export
from daemon.publish.converter import ConverterPaths, SetupError, sha256_file, validate_llama_cpp_dir
from daemon.train import templates
from daemon.train.templates import ChatTemplate

pytestmark = [
    pytest.mark.slow,
    # transformers 5.24 deprecation raised inside PEFT when this process builds the adapters and reference logits.
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]

TEMPLATE = {"qwen2": templates.get("qwen-2.5"), "llama": templates.get("llama-3.1")}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A chat-shaped prompt in the Qwen2 vocabulary (ids are taken modulo the vocab size for Llama).
PROMPT_IDS = [151644, 872, 198, 9707, 11, 1879, 0, 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def converter() -> ConverterPaths:
    missing = [m for m in ("torch", "transformers", "peft", "gguf", "sentencepiece", "xllamacpp")
               if not importlib.util.find_spec(m)]
    need(not missing, f"{', '.join(missing)} not installed in {sys.executable}: run .ci/train-setup.sh")
    try:
        return validate_llama_cpp_dir(LLAMA_CPP_DIR)
    except SetupError as e:
        need(False, f"{e}: run `chatos-retrain setup export`")
        raise  # unreachable: need() raised


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-weight LoRA adapter per family, saved the way the trainer saves one (adapter + tokenizer with the
    inference template). The Llama tokenizer adds BOS in its post-processor, like the real Llama-3.1 one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapters")
    made = {}
    for family, base in tiny_models.items():
        torch.manual_seed(1)
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
        folder = out / family
        peft_model.save_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(base))
        tok.chat_template = TEMPLATE[family].jinja
        tok.save_pretrained(str(folder))
        made[family] = folder
    _add_bos_like_llama31(made["llama"] / "tokenizer.json")
    return made


def _add_bos_like_llama31(path: Path) -> None:
    data = json.loads(path.read_text())
    bos = next(t["id"] for t in data["added_tokens"] if t["content"] == "<|begin_of_text|>")
    special = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [special, {"Sequence": {"id": "A", "type_id": 0}}, special, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos],
                                                 "tokens": ["<|begin_of_text|>"]}},
    }
    path.write_text(json.dumps(data))


class Run:
    """One merge_export child: its config, exit status, output and result."""

    def __init__(self, cfg: dict[str, Any], returncode: int, stderr: str) -> None:
        self.cfg = cfg
        self.returncode = returncode
        self.stderr = stderr
        self.result: dict[str, Any] = json.loads(Path(cfg["result_path"]).read_text())

    @property
    def out(self) -> Path:
        return Path(self.cfg["out_dir"])

    def outcome(self, template: ChatTemplate) -> export.ExportOutcome:
        return export.outcome(self.returncode, self.result, template)


def plan(tmp: Path, family: str, base: Path, adapter: Path, converter: ConverterPaths, **kw: Any
         ) -> tuple[dict[str, Any], Path]:
    """Write the export config the service would write (``export.merge_config``); returns it and its path."""
    args: dict[str, Any] = {
        "job_id": tmp.name, "backend": "transformers", "base_model": str(base), "adapter_dir": adapter,
        "out_dir": tmp / "out", "template": TEMPLATE[family], "converter": converter, "python": Path(sys.executable),
        "model_name": f"tiny-{family}",
    }
    args.update(kw)
    args["gguf_name"] = export.gguf_filename(f"tiny-{family}", 1, args.get("quantization", "q8_0"))
    cfg = export.merge_config(**args)
    path = tmp / "export.yaml"
    tmp.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return cfg, path


def run_exports(jobs: dict[str, tuple[dict[str, Any], Path, Path]], parallel: int = 2) -> dict[str, Run]:
    """Run the children (name -> (config, config path, interpreter)), ``parallel`` at a time: each spends seconds in
    single-threaded Python (imports, the gguf reader), so two keep a 2-core box busy without thrashing it."""
    pending = list(jobs.items())
    active: dict[str, tuple[dict[str, Any], Path, subprocess.Popen[bytes]]] = {}
    runs: dict[str, Run] = {}
    tick = threading.Event()
    try:
        while pending or active:
            while pending and len(active) < parallel:
                name, (cfg, path, python) = pending.pop(0)
                with (path.parent / "stderr.log").open("wb") as err:
                    proc = subprocess.Popen(export.merge_export_argv(python, path), stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=err, env=trainer_env())
                active[name] = (cfg, path, proc)
            for name, (cfg, path, proc) in list(active.items()):
                if proc.poll() is not None:
                    del active[name]
                    runs[name] = Run(cfg, proc.returncode, (path.parent / "stderr.log").read_text(errors="replace"))
            tick.wait(0.2)
    finally:
        for _, _, proc in active.values():
            proc.kill()
            proc.wait()
    return runs


@pytest.fixture(scope="module")
def runs(
    tiny_models: dict[str, Path], adapters: dict[str, Path], converter: ConverterPaths,
    tmp_path_factory: pytest.TempPathFactory, fake_quantize: tuple[Path, Path],
) -> dict[str, Run]:
    """Every export these tests judge, run concurrently once."""
    root = tmp_path_factory.mktemp("exports")
    qwen, llama = (tiny_models["qwen2"], adapters["qwen2"]), (tiny_models["llama"], adapters["llama"])
    bad_adapter = root / "adapter-unknown-bpe"
    shutil.copytree(adapters["llama"], bad_adapter)
    _unknown_pre_tokenizer(bad_adapter / "tokenizer.json")
    specs: dict[str, tuple[str, Path, Path, dict[str, Any]]] = {
        "qwen2-f16": ("qwen2", *qwen, {"quantization": "f16"}),
        "qwen2-q8_0": ("qwen2", *qwen, {"quantization": "q8_0"}),
        "llama-q4_k_m": ("llama", *llama, {"quantization": "q4_k_m", "quantize_bin": fake_quantize[0]}),
        "llama-unknown-bpe": ("llama", llama[0], bad_adapter, {"quantization": "f16"}),
    }
    if UNSLOTH_PYTHON.exists():
        specs["qwen2-unsloth"] = ("qwen2", *qwen, {"quantization": "q8_0", "backend": "unsloth",
                                                "python": UNSLOTH_PYTHON})
    specs["qwen2-corrupted"] = ("qwen2", *qwen, {"quantization": "q8_0"})
    jobs = {}
    for name, (family, base, adapter, kw) in specs.items():
        cfg, path = plan(root / name, family, base, adapter, converter, **kw)
        if name == "qwen2-corrupted":
            cfg = _corrupt_after_convert(cfg, path, root / "corrupting-converter.py")
        jobs[name] = (cfg, path, Path(kw.get("python", sys.executable)))
    return run_exports(jobs)


def _corrupt_after_convert(cfg: dict[str, Any], path: Path, wrapper: Path) -> dict[str, Any]:
    """The test's seam (nothing in the service's config can ask for it): the converter's argv runs behind a wrapper
    that, once the real converter has written a good GGUF, corrupts it in place: its header then claims one more
    transformer block than the file holds. The gguf reader still reads every fact the service checks (a truncated
    file it would refuse itself); only loading the model shows the file is broken, so llama.cpp must refuse it."""
    wrapper.write_text(
        "import subprocess, sys\n"
        "import gguf\n"
        "code = subprocess.call(sys.argv[1:])\n"
        "if code == 0:\n"
        "    r = gguf.GGUFReader(sys.argv[sys.argv.index('--outfile') + 1], 'r+')\n"
        "    f = r.get_field(r.get_field('general.architecture').contents() + '.block_count')\n"
        "    f.parts[f.data[0]][0] += 1\n"
        "    r.data.flush()\n"
        "sys.exit(code)\n"
    )
    cfg = {**cfg, "converter": {**cfg["converter"], "argv": [sys.executable, str(wrapper), *cfg["converter"]["argv"]]}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return cfg


@pytest.fixture(scope="module")
def fake_quantize(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ``llama-quantize`` stand-in that checks its argv, records it, and copies the f16 GGUF."""
    folder = tmp_path_factory.mktemp("fake-quantize")
    calls = folder / "calls.jsonl"
    fake = folder / "llama-quantize"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, shutil, sys\n"
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "assert len(sys.argv) == 4 and sys.argv[3] == 'Q4_K_M', sys.argv\n"
        "assert open(sys.argv[1], 'rb').read(4) == b'GGUF'\n"
        "shutil.copyfile(sys.argv[1], sys.argv[2])\n"
    )
    fake.chmod(0o755)
    return fake, calls


def _unknown_pre_tokenizer(path: Path) -> None:
    """A BPE pre-tokenizer llama.cpp does not know (its hash of a test text matches no known tokenizer)."""
    data = json.loads(path.read_text())
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[0-9]"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    path.write_text(json.dumps(data))


def assert_clean(run: Run) -> None:
    """After a run, success or not: no merged copy and no partial GGUF left (the log stays)."""
    assert not Path(run.cfg["work_dir"]).exists()
    assert not list(run.out.glob("*.partial.gguf")), sorted(p.name for p in run.out.iterdir())
    assert not list(run.out.glob("*.adapter"))


def reference_logits(base: Path, adapter: Path) -> Any:
    """Logits of base + adapter, unmerged, in float32: what every export must reproduce."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    ids = torch.tensor([PROMPT_IDS]) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


def gguf_logits(folder: Path, name: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT_IDS]) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


def test_qwen2_f16_and_q8_0(runs: dict[str, Run], tiny_models: dict[str, Path], adapters: dict[str, Path]) -> None:
    tmpl = TEMPLATE["qwen2"]
    for q in ("f16", "q8_0"):
        run = runs[f"qwen2-{q}"]
        assert run.returncode == 0, run.stderr[-4000:]
        verdict = run.outcome(tmpl)
        assert verdict.ok, verdict.reason
        facts = run.result["gguf"]
        gguf = Path(facts["path"])
        assert gguf == run.out / f"tiny-qwen2-v1.{q}.gguf" and gguf.is_file()
        assert verdict.sha256 == sha256_file(gguf) and verdict.size == gguf.stat().st_size
        assert facts["architecture"] == "qwen2" and facts["tensor_count"] > 0 and facts["name"] == "tiny-qwen2"
        assert facts["chat_template"] == tmpl.jinja and facts["chat_template_equal"] is True
        assert facts["tokenizer_pre"] == "qwen2" and facts["vocab_size"] == 151936
        assert facts["file_type"] == {"f16": 1, "q8_0": 7}[q]
        assert run.result["merge"]["bos_stripped"] is False and run.result["merge"]["dtype"] == "float32"
        assert set(run.result["timings"]) >= {"import_s", "merge_s", "convert_s", "verify_s", "total_s"}
        assert (run.out / "convert.log").is_file()
        assert_clean(run)
        print(f"qwen2 {q}: {run.result['timings']}, {facts['size']} bytes")
    assert runs["qwen2-q8_0"].result["gguf"]["size"] < runs["qwen2-f16"].result["gguf"]["size"]

    # The f16 GGUF, loaded by transformers, computes what base + adapter compute.
    want = reference_logits(tiny_models["qwen2"], adapters["qwen2"])
    got = gguf_logits(runs["qwen2-f16"].out, Path(runs["qwen2-f16"].result["gguf"]["path"]).name)
    diff = float((want - got).abs().max())
    assert diff < 2e-3 * max(1.0, float(want.abs().max())), diff


def test_llama3_strips_bos_and_quantizes_through_f16(runs: dict[str, Run], fake_quantize: tuple[Path, Path]) -> None:
    """The Llama-3.1 template path: the tokenizer adds BOS, so the embedded template loses its leading
    ``{{ bos_token }}``; a K-quant goes f16 -> llama-quantize (a fake binary that checks its argv)."""
    run, tmpl = runs["llama-q4_k_m"], TEMPLATE["llama"]
    assert run.returncode == 0, run.stderr[-4000:]
    verdict = run.outcome(tmpl)
    assert verdict.ok, verdict.reason
    facts = run.result["gguf"]
    assert facts["architecture"] == "llama" and facts["add_bos_token"] is True
    assert facts["chat_template"] == export.strip_leading_bos(tmpl.jinja) != tmpl.jinja
    assert not facts["chat_template"].lstrip().startswith("{{- bos_token")
    assert run.result["merge"]["bos_stripped"] is True and run.result["timings"]["quantize_s"] is not None
    argv = [json.loads(line) for line in fake_quantize[1].read_text().splitlines()]
    assert argv == [[run.cfg["converter"]["output"], run.cfg["quantize"]["output"], "Q4_K_M"]]
    assert Path(facts["path"]).name == "tiny-llama-v1.q4_k_m.gguf"
    assert_clean(run)
    print(f"llama q4_k_m (fake quantizer): {run.result['timings']}")

    # The service's own check catches the double BOS an unstripped template would cause.
    unstripped = {**run.result, "gguf": {**facts, "chat_template": tmpl.jinja}}
    assert "double BOS" in export.outcome(0, unstripped, tmpl).reason


def test_unknown_pre_tokenizer_is_one_line_exit_3(runs: dict[str, Run]) -> None:
    """A BPE tokenizer llama.cpp does not know: the real converter refuses it; the operator gets one line."""
    run = runs["llama-unknown-bpe"]
    assert run.returncode == 3, run.stderr[-4000:]
    assert run.result["status"] == "failed" and "\n" not in run.result["error"]
    assert run.result["error"].startswith("the converter does not know this tokenizer's BPE pre-tokenizer (chkhsh ")
    verdict = run.outcome(TEMPLATE["llama"])
    assert not verdict.ok and verdict.reason.startswith("the GGUF converter failed: the converter does not know")
    assert "NotImplementedError" in (run.out / "convert.log").read_text()  # the details stay in the log
    assert "Traceback" not in run.stderr
    assert_clean(run)
    assert not list(run.out.glob("*.gguf"))


def test_unsloth_backend_merges_through_peft_on_the_cpu(runs: dict[str, Run]) -> None:
    """One merge path for both backends: under the Unsloth interpreter too, PEFT's merge_and_unload, on the CPU
    (``merge_device: auto`` and no GPU)."""
    need(UNSLOTH_PYTHON.exists(), f"{UNSLOTH_PYTHON} missing: run .ci/train-setup.sh")
    run, tmpl = runs["qwen2-unsloth"], TEMPLATE["qwen2"]
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.outcome(tmpl).ok, run.outcome(tmpl).reason
    assert run.result["backend"] == "unsloth" and run.result["versions"]["unsloth"]
    assert run.result["gguf"]["architecture"] == "qwen2" and run.result["gguf"]["chat_template"] == tmpl.jinja
    assert run.result["merge"]["parameters"] == 9798208  # the base's, without the LoRA matrices
    assert run.result["merge"]["device"] == "cpu"
    assert_clean(run)
    print(f"qwen2 q8_0 via unsloth: {run.result['timings']}")


def test_sigterm_stops_the_child_and_its_converter(
    tiny_models: dict[str, Path], adapters: dict[str, Path], converter: ConverterPaths, tmp_path: Path
) -> None:
    """What the runner does on timeout or cancel: SIGTERM to the group; the child cleans up and exits 143."""
    cfg, path = plan(tmp_path / "job", "qwen2", tiny_models["qwen2"], adapters["qwen2"], converter,
                     quantization="f16")
    log = Path(cfg["log_path"])
    with (tmp_path / "stderr").open("wb") as err:
        proc = subprocess.Popen(export.merge_export_argv(Path(sys.executable), path), stdout=subprocess.DEVNULL,
                                stderr=err, env=trainer_env(), start_new_session=True)
    try:
        waited = threading.Event()
        for _ in range(int(TIMEOUT_S / 0.2)):  # until the converter child has started
            if log.is_file() or proc.poll() is not None:
                break
            waited.wait(0.2)
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 128 + signal.SIGTERM
    result = json.loads(Path(cfg["result_path"]).read_text())
    assert result["status"] == "failed" and result["error"] == "terminated (SIGTERM)"
    assert not Path(cfg["work_dir"]).exists() and not list(Path(cfg["out_dir"]).glob("*.gguf"))


# -- llama.cpp's engine ---------------------------------------------------------------------------------------------


def _export_engine() -> Any:
    """The child's ``export_engine`` part (importable once ``merge_export`` has put its folder on ``sys.path``)."""
    import importlib

    from daemon.trainer import merge_export  # noqa: F401

    return importlib.import_module("export_engine")


def test_the_engine_loads_every_export_and_generates(runs: dict[str, Run]) -> None:
    """Step 6 for real: every exported GGUF loads in llama.cpp and answers the smoke prompt through its embedded
    template with the template's stops (tiny random models: loaded and generated is all that is asked)."""
    for name, family in (("qwen2-f16", "qwen2"), ("qwen2-q8_0", "qwen2"), ("llama-q4_k_m", "llama")):
        run = runs[name]
        assert run.returncode == 0, run.stderr[-4000:]
        engine = run.result["engine"]
        assert engine["enabled"] is True and engine["loaded"] is True, engine
        assert engine["version"] == "2026.10.11549" and 0 < engine["load_s"] < 60
        assert engine["stop"] == list(TEMPLATE[family].stop) and engine["n_ctx"] == 2048
        [smoke] = engine["answers"]
        assert smoke["id"] == "smoke" and smoke["tokens"] > 0 and isinstance(smoke["content"], str)
        assert smoke["finish_reason"] in ("stop", "length") and smoke["stopped"] == (smoke["finish_reason"] == "stop")
        assert run.result["timings"]["engine_s"] >= engine["load_s"]
        assert run.result["versions"]["xllamacpp"] == "2026.10.11549"
        verdict = run.outcome(TEMPLATE[family])
        assert verdict.ok and verdict.engine == engine, verdict.reason
        assert "[merge_export] llama.cpp loaded the GGUF in" in run.stderr
        print(f"{name}: engine {engine['load_s']}s load, smoke {smoke}")


def test_a_truncated_gguf_is_refused_by_the_engine_load(runs: dict[str, Run], tmp_path: Path) -> None:
    """``export_engine`` on a copy of a good export cut in its tensor data: one line with llama.cpp's reason."""
    engine = _export_engine()
    good = Path(runs["qwen2-q8_0"].result["gguf"]["path"])
    cut = tmp_path / "cut.gguf"
    with good.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(good.stat().st_size // 2))
    log = tmp_path / "engine.log"
    with pytest.raises(Exception) as e:
        engine.check(engine.engine_settings({"engine": {"n_ctx": 256, "threads": 1}}), cut, log)
    assert type(e.value).__name__ == "EngineError" and e.value.exit_code == 6  # type: ignore[attr-defined]
    assert str(e.value).startswith("llama.cpp could not load the GGUF: tensor '")
    assert str(e.value).endswith("data is not within the file bounds, model is corrupted or incomplete")
    assert "\n" not in str(e.value) and "error loading model" in log.read_text()
    assert not list(tmp_path.glob("cut.gguf.engine*"))  # the spec and answer files are gone
    # the good file passes the same check, and a prompt from engine.prompts is answered raw
    prompts = [{"id": "r1", "messages": [{"role": "user", "content": "Sort: list dict"}], "max_tokens": 5}]
    facts = engine.check(engine.engine_settings({"engine": {"n_ctx": 256, "threads": 1, "prompts": prompts}}),
                         good, log)
    assert [a["id"] for a in facts["answers"]] == ["smoke", "r1"] and 0 < facts["answers"][1]["tokens"] <= 5


def test_a_gguf_corrupted_after_convert_fails_the_export_and_never_reaches_ollama(runs: dict[str, Run]) -> None:
    """A GGUF the converter wrote, then corrupted (``_corrupt_after_convert``): the gguf reader's facts pass, the
    engine load fails the export with exit 6 and one line, the file is deleted, and the service's verdict refuses it
    (``daemon.cycle.exporting`` registers only an ``ok`` outcome with a GGUF path)."""
    run = runs["qwen2-corrupted"]
    assert run.returncode == 6, run.stderr[-4000:]
    assert run.result["status"] == "failed" and "\n" not in run.result["error"]
    assert run.result["error"] == ("llama.cpp could not load the GGUF: check_tensor_dims: tensor "
                                   "'blk.2.attn_norm.weight' not found")
    verdict = run.outcome(TEMPLATE["qwen2"])
    assert not verdict.ok and verdict.gguf_path is None and verdict.sha256 is None  # nothing to register
    assert verdict.reason == f"the llama.cpp engine check failed: {run.result['error']}"
    assert not list(run.out.glob("*.gguf")) and "Traceback" not in run.stderr
    assert "error loading model" in (run.out / "convert.log").read_text()  # llama.cpp's own lines stay in the log
    assert_clean(run)


def _register(client: Any, gguf: Path, name: str, stop: list[str]) -> None:
    digest = client.ensure_blob(gguf)
    client.create(name, {"model.gguf": digest}, template=TEMPLATE["qwen2"].ollama_template,
                  parameters={"stop": stop, "temperature": 0})


def test_the_standin_runs_the_export_and_honours_a_crafted_stop(runs: dict[str, Run], tmp_path: Path) -> None:
    """The stand-in's /api/chat in xllamacpp on the real export: greedy output cut by num_predict is "length"; a
    stop string taken from that output ends the answer there with "stop", and the registration's smoke check
    (``ollama.smoke_problems``) passes with require_stop; without the stop it fails with its reason."""
    from ollama_standin import StandinServer

    from daemon.publish import ollama
    from daemon.publish.ollama_client import OllamaClient

    gguf = Path(runs["qwen2-q8_0"].result["gguf"]["path"])
    msgs = [{"role": "user", "content": "Sort: list dict file loop"}]
    with StandinServer(tmp_path / "ollama", use_llama=True) as srv, \
            OllamaClient(srv.url, timeout_s=120, long_timeout_s=120) as client:
        _register(client, gguf, "tiny:v1", list(TEMPLATE["qwen2"].stop))
        free = client.chat("tiny:v1", msgs, num_predict=24)
        assert "standin" not in free and free["done_reason"] == "length" and free["eval_count"] == 24, free
        assert ollama.smoke_problems(free, require_stop=True) == [
            "answer ran to num_predict without a stop (done_reason 'length'): check the template and stops"]
        text = free["message"]["content"]
        stop = _crafted_stop(text)
        assert stop is not None, f"no usable stop string in the greedy output {text!r}"
        _register(client, gguf, "tiny:v2", [stop])
        stopped = client.chat("tiny:v2", msgs, num_predict=24)
        assert stopped["done_reason"] == "stop" and stopped["eval_count"] < 24, stopped
        assert stopped["message"]["content"] == text[:text.index(stop)], (stopped, stop)
        assert ollama.smoke_problems(stopped, require_stop=True) == []
        print(f"greedy {text!r}; crafted stop {stop!r} -> {stopped['message']['content']!r}")


def _crafted_stop(text: str) -> str | None:
    """A word of ``text`` (not its first) where it first occurs: stopping on it leaves a non-empty answer."""
    for m in list(re.finditer(r"\S+", text))[1:]:
        if text.find(m.group()) == m.start() and text[:m.start()].strip():
            return m.group()
    return None


def test_registration_smoke_check_runs_the_export_for_real(runs: dict[str, Run], tmp_path: Path, state: Any,
                                                          make_settings: Any) -> None:
    """``registry.register`` against the stand-in running the GGUF in xllamacpp: the tiny model rambles to
    num_predict, so ``export.smoke.require_stop`` true fails the registration with its reason, and false registers."""
    from ollama_standin import StandinServer

    from daemon.publish import ollama_client, registry

    facts = runs["qwen2-q8_0"].result["gguf"]
    with StandinServer(tmp_path / "ollama", use_llama=True) as srv:
        for version, require_stop in ((1, True), (2, False)):
            s = make_settings(ollama={"host": srv.url, "model_name": "tiny", "timeout_s": 120},
                              export={"smoke": {"require_stop": require_stop, "num_predict": 8}})
            v = registry.add_version(state, job_id=f"j{version}", dataset_version=version, manifest_hash=None,
                                     gguf_path=facts["path"], gguf_sha256=f"sha256:{facts['sha256']}",
                                     gguf_size=facts["size"], architecture="qwen2", chat_template="qwen-2.5",
                                     eval_numbers={}, settings=s)
            row = registry.register(s, state, v)
            if require_stop:
                assert row["status"] == "failed", row
                assert row["last_error"].endswith("smoke test failed: answer ran to num_predict without a stop "
                                                  "(done_reason 'length'): check the template and stops"), row
            else:
                assert row["status"] == "registered", row
        with ollama_client.OllamaClient(srv.url) as client:  # v2 and latest, made from the real GGUF; v1 cleaned up
            assert {m["name"] for m in client.tags()} == {"tiny:v2", "tiny:latest"}
