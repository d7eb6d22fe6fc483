"""The trainer's GPU branches, driven on a machine without a GPU.

There is no GPU here (nor in CI), so the Unsloth builder and the 4-bit TRL builder would never run their GPU code.
These tests run it against recording fakes at one seam each, and only there:

- the card: ``CHATOS_RETRAIN_FAKE_GPU`` (``qlora_gpu``'s documented test seam) reports compute capability 7.0, 7.5,
  8.0, 8.9 or 9.0;
- ``unsloth`` / ``unsloth.chat_templates``: fake modules in ``sys.modules`` whose ``FastLanguageModel`` records the
  keywords of ``from_pretrained`` / ``get_peft_model`` and whose ``get_chat_template`` records being called (it
  must not be: it rewrites the vocabulary, issue 18 item 1);
- ``transformers.BitsAndBytesConfig``, ``AutoModelForCausalLM`` / ``AutoTokenizer`` and ``trl.SFTConfig`` /
  ``SFTTrainer``: recorders (a real 4-bit load, a real SFTConfig with fp16, or a CUDA trainer cannot be built
  without a GPU). The 4-bit path's model is a real tiny Qwen2 in 16 bits, so ``prepare_4bit`` and PEFT run for real.

A wrong keyword, a reintroduced vocabulary edit, a remapped base or the wrong precision for a card fails here.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

TRAINER = Path(__file__).resolve().parents[2] / "daemon" / "trainer"
if str(TRAINER) not in sys.path:
    sys.path.insert(0, str(TRAINER))  # as each script does before importing its parts

import qlora_backends  # noqa: E402
import qlora_config  # noqa: E402
import qlora_gpu  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("peft")  # first: importing peft 0.21 puts another object at sys.modules["transformers"]
pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")  # the module a `from transformers import X` now reads

CAPABILITIES = [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16")]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EXAMPLE = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def job_config(tmp_path: Path, backend: str) -> dict[str, Any]:
    raw = {
        "backend": backend,
        "model": {"name": "Qwen/Qwen2.5-7B", "chat_template": "qwen-2.5", "load_in_4bit": True},
        "template": {"name": "qwen-2.5", "jinja": "{{ messages }}", "instruction_part": "<u>", "response_part": "<a>",
                     "stop": ["<e>"]},
        "dataset": {"train_path": str(tmp_path / "t.jsonl"), "eval_path": str(tmp_path / "e.jsonl")},
        "training": {"output_dir": str(tmp_path / "out")},
        "metrics": {"output_path": str(tmp_path / "metrics.jsonl")},
    }
    cfg, problems = qlora_config.validate(raw)
    assert problems == []
    return cfg


class Calls:
    """What the fakes were called with, by name."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[dict[str, Any]]] = {}

    def add(self, _name: str, **kwargs: Any) -> None:
        self.by_name.setdefault(_name, []).append(kwargs)

    def one(self, name: str) -> dict[str, Any]:
        got = self.by_name.get(name, [])
        assert len(got) == 1, f"{name}: {len(got)} calls"
        return got[0]


class FakeTokenizer:
    chat_template: str | None = None

    def apply_chat_template(self, messages: Any, tokenize: bool = False, **kw: Any) -> str:
        return "text"


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """The recorders of trl, transformers and a fake ``unsloth`` package, installed for one test."""
    rec = Calls()

    class RecordingSFTConfig(trl.SFTConfig):  # type: ignore[misc]  # a dataclass: _checkpointing reads its fields
        def __init__(self, **kwargs: Any) -> None:
            rec.add("SFTConfig", **kwargs)

    class RecordingSFTTrainer:
        def __init__(self, **kwargs: Any) -> None:
            rec.add("SFTTrainer", **kwargs)
            self.eval_dataset = kwargs.get("eval_dataset")

    class RecordingBnB:
        def __init__(self, **kwargs: Any) -> None:
            rec.add("BitsAndBytesConfig", **kwargs)

    class FastLanguageModel:
        @staticmethod
        def from_pretrained(**kwargs: Any) -> tuple[Any, Any]:
            rec.add("from_pretrained", **kwargs)
            model = types.SimpleNamespace(dtype=kwargs.get("dtype"), is_loaded_in_4bit=kwargs.get("load_in_4bit"),
                                          config=types.SimpleNamespace(_attn_implementation="sdpa"),
                                          parameters=lambda: iter(()))
            return model, FakeTokenizer()

        @staticmethod
        def get_peft_model(model: Any, **kwargs: Any) -> Any:
            rec.add("get_peft_model", **kwargs)
            return model

    def get_chat_template(tok: Any, **kwargs: Any) -> Any:
        rec.add("get_chat_template", **kwargs)
        return tok

    def train_on_responses_only(trainer: Any, **kwargs: Any) -> Any:
        rec.add("train_on_responses_only", **kwargs)
        return trainer

    unsloth = types.ModuleType("unsloth")
    unsloth.FastLanguageModel = FastLanguageModel  # type: ignore[attr-defined]
    unsloth.is_bfloat16_supported = lambda: True  # type: ignore[attr-defined]  # emulation's answer: never asked
    templates = types.ModuleType("unsloth.chat_templates")
    templates.get_chat_template = get_chat_template  # type: ignore[attr-defined]
    templates.train_on_responses_only = train_on_responses_only  # type: ignore[attr-defined]
    unsloth.chat_templates = templates  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unsloth", unsloth)
    monkeypatch.setitem(sys.modules, "unsloth.chat_templates", templates)
    monkeypatch.setattr(trl, "SFTConfig", RecordingSFTConfig)
    monkeypatch.setattr(trl, "SFTTrainer", RecordingSFTTrainer)
    monkeypatch.setattr(transformers, "BitsAndBytesConfig", RecordingBnB)
    monkeypatch.setattr(qlora_backends, "device", lambda cuda: "cuda:fake" if cuda else "cpu")

    def prepared(tok: Any, cfg: dict[str, Any], train: Any, evals: Any, extras: Any) -> Any:
        rec.add("prepared", train=train, evals=evals)  # the data seam: tokenizing is tests/e2e/test_tokens_cpu.py's
        return ["train-set"], ["eval-set"], {}, {}

    monkeypatch.setattr(qlora_backends, "prepared", prepared)
    return rec


def on_card(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": list(capability), "free": 24 * 2**30,
                                                          "total": 24 * 2**30}))


# ------------------------------------------------------------------------------------------------- Unsloth


@pytest.mark.parametrize(("capability", "prec"), CAPABILITIES)
def test_unsloth_loads_the_configured_base_in_4bit_at_the_cards_precision(
        calls: Calls, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capability: tuple[int, int], prec: str) -> None:
    on_card(monkeypatch, capability)
    cfg = job_config(tmp_path, "unsloth")
    built = qlora_backends.unsloth_trainer(cfg, [EXAMPLE] * 2, [EXAMPLE], {}, True, None)
    load = calls.one("from_pretrained")
    assert load["model_name"] == "Qwen/Qwen2.5-7B" and load["use_exact_model_name"] is True
    assert load["load_in_4bit"] is True and load["dtype"] == DTYPES[prec]
    assert load["max_seq_length"] == cfg["model"]["max_seq_length"]
    lora = calls.one("get_peft_model")
    assert (lora["r"], lora["lora_alpha"], lora["target_modules"]) == (16, 16.0, qlora_config.DEFAULT_TARGET_MODULES)
    assert lora["use_gradient_checkpointing"] == "unsloth" and lora["random_state"] == 3407
    args = calls.one("SFTConfig")
    assert (args["bf16"], args["fp16"]) == (prec == "bf16", prec == "fp16") and args["use_cpu"] is False
    assert (built.args["bf16"], built.args["fp16"]) == (prec == "bf16", prec == "fp16")  # what kto/dpo share
    assert built.info["load_in_4bit"] is True and built.info["precision"] == prec  # read from what was loaded
    assert args["dataset_kwargs"] == {"skip_prepare_dataset": True}  # tokenized once, in our code
    assert calls.one("SFTTrainer")["train_dataset"] == ["train-set"] and "train_on_responses_only" not in calls.by_name
    assert "get_chat_template" not in calls.by_name  # no vocabulary edit (issue 18 item 1)
    assert built.tok.chat_template == cfg["template"]["jinja"]


def test_unsloth_on_the_cpu_loads_full_precision(calls: Calls, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": None}))
    qlora_backends.unsloth_trainer(job_config(tmp_path, "unsloth"), [EXAMPLE] * 2, [EXAMPLE], {}, False, None)
    load = calls.one("from_pretrained")
    assert load["load_in_4bit"] is False and load["dtype"] is None and load["use_exact_model_name"] is True
    args = calls.one("SFTConfig")
    assert (args["bf16"], args["fp16"], args["use_cpu"]) == (False, False, True)


def test_gpu_fp32_on_a_bf16_card(calls: Calls, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    on_card(monkeypatch, (9, 0))
    cfg = job_config(tmp_path, "unsloth")
    cfg["training"]["gpu_fp32"] = True
    qlora_backends.unsloth_trainer(cfg, [EXAMPLE] * 2, [EXAMPLE], {}, True, None)
    assert calls.one("from_pretrained")["dtype"] == torch.float32
    assert (calls.one("SFTConfig")["bf16"], calls.one("SFTConfig")["fp16"]) == (False, False)


def test_a_card_below_70_fails_the_unsloth_builder(calls: Calls, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    on_card(monkeypatch, (6, 1))
    with pytest.raises(qlora_gpu.ConfigError, match=r"6\.1 is below 7\.0"):
        qlora_backends.unsloth_trainer(job_config(tmp_path, "unsloth"), [EXAMPLE] * 2, [EXAMPLE], {}, True, None)


# ------------------------------------------------------------------------------------------- the 4-bit TRL path


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21 asks
@pytest.mark.parametrize(("capability", "prec"), CAPABILITIES)
def test_the_4bit_trl_path_quantizes_at_the_cards_precision(
        calls: Calls, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capability: tuple[int, int], prec: str) -> None:
    on_card(monkeypatch, capability)
    monkeypatch.setattr(qlora_backends, "importlib",
                        types.SimpleNamespace(util=types.SimpleNamespace(find_spec=lambda name: object())))

    def tiny(name: str, **kwargs: Any) -> Any:  # a real 16-bit model stands in for the NF4 one
        calls.add("AutoModelForCausalLM", name=name, **kwargs)
        from tinymodel import SHAPE

        shape = {**SHAPE, "tie_word_embeddings": False}
        model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**shape, vocab_size=256)).to(
            kwargs["dtype"])
        model.is_loaded_in_4bit = "quantization_config" in kwargs  # what a real NF4 load reports
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", tiny)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name, **kw: FakeTokenizer())
    cfg = job_config(tmp_path, "transformers")
    built = qlora_backends.transformers_trainer(cfg, [EXAMPLE] * 2, [EXAMPLE], {}, True, None)
    load = calls.one("AutoModelForCausalLM")
    assert load["name"] == "Qwen/Qwen2.5-7B" and load["dtype"] == DTYPES[prec] and load["device_map"] == {"": 0}
    bnb = calls.one("BitsAndBytesConfig")
    assert bnb == {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                   "bnb_4bit_compute_dtype": DTYPES[prec]}
    args = calls.one("SFTConfig")
    assert (args["bf16"], args["fp16"]) == (prec == "bf16", prec == "fp16") and args["use_cpu"] is False
    assert built.info["load_in_4bit"] is True and built.info["dtype"] == "nf4+" + qlora_gpu.dtype_name(prec)
    model = built.model
    assert model.get_input_embeddings().weight.dtype == DTYPES[prec]  # prepare_4bit, not peft's fp32 upcast
    assert model.get_output_embeddings().weight.dtype == DTYPES[prec]
    trainable = {p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {torch.float32}  # the LoRA


# ------------------------------------------------------------------------------------------- torch's settings


@pytest.mark.parametrize(("capability", "cudnn_off"), [((8, 0), False), ((8, 9), False), ((9, 0), True),
                                                        ((12, 0), True)])
def test_cudnn_attention_is_turned_off_on_sm90_and_newer(monkeypatch: pytest.MonkeyPatch,
                                                         capability: tuple[int, int], cudnn_off: bool) -> None:
    """PyTorch >= 2.10 prefers cuDNN attention on sm90+ and builds a plan for every new shape (~1 s each): the
    trainer turns it off there, and only there; the threads follow OMP_NUM_THREADS or the cores (a GPU job keeps
    at most 4)."""
    import qlora_run

    on_card(monkeypatch, capability)
    calls: list[bool] = []
    threads: list[int] = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    qlora_run.tune_torch(torch, True)
    assert calls == ([False] if cudnn_off else [])
    assert threads and 1 <= threads[0] <= 4
    calls.clear()
    threads.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    qlora_run.tune_torch(torch, False)  # the CPU: no cuDNN question; the runner's thread count is kept
    assert calls == [] and threads == []


def test_an_out_of_memory_report_carries_the_cards_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": [8, 6], "free": 2 * qlora_gpu.GIB,
                                                          "total": 12 * qlora_gpu.GIB}))
    assert qlora_gpu.oom_numbers() == " (2.0 GiB free of 12.0)"  # torch sees no CUDA here: no peak to add
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": None}))
    assert qlora_gpu.oom_numbers() == ""
