"""GGUF export end to end on CPU: tiny Qwen2 / Llama models with real vocabularies, a LoRA adapter with random
weights (training is tested elsewhere), the real ``merge_export.py`` child running the real converter, the GGUF read
back by the ``gguf`` reader and by transformers, and the verdict by ``daemon.publish.export.outcome``.

Needs the training stack + ``sentencepiece`` in this interpreter and the extracted llama.cpp files
(``.ci/train-setup.sh`` or ``chatos-retrain setup export``); the Unsloth test also needs ``.venv-unsloth``. Anything
missing skips with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
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
    missing = [m for m in ("torch", "transformers", "peft", "gguf", "sentencepiece") if not importlib.util.find_spec(m)]
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
    jobs = {}
    for name, (family, base, adapter, kw) in specs.items():
        cfg, path = plan(root / name, family, base, adapter, converter, **kw)
        jobs[name] = (cfg, path, Path(kw.get("python", sys.executable)))
    return run_exports(jobs)


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


def test_unsloth_backend_merges_with_save_pretrained_merged(runs: dict[str, Run]) -> None:
    need(UNSLOTH_PYTHON.exists(), f"{UNSLOTH_PYTHON} missing: run .ci/train-setup.sh")
    run, tmpl = runs["qwen2-unsloth"], TEMPLATE["qwen2"]
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.outcome(tmpl).ok, run.outcome(tmpl).reason
    assert run.result["backend"] == "unsloth" and run.result["versions"]["unsloth"]
    assert run.result["gguf"]["architecture"] == "qwen2" and run.result["gguf"]["chat_template"] == tmpl.jinja
    assert run.result["merge"]["parameters"] == 9798208  # the base's, without the LoRA matrices
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
