"""The trainer's failure contract, fast (no torch needed): the real script as a subprocess with bad configs and bad
data, and the exit-code mapping of :func:`main` for errors that need a real run to happen (OOM)."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from trainjobs import CONFIG_TEMPLATE, TRAINER, WEIRD, Job, write_preferences

from daemon.train import templates


@pytest.fixture
def job(job_factory: Callable[..., Job], tmp_path: Path) -> Job:
    """A valid config whose model is an (empty) absolute folder: every failure below happens before loading it."""
    model = tmp_path / "model"
    model.mkdir()
    return job_factory("job", model)


def finished(job: Job) -> dict[str, Any]:
    lines = job.metrics()
    assert lines[0]["event"] == "job_started"
    assert lines[-1]["event"] == "job_finished"
    assert all(line["job_id"] == lines[0]["job_id"] for line in lines)
    return lines[-1]


def test_relative_config_path_exits_2(job: Job) -> None:
    job.run(config_arg="config.yaml")  # cwd is the job dir: the file exists, but relative is refused
    assert job.proc is not None and job.proc.returncode == 2
    assert "--config must be an absolute path" in job.proc.stderr
    assert "Traceback" not in job.log
    assert not job.metrics_path.exists()


@pytest.mark.parametrize(("content", "message"), [(None, "not found"), ("model: [unclosed\n", "cannot read")])
def test_unreadable_config_exits_2(tmp_path: Path, content: str | None, message: str) -> None:
    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_text(content)
    proc = subprocess.run(
        [sys.executable, str(TRAINER), "--config", str(config)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one line, no traceback


def test_relative_paths_in_config_exit_2_listing_each(job: Job) -> None:
    job.config["dataset"]["train_path"] = "data/train.jsonl"
    job.config["training"]["output_dir"] = "output"
    job.config["model"]["name"] = "./models/base"
    job.run()
    assert job.proc is not None and job.proc.returncode == 2, job.log
    for key in ("dataset.train_path", "training.output_dir", "model.name"):
        assert f"At '{key}'" in job.proc.stderr
    end = finished(job)  # the metrics path itself was absolute: the failure is reported there too
    assert end["status"] == "failed" and end["exit_code"] == 2 and "dataset.train_path" in end["error"]
    assert not job.result_path.exists()


def test_unknown_template_exits_2_with_the_names(job: Job) -> None:
    job.config["model"]["chat_template"] = "vicuna"
    job.run()
    assert job.proc is not None and job.proc.returncode == 2
    assert "unknown chat template 'vicuna'" in job.proc.stderr
    for name in templates.names():
        assert name in job.proc.stderr
    assert "Traceback" not in job.log


def test_missing_template_block_exits_2(job: Job) -> None:
    del job.config["template"]
    job.run()
    assert job.proc is not None and job.proc.returncode == 2
    assert "At 'template': required" in job.proc.stderr


def test_unknown_keys_and_bad_values_are_all_listed(job: Job) -> None:
    job.config["training"]["learning_rate"] = -1
    job.config["training"]["lr_sheduler"] = "cosine"
    job.config["backend"] = "gpu"
    job.config["lora"]["r"] = "sixteen"
    job.run()
    assert job.proc is not None and job.proc.returncode == 2
    err = job.proc.stderr
    for key in ("training.learning_rate", "training.lr_sheduler", "backend", "lora.r"):
        assert f"At '{key}'" in err, err
    assert "unknown key" in err


def test_shipped_template_alone_names_what_the_runner_must_fill(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(TRAINER), "--config", str(CONFIG_TEMPLATE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    for key in ("model.name", "dataset.train_path", "dataset.eval_path", "training.output_dir", "metrics.output_path"):
        assert f"At '{key}': required" in proc.stderr
    assert "At 'template': required" in proc.stderr


def test_champion_without_adapter_exits_2(job: Job, tmp_path: Path) -> None:
    job.config["gate"]["champion_adapter"] = str(tmp_path)
    job.run()
    assert job.proc is not None and job.proc.returncode == 2
    assert "At 'gate.champion_adapter'" in job.proc.stderr


def test_missing_dataset_exits_3(job: Job) -> None:
    Path(job.config["dataset"]["eval_path"]).unlink()
    job.run()
    assert job.proc is not None and job.proc.returncode == 3, job.log
    end = finished(job)
    assert end["status"] == "failed" and end["exit_code"] == 3
    assert job.config["dataset"]["eval_path"] in end["error"]
    assert not job.result_path.exists()
    assert "Traceback" not in job.log


@pytest.mark.parametrize("key", ["new_path", "canary_path"])
@pytest.mark.parametrize(("content", "message"), [(None, "not found"), ("", "holds no examples")])
def test_missing_or_empty_new_examples_or_canary_set_exit_3(job: Job, content: str | None, message: str,
                                                            key: str) -> None:
    new = Path(job.config["dataset"]["train_path"]).with_name("extra.jsonl")
    if content is not None:
        new.write_text(content)
    job.config["dataset"][key] = str(new)
    job.run()
    assert job.proc is not None and job.proc.returncode == 3, job.log
    end = finished(job)
    assert end["exit_code"] == 3 and end["error"] == f"At 'dataset.{key}': {new} {message}"
    assert not job.result_path.exists() and "Traceback" not in job.log


def test_missing_warm_start_adapter_exits_2(job: Job, tmp_path: Path) -> None:
    job.config["init"] = {"adapter": str(tmp_path / "no-such-adapter")}
    job.run()
    assert job.proc is not None and job.proc.returncode == 2
    assert job.proc.stderr.count("\n") == 1 and "At 'init.adapter':" in job.proc.stderr
    assert f"{tmp_path / 'no-such-adapter'} is not a directory" in finished(job)["error"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "holds no examples"),
        ("\n\n", "holds no examples"),
        ('{"messages": []}\n', "no 'messages' list"),
        ("not json\n", ":1: not JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}\n', "needs a role"),
        ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"m"\n', ":2:"),
    ],
)
def test_bad_dataset_exits_3(job: Job, content: str, message: str) -> None:
    Path(job.config["dataset"]["train_path"]).write_text(content)
    job.run()
    assert job.proc is not None and job.proc.returncode == 3
    assert message in finished(job)["error"]


@pytest.mark.parametrize("objective", ["kto", "dpo"])
def test_a_preference_objective_without_its_files_exits_2(job: Job, objective: str) -> None:
    job.config["objective"] = objective
    job.config["dataset"]["pref_eval_path"] = job.config["dataset"]["eval_path"]
    job.run()
    assert job.proc is not None and job.proc.returncode == 2
    assert job.proc.stderr.count("\n") == 1
    assert f"At 'dataset.pref_train_path': required with objective '{objective}'" in job.proc.stderr
    assert "pref_eval_path" not in job.proc.stderr and finished(job)["exit_code"] == 2


def test_preference_files_without_a_preference_objective_and_a_bad_objective_exit_2(job: Job) -> None:
    job.config["dataset"]["pref_train_path"] = job.config["dataset"]["train_path"]
    job.run()
    assert job.proc is not None and job.proc.returncode == 2
    assert "At 'dataset.pref_train_path': only with objective kto or dpo (objective is 'sft')" in job.proc.stderr
    job.config["objective"] = "orpo"
    job.run()
    assert job.proc is not None and job.proc.returncode == 2
    assert "At 'objective': must be one of sft, kto, dpo, got 'orpo'" in job.proc.stderr


def pref_job(job: Job, objective: str) -> tuple[Path, Path]:
    train, evals = write_preferences(Path(job.config["dataset"]["train_path"]).parent, objective)
    job.config["objective"] = objective
    job.config["dataset"].update(pref_train_path=str(train), pref_eval_path=str(evals))
    return train, evals


def one_failure_line(job: Job) -> bool:
    """The data problem is said once, on the last stderr line (after the split sizes)."""
    assert job.proc is not None
    lines = job.proc.stderr.splitlines()
    return lines[-1].startswith("[train_qlora] failed: ") and sum("failed" in x for x in lines) == 1


def test_kto_with_one_kind_of_label_exits_3_in_one_line(job: Job) -> None:
    train, _ = pref_job(job, "kto")
    lines = [json.loads(line) for line in train.read_text().splitlines()]
    train.write_text("".join(json.dumps({**x, "label": True}) + "\n" for x in lines))
    job.run()
    assert job.proc is not None and job.proc.returncode == 3, job.log
    end = finished(job)
    assert end["error"] == (f"At 'dataset.pref_train_path': {train}: KTO needs both desirable and undesirable "
                            f"examples ({len(lines)} desirable, 0 undesirable)")
    assert one_failure_line(job) and not job.result_path.exists() and "Traceback" not in job.log


KTO_OK = {"prompt": [{"role": "user", "content": "Sort: b a"}],
          "completion": [{"role": "assistant", "content": "Sorted: a b."}], "label": True}
DPO_OK = {"prompt": KTO_OK["prompt"], "chosen": KTO_OK["completion"],
          "rejected": [{"role": "assistant", "content": WEIRD}]}


@pytest.mark.parametrize(
    ("objective", "which", "line", "message"),
    [
        ("kto", "train", "not json", ":1: not JSON"),
        ("kto", "train", "[1, 2]", ":1: not a JSON object"),
        ("kto", "eval", {**KTO_OK, "label": "yes"}, ":1: 'label' must be true or false"),
        ("kto", "train", {**KTO_OK, "completion": []}, ":1: 'completion' must be a non-empty list of messages"),
        ("kto", "train", {**KTO_OK, "completion": [{"role": "user", "content": "x"}]},
         ":1: 'completion': each message needs a role in ('assistant',)"),
        ("kto", "eval", {**KTO_OK, "prompt": KTO_OK["completion"]}, ":1: 'prompt' must end with a user message"),
        ("dpo", "train", {**DPO_OK, "rejected": None}, ":1: 'rejected' must be a non-empty list of messages"),
        ("dpo", "eval", {**DPO_OK, "chosen": [{"role": "assistant", "content": " "}]}, ":1: 'chosen': no content"),
        ("dpo", "train", {k: v for k, v in DPO_OK.items() if k != "prompt"}, ":1: 'prompt' must be a non-empty"),
        ("dpo", "eval", "", "holds no examples"),
    ],
)
def test_bad_preference_file_exits_3_naming_file_and_line(
    job: Job, objective: str, which: str, line: Any, message: str
) -> None:
    paths = dict(zip(("train", "eval"), pref_job(job, objective), strict=True))
    paths[which].write_text(line if isinstance(line, str) else json.dumps(line) + "\n")
    job.run()
    assert job.proc is not None and job.proc.returncode == 3, job.log
    error = finished(job)["error"]
    assert message in error and str(paths[which]) in error, error
    assert one_failure_line(job) and "Traceback" not in job.log


def test_missing_preference_file_exits_3(job: Job) -> None:
    _, evals = pref_job(job, "dpo")
    evals.unlink()
    job.run()
    assert job.proc is not None and job.proc.returncode == 3
    assert finished(job)["error"] == f"At 'dataset.pref_eval_path': {evals} not found"


# ---------------------------------------------------------------------------------------- exit-code mapping


@pytest.fixture
def trainer_module() -> Iterator[ModuleType]:
    """The script imported by path, as the trainer's interpreter would run it (it imports nothing heavy at top)."""
    spec = importlib.util.spec_from_file_location("train_qlora_under_test", TRAINER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    previous = signal.getsignal(signal.SIGTERM)
    yield module
    signal.signal(signal.SIGTERM, previous)


class OutOfMemoryError(RuntimeError):
    """Named like ``torch.OutOfMemoryError``, which is how the trainer recognises it without importing torch."""


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 4, "out of memory: OutOfMemoryError"),
        (MemoryError(), 4, "out of memory: MemoryError"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), 4, "allocate"),
        (ValueError("something else broke"), 1, "ValueError: something else broke"),
    ],
)
def test_errors_map_to_exit_codes_and_job_finished(
    trainer_module: ModuleType, job: Job, monkeypatch: pytest.MonkeyPatch, exc: BaseException, code: int, text: str
) -> None:
    def run(*args: Any) -> dict[str, Any]:
        raise exc

    monkeypatch.setattr(trainer_module, "run", run)
    job.write()
    assert trainer_module.main(["--config", str(job.config_path)]) == code
    end = finished(job)
    assert end["exit_code"] == code and end["status"] == "failed" and text in end["error"]
    assert not job.result_path.exists()


def test_sigterm_handler_unwinds_to_cancelled(
    trainer_module: ModuleType, job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    def run(*args: Any) -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(trainer_module, "run", run)
    job.write()
    assert trainer_module.main(["--config", str(job.config_path)]) == 143
    end = finished(job)
    assert end["status"] == "cancelled" and "signal 15" in end["error"]
