"""The trainer scripts' parts, without the training stack: sibling imports that nothing can shadow, the job config's
table of kinds, the step-line recorder and the shared helpers. The scripts' file contract is pinned end to end in
tests/e2e/test_trainer_contract.py, test_train_cpu.py and test_export_cpu.py."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

TRAINER = Path(__file__).resolve().parents[2] / "daemon" / "trainer"
SCRIPTS = ("train_qlora.py", "merge_export.py", "tinymodel.py")
PARTS = sorted(p.stem for p in TRAINER.glob("*.py") if p.name != "__init__.py")

if str(TRAINER) not in sys.path:
    sys.path.insert(0, str(TRAINER))  # as each script does before importing its parts

import qlora_config  # noqa: E402
import qlora_data  # noqa: E402
import qlora_metrics  # noqa: E402
import qlora_pref  # noqa: E402
import trainer_common  # noqa: E402
from qlora_metrics import StepRecorder  # noqa: E402

# -------------------------------------------------------------------------------------------- sibling imports


def test_no_installed_module_or_stdlib_module_shares_a_name_with_a_part() -> None:
    elsewhere = [p for p in sys.path if p and os.path.realpath(p) != str(TRAINER.resolve())]
    clashes = [n for n in PARTS if n in sys.stdlib_module_names
               or importlib.machinery.PathFinder.find_spec(n, elsewhere) is not None]
    assert clashes == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_namesake_earlier_on_the_path_does_not_shadow_a_part(script: str, tmp_path: Path) -> None:
    """PYTHONSAFEPATH keeps the script's folder off sys.path and PYTHONPATH puts a poisoned copy of every part first:
    the script must still import its own files (the poison exits 99, a missing part exits 1)."""
    for name in PARTS:
        (tmp_path / f"{name}.py").write_text("raise SystemExit(99)\n")
    argv = [sys.executable, str(TRAINER / script)]
    argv += [str(tmp_path / "out"), "--family", "nope"] if script == "tinymodel.py" else ["--config", "rel.yaml"]
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr  # argparse (tinymodel's bad family) or the relative config: exit 2
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------- the config table

CHECKS: list[tuple[Any, Any, Any]] = [
    # (kind, value, the normalised value or the error message)
    ("str", "x", "x"),
    ("str", " ", "must be a non-empty string"),
    ("str", 3, "must be a non-empty string"),
    ("text", " ", " "),
    ("text", "", "must be a non-empty string"),
    ("abs", "/a/../b/", "/b"),
    ("abs", "rel/x", "must be an absolute path, got 'rel/x'"),
    ("abs", "~/x", "must be an absolute path, got '~/x'"),
    ("abs?", "", None),
    ("abs?", "x", "must be an absolute path, got 'x'"),
    ("model", "org/name", "org/name"),
    ("model", "./models/base", "must be an absolute path or a hub id, got the relative path './models/base'"),
    ("model", "/no/such/dir", "/no/such/dir is not a directory"),
    ("bool", True, True),
    ("bool", 1, "must be true or false"),
    ("strs", ["a", "b"], ["a", "b"]),
    ("strs", [], "must be a non-empty list of strings"),
    ("strs", ["a", ""], "must be a non-empty list of strings"),
    ("modules", "all-linear", "all-linear"),
    ("modules", "q_proj", "must be a non-empty list of strings"),
    ("int", -5, -5),
    ("int", 1.0, "must be an integer"),
    ("int", True, "must be an integer"),
    (">=16", 16, 16),
    (">=16", 15, "must be >= 16"),
    ("steps", -1, -1),
    ("steps", 0, "must be -1 (use num_train_epochs) or >= 1"),
    ("steps", -2, "must be >= -1"),
    ("(0.0, inf)", 1, 1.0),
    ("(0.0, inf)", 0, "must be in (0.0, inf)"),
    ("(0.0, inf)", math.inf, "must be a number"),
    ("(0.0, inf)", False, "must be a number"),
    ("[0.0, 1.0)", 0.0, 0.0),
    ("[0.0, 1.0)", 1.0, "must be in [0.0, 1.0)"),
    ("[0.0, 1.0)", -0.1, "must be in [0.0, 1.0)"),
    (("auto", "unsloth"), "auto", "auto"),
    (("auto", "unsloth"), "x", "must be one of auto, unsloth, got 'x'"),
]


@pytest.mark.parametrize(("kind", "value", "expected"), CHECKS)
def test_each_kind_normalises_or_says_why(kind: Any, value: Any, expected: Any) -> None:
    if isinstance(expected, str) and expected.startswith(("must", "/no/")):
        with pytest.raises(ValueError) as e:
            qlora_config.check(kind, value)
        assert str(e.value) == expected
    else:
        got = qlora_config.check(kind, value)
        assert got == expected and type(got) is type(expected)


def test_every_kind_in_the_table_is_one_check_knows() -> None:
    for fields in qlora_config.SCHEMA.values():
        for kind, default in fields.values():
            if default is not None and default is not qlora_config.REQUIRED:
                assert qlora_config.check(kind, default) == default  # each default passes its own kind


def minimal(tmp_path: Path) -> dict[str, Any]:
    return {
        "model": {"name": str(tmp_path), "chat_template": "qwen-2.5"},
        "template": {"name": "qwen-2.5", "jinja": "{{ x }}", "instruction_part": "<u>", "response_part": "<a>",
                     "stop": ["<e>"], "known_names": ["qwen-2.5", "llama-3.1"]},
        "dataset": {"train_path": "/d/train.jsonl", "eval_path": "/d/eval.jsonl"},
        "training": {"output_dir": "/o/job"},
        "metrics": {"output_path": "/o/job/metrics.jsonl"},
    }


def test_validate_fills_the_defaults(tmp_path: Path) -> None:
    cfg, problems = qlora_config.validate(minimal(tmp_path))
    assert problems == []
    assert cfg["backend"] == "auto" and cfg["job_id"] is None
    assert cfg["training"]["learning_rate"] == 2e-4 and cfg["training"]["max_steps"] == -1
    assert cfg["training"]["eval_steps"] is None and cfg["lora"]["target_modules"][0] == "q_proj"
    assert cfg["result"] == {"output_path": None} and cfg["gate"] == {"champion_adapter": None}
    assert cfg["init"] == {"adapter": None} and cfg["dataset"]["new_path"] is cfg["dataset"]["canary_path"] is None
    assert cfg["objective"] == "sft" and cfg["dataset"]["pref_train_path"] is cfg["dataset"]["pref_eval_path"] is None
    assert cfg["preference"] == {"beta": 0.1, "desirable_weight": None, "undesirable_weight": 1.0,
                                 "precompute_ref_log_probs": True}


def test_a_preference_objective_needs_both_files_and_sft_takes_none(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    raw["objective"] = "kto"
    raw["dataset"]["pref_eval_path"] = "/d/kto-eval.jsonl"
    raw["preference"] = {"beta": 0, "desirable_weight": 2, "nope": 1}
    _, problems = qlora_config.validate(raw)
    assert problems == [
        "At 'preference.nope': unknown key",
        "At 'preference.beta': must be in (0.0, inf)",
        "At 'dataset.pref_train_path': required with objective 'kto'",
    ]
    raw["dataset"]["pref_train_path"] = "/d/kto-train.jsonl"
    raw["preference"] = {"desirable_weight": 2}
    cfg, problems = qlora_config.validate(raw)
    assert problems == [] and cfg["preference"]["desirable_weight"] == 2.0
    raw["objective"] = "sft"
    assert qlora_config.validate(raw)[1] == [
        f"At 'dataset.{key}': only with objective kto or dpo (objective is 'sft')"
        for key in ("pref_train_path", "pref_eval_path")
    ]


def test_validate_lists_every_problem_in_order(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    raw["extra"] = 1
    raw["lora"] = [1]
    raw["training"].update(bogus=1, seed="x")
    raw["model"]["chat_template"] = "vicuna"
    del raw["dataset"]["eval_path"]
    _, problems = qlora_config.validate(raw)
    assert problems == [
        "At 'extra': unknown key",
        "At 'dataset.eval_path': required",
        "At 'training.bogus': unknown key",
        "At 'training.seed': must be an integer",
        "At 'lora': must be a mapping",
        "At 'model.chat_template': unknown chat template 'vicuna'; known: qwen-2.5, llama-3.1",
    ]


def test_a_missing_template_block_is_one_problem(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    raw["template"] = "qwen-2.5"
    _, problems = qlora_config.validate(raw)
    assert problems == ["At 'template': must be a mapping", "At 'template': required: the rendered data of chat "
                        "template 'qwen-2.5' (the service writes it from its template table; see "
                        "configs/chatos_qlora.yaml)"]


def test_a_champion_without_its_adapter_config_is_a_problem(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    raw["gate"] = {"champion_adapter": str(tmp_path)}
    assert qlora_config.validate(raw)[1] == [f"At 'gate.champion_adapter': no adapter_config.json in {tmp_path}"]
    (tmp_path / "adapter_config.json").write_text("{}")
    assert qlora_config.validate(raw)[1] == []


def adapter(folder: Path, weights: bool = True, **config: Any) -> Path:
    """A warm-start adapter folder as PEFT saves it (the weights file is only looked for here)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"r": 16, "lora_alpha": 16, "target_modules": list(qlora_config.DEFAULT_TARGET_MODULES)[::-1], **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def test_a_warm_start_adapter_must_exist_and_match_the_lora(tmp_path: Path) -> None:
    raw = minimal(tmp_path)
    good = adapter(tmp_path / "good")  # the same modules in another order: a set
    raw["init"] = {"adapter": str(good)}
    cfg, problems = qlora_config.validate(raw)
    assert problems == [] and cfg["init"]["adapter"] == str(good)
    cases = {
        tmp_path / "none": "is not a directory",
        adapter(tmp_path / "no-weights", weights=False): "no adapter_model.safetensors or adapter_model.bin in",
        adapter(tmp_path / "r8", r=8): "does not match 'lora:': r is 8 in the adapter but lora.r is 16",
        adapter(tmp_path / "a32", lora_alpha=32): "lora_alpha is 32 in the adapter but lora.lora_alpha is 16.0",
        adapter(tmp_path / "qv", target_modules=["q_proj", "v_proj"]): "target_modules are ['q_proj', 'v_proj'] in",
    }
    (tmp_path / "bad-json").mkdir()
    (tmp_path / "bad-json" / "adapter_config.json").write_text("{")
    cases[tmp_path / "bad-json"] = "cannot read"
    for folder, message in cases.items():
        raw["init"] = {"adapter": str(folder)}
        problems = qlora_config.validate(raw)[1]
        assert len(problems) == 1 and problems[0].startswith("At 'init.adapter': ") and str(folder) in problems[0]
        assert message in problems[0], problems
    raw["init"] = {"adapter": str(adapter(tmp_path / "two", r=8, lora_alpha=8))}
    assert "r is 8 in the adapter but lora.r is 16; lora_alpha is 8" in qlora_config.validate(raw)[1][0]
    raw["init"], raw["lora"] = {"adapter": str(adapter(tmp_path / "qv2", target_modules=["q_proj"]))}, {
        "target_modules": "all-linear"}
    assert qlora_config.validate(raw)[1] == []  # resolved against the model: the tensor check decides
    raw["init"] = {"adapter": "rel/adapter"}
    assert qlora_config.validate(raw)[1] == ["At 'init.adapter': must be an absolute path, got 'rel/adapter'"]


# ---------------------------------------------------------------------------------------------- step lines


class Lines:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(dict(record))


def test_step_recorder_merges_an_eval_into_its_step_and_keeps_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([10.0, 10.0, 12.0, 13.0])
    monkeypatch.setattr(qlora_metrics.time, "monotonic", lambda: next(clock))
    log, progress = Lines(), {"step": 0, "loss": None}
    rec = StepRecorder(log, progress)  # type: ignore[arg-type]

    def at(step: int) -> SimpleNamespace:
        return SimpleNamespace(global_step=step)

    rec.on_log(None, at(1), None, logs={"loss": 9.0})  # before on_train_begin: the base eval's logs are not steps
    assert log.records == [] and rec.pending is None
    rec.on_train_begin(None, SimpleNamespace(global_step=0, max_steps=2), None)
    rec.on_log(None, at(1), None, logs={"loss": 2.0, "epoch": 0.5, "learning_rate": 1e-4, "num_tokens": 100})
    assert log.records == [] and progress == {"step": 1, "loss": 2.0}  # held: an eval at step 1 may join it
    rec.on_log(None, at(1), None, logs={"eval_loss": 1.5, "epoch": 0.5})
    rec.on_log(None, at(2), None, logs={"loss": float("nan"), "epoch": 1.0, "learning_rate": 0.0})
    rec.on_step_end(None, at(2), None)
    rec.on_log(None, at(2), None, logs={"eval_loss": 1.25, "epoch": 1.0})
    rec.on_train_end(None, at(2), None)
    first, second, third = log.records
    assert first["step"] == 1 and first["train_loss"] == 2.0 and first["eval_loss"] == 1.5
    assert first["epoch"] == 0.5 and first["learning_rate"] == 1e-4 and first["tokens_per_s"] == 50.0
    assert second == {"step": 2, "max_steps": 2, "train_loss": None, "epoch": 1.0, "learning_rate": 0.0,
                      "tokens_per_s": None}
    assert first["max_steps"] == 2  # status shows step N/M and an ETA from these lines
    assert third == {"step": 2, "train_loss": None, "eval_loss": 1.25, "epoch": 1.0, "learning_rate": None,
                     "tokens_per_s": None}
    assert (rec.first_loss, rec.last_loss, rec.tokens, rec.training) == (2.0, None, 100.0, False)


def test_step_recorder_times_the_first_step_and_the_steady_rate_and_counts_batches_without_num_tokens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsloth's trainer may log no ``num_tokens``: the tokens then come from the collated batches (attention mask
    ones, or a padding-free row's length), counted only while training runs; the steady rate leaves the first step
    (warm-up, first allocations) out."""
    import torch

    clock = iter([0.0, 100.0, 104.0, 105.0, 106.0])
    monkeypatch.setattr(qlora_metrics.time, "monotonic", lambda: next(clock))
    log, progress = Lines(), {"step": 0, "loss": None}
    rec = StepRecorder(log, progress)  # type: ignore[arg-type]
    collate = rec.counter.wrap(lambda xs: xs[0])
    collate([{"attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}])  # an eval batch before training: not counted
    rec.on_train_begin(None, SimpleNamespace(global_step=0, max_steps=3), None)
    collate([{"attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}])  # 6 real tokens of 8
    rec.on_log(None, SimpleNamespace(global_step=1), None, logs={"loss": 3.0})
    collate([{"position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]]), "input_ids": torch.zeros(1, 7)}])  # 7
    rec.on_log(None, SimpleNamespace(global_step=2), None, logs={"loss": 2.0})
    collate([{"input_ids": torch.zeros(2, 5)}])  # no mask, no positions: every id is a token
    rec.on_log(None, SimpleNamespace(global_step=3), None, logs={"loss": 1.0})
    rec.on_train_end(None, SimpleNamespace(global_step=3), None)
    collate([{"attention_mask": torch.ones(1, 9)}])  # after training: not counted
    assert rec.counter.tokens == 23 and rec.tokens == 23.0
    assert [r["tokens_per_s"] for r in log.records] == [1.5, 7.0, 10.0]
    assert rec.timings() == {"first_step": 4.0, "steady_tokens_per_s": 8.5}  # (23 - 6) / (106 - 104)


def test_step_recorder_with_extra_keeps_every_trl_number_under_its_name() -> None:
    log, progress = Lines(), {"step": 0, "loss": None}
    rec = StepRecorder(log, progress, extra=True)  # type: ignore[arg-type]
    state = SimpleNamespace(global_step=4)
    rec.on_train_begin(None, state, None)
    rec.on_log(None, state, None, logs={"loss": 0.5, "epoch": 1.0, "learning_rate": 1e-3, "grad_norm": 2.0,
                                        "rewards/chosen": 0.25, "kl": 0.0, "logps/rejected": -30.0, "flag": True})
    rec.on_log(None, state, None, logs={"eval_loss": 0.4, "eval_rewards/margins": 1.5, "eval_runtime": 3.0,
                                        "epoch": 1.0})
    rec.on_train_end(None, state, None)
    [line] = log.records
    assert line == {"step": 4, "max_steps": None, "train_loss": 0.5, "epoch": 1.0, "learning_rate": 1e-3,
                    "tokens_per_s": None, "grad_norm": 2.0, "rewards/chosen": 0.25, "kl": 0.0, "logps/rejected": -30.0,
                    "eval_loss": 0.4, "eval_rewards/margins": 1.5}


# ----------------------------------------------------------------------------------------- preference parts


@pytest.mark.parametrize(
    ("good", "bad", "desirable", "undesirable", "expected"),
    [
        (10, 10, None, 1.0, (1.0, 1.0)),  # ratio 1: in [1, 4/3], kept
        (12, 10, None, 1.0, (1.0, 1.0)),  # ratio 1.2: kept
        (10, 30, None, 1.0, (3.5, 1.0)),  # ratio 1/3: desirable_weight puts it at 7/6 (3.5 * 10 / 30)
        (40, 10, None, 2.0, (round(7 / 6 * 2 * 10 / 40, 6), 2.0)),  # ratio 2: pulled down to 7/6
        (10, 30, 0.5, 1.0, (0.5, 1.0)),  # an explicit weight is used as given
    ],
)
def test_kto_weights_balance_the_labels_as_eq_8_asks(
    good: int, bad: int, desirable: float | None, undesirable: float, expected: tuple[float, float]
) -> None:
    examples = [{"label": True}] * good + [{"label": False}] * bad
    weights = qlora_pref.kto_weights({"desirable_weight": desirable, "undesirable_weight": undesirable}, examples)
    assert weights == pytest.approx(expected)
    if desirable is None:
        assert 1.0 <= weights[0] * good / (weights[1] * bad) <= 4 / 3


def test_kto_args_raise_a_batch_of_one_to_two() -> None:
    cfg = {"objective": "kto", "preference": {"beta": 0.2, "precompute_ref_log_probs": False}}
    args = qlora_pref.pref_args(cfg, {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1}, (1.5, 1.0))
    assert args == {"per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "beta": 0.2,
                    "precompute_ref_log_probs": False, "desirable_weight": 1.5, "undesirable_weight": 1.0}
    dpo = qlora_pref.pref_args({**cfg, "objective": "dpo"}, {"per_device_train_batch_size": 1}, None)
    assert dpo == {"per_device_train_batch_size": 1, "beta": 0.2, "precompute_ref_log_probs": False}


def test_preference_lines_are_reduced_to_trl_fields(tmp_path: Path) -> None:
    path = tmp_path / "kto.jsonl"
    prompt = [{"role": "system", "content": "s", "name": "x"}, {"role": "user", "content": "q"}]
    path.write_text(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": "a"}],
                                "label": False, "chat_id": 7}) + "\n\n")
    assert qlora_data.read_preferences(str(path), "dataset.pref_eval_path", "kto") == [
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
         "completion": [{"role": "assistant", "content": "a"}], "label": False}]
    with pytest.raises(qlora_data.DataError, match="KTO needs both desirable and undesirable examples"):
        qlora_data.read_preferences(str(path), "dataset.pref_train_path", "kto", both_labels=True)
    with pytest.raises(qlora_data.DataError, match=r":1: 'chosen' must be a non-empty list of messages"):
        qlora_data.read_preferences(str(path), "dataset.pref_train_path", "dpo")


# ------------------------------------------------------------------------------------------- shared helpers


def test_write_json_atomic_leaves_only_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    trainer_common.write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("}\n")
    trainer_common.write_json_atomic(path, {"p": tmp_path, "n": math.nan}, allow_nan=True, default=str)
    assert json.loads(path.read_text())["p"] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    with pytest.raises(ValueError):  # the trainer's result.json: NaN is refused, not written as invalid JSON
        trainer_common.write_json_atomic(path, {"a": math.nan})
    assert json.loads(path.read_text())["p"] == str(tmp_path)  # the previous file is untouched


def test_error_lines() -> None:
    e = ValueError("first\n  second")
    assert trainer_common.one_line(e) == "ValueError: first second"
    assert trainer_common.first_line(e) == "first"
    assert trainer_common.first_line(KeyError()) == "KeyError"
    assert trainer_common.one_line(MemoryError()) == "MemoryError"
    cause = RuntimeError("DefaultCPUAllocator: can't allocate memory")
    try:
        try:
            raise cause
        except RuntimeError as inner:
            raise ValueError("wrapped") from inner
    except ValueError as outer:
        assert trainer_common.is_oom(outer)
    assert not trainer_common.is_oom(ValueError("out of memory"))


def test_sigterm_raises_terminated() -> None:
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    try:
        trainer_common.catch_sigterm()
        with pytest.raises(trainer_common.Terminated, match="terminated by signal 15"):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_shipped_canary_set_reads_as_training_data() -> None:
    from daemon.train import gate

    examples = qlora_data.read_examples(str(gate.CANARY_PATH), "dataset.canary_path")
    assert 30 <= len(examples) <= 60
    assert all(ex[0]["role"] == "user" and ex[-1]["role"] == "assistant" for ex in examples)  # every template
    assert any(len(ex) > 2 for ex in examples) and any(len(ex[-1]["content"].split()) > 40 for ex in examples)
    assert len({ex[0]["content"] for ex in examples}) == len(examples)


# ----------------------------------------------------------------------------------------------- the SFT step


def test_batching_follows_the_device_and_the_attention() -> None:
    import qlora_sft

    assert qlora_sft.batching("auto", 64, cuda=False, attn="sdpa").padding == "free"
    assert qlora_sft.batching("auto", 64, cuda=True, attn="flash_attention_2").padding == "free"
    gpu = qlora_sft.batching("auto", 64, cuda=True, attn="sdpa")
    assert (gpu.padding, gpu.pad_to_multiple_of) == ("bucket", 64)
    assert qlora_sft.batching("longest", 64, cuda=True, attn="sdpa").pad_to_multiple_of is None

    @dataclasses.dataclass
    class Config:  # the field names SFTConfig / TrainingArguments spell
        padding_free: bool = False
        pad_to_multiple_of: int | None = None
        max_length: int | None = 1024
        train_sampling_strategy: str = "random"

    assert gpu.sft_kwargs(Config) == {"padding_free": False, "pad_to_multiple_of": 64,
                                      "train_sampling_strategy": "group_by_length"}
    assert qlora_sft.batching("free", 64, False, None).sft_kwargs(Config) == {
        "padding_free": True, "pad_to_multiple_of": None, "max_length": None}  # already cut by qlora_tokens


def test_the_trained_tokens_loss_is_the_full_logits_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """``qlora_sft``'s loss (only the trained positions through the LM head) equals the token-mean cross-entropy
    over the full logits, value and gradient, with and without ``num_items_in_batch``, on a padded batch and on the
    same rows padding-free; and it logs TRL's token accuracy and token count."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import qlora_sft
    from tinymodel import SHAPE

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(**SHAPE, vocab_size=300))

    class Base:
        def compute_loss(self, *a: Any, **kw: Any) -> Any:
            raise AssertionError("the plain-head path must not fall back to TRL's loss")

    cls = qlora_sft.sft_class(Base)
    trainer = cls.__new__(cls)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m, num_processes=1)
    trainer.args = SimpleNamespace(average_tokens_across_devices=False)
    trainer._metrics = {"train": {"mean_token_accuracy": [], "num_tokens": []}, "eval": {}}
    trainer._total_train_tokens = 0
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14]]
    labels = [[-100, -100, 7, 8, 9, 10], [-100, 12, 13, -100]]
    ids = torch.tensor([rows[0], rows[1] + [0, 0]])
    lab = torch.tensor([labels[0], labels[1] + [-100, -100]])
    mask = torch.tensor([[1] * 6, [1] * 4 + [0, 0]])

    def reference(scale: float | None) -> tuple[float, Any]:
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = lab[:, 1:]
        total = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), target.reshape(-1), ignore_index=-100,
                                                  reduction="sum")
        loss = total / (scale if scale is not None else (target != -100).sum())
        loss.backward()
        return float(loss.detach()), model.model.embed_tokens.weight.grad.clone()

    model.train()
    for scale in (None, 12.0):
        want, want_grad = reference(scale)
        model.zero_grad()
        got = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": lab},
                                   num_items_in_batch=None if scale is None else torch.tensor(scale))
        got.backward()
        assert float(got.detach()) == pytest.approx(want, rel=1e-5)
        assert torch.allclose(model.model.embed_tokens.weight.grad, want_grad, atol=1e-6)
    flat = {"input_ids": torch.tensor([rows[0] + rows[1]]),
            "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]),
            "labels": torch.tensor([labels[0] + labels[1]])}
    with torch.no_grad():
        padded = float(trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": lab}))
        free = float(trainer.compute_loss(model, flat))  # one row, position ids: the packed mask keeps rows apart
    assert free == pytest.approx(padded, rel=1e-4)
    assert trainer._total_train_tokens == 10 * 3 + 10  # the attention mask's ones, then the flattened row's length
    accuracy = trainer._metrics["train"]["mean_token_accuracy"]
    assert len(accuracy) == 4 and all(0.0 <= a <= 1.0 for a in accuracy)
