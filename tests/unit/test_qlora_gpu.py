"""The trainer's GPU rules (``daemon/trainer/qlora_gpu.py``), pure and on the CPU: the card seam, the precision rule,
the memory estimate against Unsloth's published QLoRA minimums, ``prepare_4bit`` on a tiny 16-bit model, the merge
device, and a hub id missing from the local cache failing the trainer in its first seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

TRAINER = Path(__file__).resolve().parents[2] / "daemon" / "trainer"
if str(TRAINER) not in sys.path:
    sys.path.insert(0, str(TRAINER))  # as each script does before importing its parts

import qlora_gpu  # noqa: E402
from qlora_gpu import GIB, estimate, merge_device, precision  # noqa: E402
from trainer_common import ConfigError  # noqa: E402

# ---------------------------------------------------------------------------------------------------- the seam


def test_the_fake_gpu_seam_answers_both_questions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": [7, 5], "free": 123, "total": 456}))
    assert qlora_gpu.cuda_capability() == (7, 5)
    assert qlora_gpu.gpu_memory() == (123, 456)
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": None}))
    assert qlora_gpu.cuda_capability() is None
    assert qlora_gpu.gpu_memory() is None


def test_without_the_seam_this_cpu_machine_has_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    monkeypatch.delenv(qlora_gpu.FAKE_GPU_ENV, raising=False)
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert qlora_gpu.cuda_capability() is None and qlora_gpu.gpu_memory() is None


# ----------------------------------------------------------------------------------------------- the precision


@pytest.mark.parametrize(("capability", "expected"), [
    (None, "fp32"), ((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"), ((8, 9), "bf16"),
    ((9, 0), "bf16"), ((12, 0), "bf16"),
])
def test_precision_follows_the_capability(capability: tuple[int, int] | None, expected: str) -> None:
    assert precision(capability) == expected
    assert qlora_gpu.trainer_flags(expected) == {"bf16": expected == "bf16", "fp16": expected == "fp16"}


@pytest.mark.parametrize("capability", [(7, 0), (8, 0), (9, 0)])
def test_gpu_fp32_forces_fp32_on_a_gpu(capability: tuple[int, int]) -> None:
    assert precision(capability, fp32=True) == "fp32"
    assert qlora_gpu.trainer_flags("fp32") == {"bf16": False, "fp16": False}


@pytest.mark.parametrize("capability", [(6, 1), (5, 2), (3, 7)])
def test_a_card_below_unsloths_minimum_is_a_config_error(capability: tuple[int, int]) -> None:
    with pytest.raises(ConfigError, match=r"below 7\.0, Unsloth's documented minimum") as e:
        precision(capability)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_torch_dtypes_of_the_precisions() -> None:
    torch = pytest.importorskip("torch")
    assert [qlora_gpu.torch_dtype(p) for p in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16,
                                                                            torch.float32]


def test_run_precision_reads_the_card_and_the_config_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": [7, 5]}))
    assert qlora_gpu.run_precision({"training": {"gpu_fp32": False}}, cuda=True) == "fp16"
    assert qlora_gpu.run_precision({"training": {"gpu_fp32": True}}, cuda=True) == "fp32"
    assert qlora_gpu.run_precision({"training": {"gpu_fp32": False}}, cuda=False) == "fp32"


# ------------------------------------------------------------------------------------------------ the estimate

# The real config.json shapes (hidden_size ... tie_word_embeddings), written out here and not taken from the module.
QWEN25_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944, "vocab_size": 152064,
             "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False}
LLAMA31_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256,
              "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
QWEN25_14B = {"hidden_size": 5120, "num_hidden_layers": 48, "intermediate_size": 13824, "vocab_size": 152064,
              "num_attention_heads": 40, "num_key_value_heads": 8, "tie_word_embeddings": False}
UNSLOTH_QLORA_GIB = [("7B", QWEN25_7B, 5.0), ("8B", LLAMA31_8B, 6.0), ("14B", QWEN25_14B, 8.5)]
UNSLOTH_DEFAULTS: dict[str, Any] = {"seq_len": 2048, "batch": 2, "lora_r": 16, "four_bit": True,
                                    "gradient_checkpointing": True}


@pytest.mark.parametrize(("name", "shape", "published"), UNSLOTH_QLORA_GIB)
def test_the_estimate_lands_near_unsloths_published_minimum(name: str, shape: dict[str, Any],
                                                             published: float) -> None:
    """Unsloth's table (7B 5 GB, 8B 6 GB, 14B 8.5 GB) is that of a 32k vocabulary: on that vocabulary every shape
    lands within 25%. The real vocabulary adds exactly its 16-bit embedding and LM head (152k x 3584 x 2 x 2 bytes
    on Qwen2.5-7B: 2 GiB, which no 4-bit scheme here quantizes) and the loss chunk's wider logits; the real 8B, whose
    vocabulary is smallest, still lands within 25%."""
    small = estimate({**shape, "vocab_size": 32000}, **UNSLOTH_DEFAULTS)
    assert abs(small.total_bytes / GIB - published) <= 0.25 * published, small
    real = estimate(shape, **UNSLOTH_DEFAULTS)
    extra_vocab = shape["vocab_size"] - 32000
    untied = 1 if shape["tie_word_embeddings"] else 2
    expected_extra = extra_vocab * shape["hidden_size"] * 2 * untied + 256 * extra_vocab * 4 * 2
    assert real.total_bytes - small.total_bytes == expected_extra
    if name == "8B":
        assert abs(real.total_bytes / GIB - published) <= 0.25 * published, real


def test_the_module_shapes_are_the_real_configs() -> None:
    for key, shape in (("7B", QWEN25_7B), ("8B", LLAMA31_8B), ("14B", QWEN25_14B)):
        assert {k: qlora_gpu.SHAPES[key][k] for k in shape} == shape
    billions = {k: qlora_gpu.parameters(s) / 1e9 for k, s in qlora_gpu.SHAPES.items()}
    assert [round(billions[k], 1) for k in ("0.5B", "1.5B", "3B", "7B", "8B", "14B")] == [0.5, 1.5, 3.1, 7.6, 8.0,
                                                                                          14.8]


def test_the_estimate_parts_and_what_moves_them() -> None:
    base = estimate(QWEN25_7B, 2048, 2)
    assert set(base.parts) == {"weights", "embeddings", "lora+optimizer", "activations", "logits", "overhead"}
    assert base.total_bytes == sum(base.parts.values())
    assert base.parts["embeddings"] == 2 * 152064 * 3584 * 2  # untied, 16-bit
    # r 16 on the seven projections of Qwen2.5-7B: 40,370,176 LoRA parameters (PEFT's count), 16 bytes each
    assert qlora_gpu.lora_parameters(QWEN25_7B, 16) == 40_370_176
    assert base.parts["lora+optimizer"] == 40_370_176 * 16
    sixteen = estimate(QWEN25_7B, 2048, 2, four_bit=False)
    assert sixteen.parts["weights"] > 3.8 * base.parts["weights"]
    assert estimate(QWEN25_7B, 2048, 2, gradient_checkpointing=False).parts["activations"] == \
        28 * base.parts["activations"]
    assert estimate(QWEN25_7B, 4096, 2).total_bytes > base.total_bytes > estimate(QWEN25_7B, 1024, 2).total_bytes
    assert estimate(7.6, 2048, 2) == base  # a parameter count takes the nearest common shape
    trl = estimate(QWEN25_7B, 2048, 2, unsloth=False)  # checkpoints of all 28 layers and every token's logits
    assert trl.parts["activations"] - base.parts["activations"] == 28 * 4096 * 3584 * 2
    assert trl.parts["logits"] - base.parts["logits"] == 4096 * 152064 * 6 - 256 * 152064 * 8


# ---------------------------------------------------------------------------------------------- prepare_4bit


def tiny_16bit_model() -> Any:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tinymodel import SHAPE

    cfg = transformers.Qwen2Config(**{**SHAPE, "tie_word_embeddings": False}, vocab_size=256)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)


def test_prepare_4bit_keeps_embeddings_16bit_and_upcasts_only_the_norms() -> None:
    import torch

    model = tiny_16bit_model()
    assert qlora_gpu.prepare_4bit(model) is model
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = {n: p.dtype for n, p in model.named_parameters() if "norm" in n}
    assert norms and set(norms.values()) == {torch.float32}
    others = {p.dtype for n, p in model.named_parameters() if "norm" not in n}
    assert others == {torch.bfloat16}  # projections untouched too (on the 4-bit path they are NF4)
    assert not any(p.requires_grad for p in model.parameters())
    # input require-grads: the embeddings' output carries a grad path for checkpointed layers
    out = model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    assert out.requires_grad


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21 asks
def test_peft_keeps_the_lora_in_fp32_after_prepare_4bit() -> None:
    import torch

    peft = pytest.importorskip("peft")
    model = qlora_gpu.prepare_4bit(tiny_16bit_model())
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable) and set(trainable.values()) == {torch.float32}
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- merge device

GB = 10**9


@pytest.mark.parametrize(("setting", "free", "model", "expected"), [
    ("auto", None, 15 * GB, "cpu"),  # no GPU
    ("auto", 16 * GB, 15 * GB, "cpu"),  # a 16 GB card and a 7B: below 1.3x
    ("auto", 19_500_000_000, 15 * GB, "cuda"),  # exactly 1.3x
    ("auto", 19_499_999_999, 15 * GB, "cpu"),
    ("auto", 40 * GB, 15 * GB, "cuda"),
    ("cpu", 80 * GB, 1 * GB, "cpu"),
    ("cuda", 1 * GB, 15 * GB, "cuda"),  # asked for: the operator's call
])
def test_merge_device(setting: str, free: int | None, model: int, expected: str) -> None:
    assert merge_device(setting, free, model) == expected


def test_merge_device_cuda_without_a_gpu_and_unknown_settings_fail() -> None:
    with pytest.raises(ConfigError, match="no GPU"):
        merge_device("cuda", None, GB)
    with pytest.raises(ConfigError, match="must be one of auto, cpu, cuda"):
        merge_device("gpu", GB, GB)


def test_merge_placement_follows_the_card(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """export_merge's placement: a local base's config.json sizes it; auto picks the GPU with room, in the card's
    precision, and the CPU (checkpoint dtype) otherwise."""
    import export_merge

    (tmp_path / "config.json").write_text(json.dumps(QWEN25_7B))
    cfg = {"base_model": str(tmp_path), "merge_dtype": "auto", "merge_device": "auto"}
    need = qlora_gpu.model_16bit_bytes(QWEN25_7B)
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": [7, 5], "free": 2 * need, "total": 3 * need}))
    assert export_merge.merge_placement(cfg) == ("cuda", "float16")
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": [9, 0], "free": 2 * need, "total": 3 * need}))
    assert export_merge.merge_placement(cfg) == ("cuda", "bfloat16")
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": [8, 6], "free": need, "total": need}))
    assert export_merge.merge_placement(cfg) == ("cpu", "auto")
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": None}))
    assert export_merge.merge_placement(cfg) == ("cpu", "auto")
    assert export_merge.merge_placement({**cfg, "merge_dtype": "float32", "merge_device": "cpu"}) == ("cpu", "float32")


# ---------------------------------------------------------------------------------------- the base in the cache


def test_check_base_cached_refuses_a_hub_id_missing_from_the_cache(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    qlora_gpu.check_base_cached(str(tmp_path))  # an absolute folder: the config's checks own it
    assert "HF_HUB_OFFLINE" not in os.environ
    with pytest.raises(ConfigError, match=r"^base model nobody/not-cached-model is not in the local Hugging Face"):
        qlora_gpu.check_base_cached("nobody/not-cached-model")


def test_a_hub_id_not_in_the_cache_fails_the_trainer_in_its_first_seconds(tmp_path: Path) -> None:
    """The real script, an empty HF_HOME: exit 2, one stderr line naming the id, the job_finished line says it,
    long before any training import could have run."""
    pytest.importorskip("huggingface_hub")
    pytest.importorskip("yaml")
    from e2e.trainjobs import make_job, trainer_env

    job = make_job(tmp_path / "job", "nobody/not-cached-model").write()
    env = {**trainer_env(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    env.pop("HF_HUB_OFFLINE", None)
    t = time.monotonic()
    proc = subprocess.run([sys.executable, str(TRAINER / "train_qlora.py"), "--config", str(job.config_path)],
                          capture_output=True, text=True, env=env, cwd=job.dir, timeout=60, check=False)
    took = time.monotonic() - t
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "nobody/not-cached-model" in line]
    assert len(lines) == 1 and "not in the local Hugging Face cache" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    finished = [json.loads(x) for x in job.metrics_path.read_text().splitlines()][-1]
    assert finished["event"] == "job_finished" and finished["exit_code"] == 2
    assert "nobody/not-cached-model" in finished["error"]
    assert took < 10, took


def test_export_merge_device_setting_reaches_the_merge_config(tmp_path: Path) -> None:
    """``export.merge_device`` (auto by default) is a service setting the export config carries to the child,
    which refuses other values."""
    from pydantic import ValidationError

    from daemon.publish import converter, export
    from daemon.settings import Settings
    from daemon.train import templates
    from daemon.trainer import merge_export

    assert Settings.model_validate({}).export.merge_device == "auto"
    assert Settings.model_validate({"export": {"merge_device": "cuda"}}).export.merge_device == "cuda"
    with pytest.raises(ValidationError):
        Settings.model_validate({"export": {"merge_device": "gpu"}})
    args: dict[str, Any] = {
        "job_id": "e1", "backend": "unsloth", "base_model": "/models/base", "adapter_dir": tmp_path / "adapter",
        "out_dir": tmp_path / "out", "template": templates.get("qwen-2.5"), "python": Path("/v/bin/python"),
        "converter": converter.ConverterPaths(root=Path("/opt/llama.cpp"), source="checkout"),
    }
    assert export.merge_config(**args)["merge_device"] == "auto"
    cfg = export.merge_config(**args, merge_device="cpu")
    assert cfg["merge_device"] == "cpu" and merge_export.validate(cfg) == []
    assert merge_export.validate({**cfg, "merge_device": "gpu"}) == ["At 'merge_device': must be one of auto, cpu, "
                                                                     "cuda"]


# ---------------------------------------------------------------------------------------------- the VRAM preflight


def preflight_cfg(tmp_path: Path, shape: str = "7B", **training: Any) -> dict[str, Any]:
    """A job config on a base folder holding only ``config.json`` (what the preflight reads) of a real shape."""
    base = tmp_path / f"base-{shape}"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text(json.dumps({k: v for k, v in qlora_gpu.SHAPES[shape].items() if k != "model"}))
    return {"model": {"name": str(base), "max_seq_length": 2048, "load_in_4bit": True},
            "training": {"per_device_train_batch_size": 2, "gradient_checkpointing": "auto", "gpu_fp32": False,
                         **training},
            "lora": {"r": 16}}


def test_the_preflight_turns_checkpointing_on_only_when_memory_needs_it_and_refuses_what_cannot_fit(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(qlora_gpu.FAKE_GPU_ENV, json.dumps({"capability": [8, 9]}))  # bf16: 2-byte activations
    cfg = preflight_cfg(tmp_path)
    without = estimate(qlora_gpu.SHAPES["7B"], 2048, 2, 16, gradient_checkpointing=False, unsloth=False)
    with_it = estimate(qlora_gpu.SHAPES["7B"], 2048, 2, 16, gradient_checkpointing=True, unsloth=False)
    assert with_it.total_bytes < without.total_bytes
    roomy = qlora_gpu.preflight(cfg, "transformers", (without.total_bytes + GIB, 80 * GIB))
    assert roomy is not None and roomy["gradient_checkpointing"] == "off"  # it fits: the ~30% is not paid
    assert roomy["vram_estimate_bytes"] == without.total_bytes and roomy["vram_free_bytes"] == without.total_bytes + GIB
    tight = qlora_gpu.preflight(cfg, "transformers", (with_it.total_bytes + 1, 16 * GIB))
    assert tight is not None and tight["gradient_checkpointing"] == "on"
    with pytest.raises(qlora_gpu.NotEnoughVram) as e:
        qlora_gpu.preflight(cfg, "transformers", (with_it.total_bytes - 1, 8 * GIB))
    line = str(e.value)
    assert "\n" not in line and e.value.exit_code == 5
    assert line.startswith(f"not enough GPU memory: the job needs ~{with_it.total_gib:.1f} GiB (weights ")
    assert "of 8.0 (another process or Ollama holds the rest" in line
    forced = preflight_cfg(tmp_path, gradient_checkpointing="off")
    with pytest.raises(qlora_gpu.NotEnoughVram):  # "off" is obeyed: no falling back to checkpointing
        qlora_gpu.preflight(forced, "transformers", (with_it.total_bytes + 1, 16 * GIB))
    assert qlora_gpu.preflight(cfg, "transformers", None) is None  # no GPU: nothing to check
    unsloth = qlora_gpu.preflight(cfg, "unsloth", (with_it.total_bytes + 1, 16 * GIB))
    assert unsloth is not None and unsloth["vram_estimate_bytes"] < with_it.total_bytes  # its own variant
    nobase = {**cfg, "model": {**cfg["model"], "name": str(tmp_path / "nowhere")}}
    assert qlora_gpu.preflight(nobase, "transformers", (1, 1)) is None  # no config.json: the load will say


def test_the_trainer_fails_fast_on_a_card_without_room_through_the_fake_seam(tmp_path: Path) -> None:
    """The real script on this CPU, the card faked at the one seam: 1 GiB free of 8 for a 7B-shape base. Exit 5
    with one line and the numbers, before anything heavy loads; job_finished says it."""
    pytest.importorskip("yaml")
    pytest.importorskip("torch")
    from e2e.trainjobs import make_job, trainer_env

    cfg = preflight_cfg(tmp_path)
    job = make_job(tmp_path / "job", cfg["model"]["name"], backend="transformers").write()
    env = {**trainer_env(), qlora_gpu.FAKE_GPU_ENV: json.dumps({"capability": [8, 0], "free": GIB, "total": 8 * GIB})}
    t = time.monotonic()
    proc = subprocess.run([sys.executable, str(TRAINER / "train_qlora.py"), "--config", str(job.config_path)],
                          capture_output=True, text=True, env=env, cwd=job.dir, timeout=120, check=False)
    took = time.monotonic() - t
    assert proc.returncode == 5, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if "not enough GPU memory" in x]
    assert len(lines) == 1 and "1.0 GiB free of 8.0" in lines[0] and "Traceback" not in proc.stderr
    finished = [json.loads(x) for x in job.metrics_path.read_text().splitlines()][-1]
    assert finished["event"] == "job_finished" and finished["exit_code"] == 5
    assert finished["error"].startswith("not enough GPU memory: the job needs ~")
    assert not (job.dir / "output" / "adapter").exists()
    assert took < 60, took  # torch's import, then the check: no model load (there are no weights to load)
