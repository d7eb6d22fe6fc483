"""The Ray executor's pure parts: where a job's files go on the cluster and how its paths come back, its entrypoint
and runtime_env, what a terminal Ray status means, and the version-skew line."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from daemon.settings import RaySettings
from daemon.train.ray_client import version_skew
from daemon.train.ray_jobs import entrypoint, exit_code_of, map_back, outcome_of, runtime_env, stage_plan

CFG = {
    "job_id": "j-1", "model": {"name": "/models/base"},
    "dataset": {"train_path": "/state/jobs/j-1/plan/train.jsonl", "eval_path": "/state/datasets/v3/eval.jsonl",
                "new_path": None, "canary_path": "/srv/canary.jsonl", "pref_train_path": None, "pref_eval_path": None},
    "training": {"output_dir": "/state/jobs/j-1/output"}, "init": {"adapter": "/state/jobs/j-0/output/adapter"},
    "gate": {"champion_adapter": "/state/jobs/j-0/output/adapter"},
    "metrics": {"output_path": "/state/jobs/j-1/metrics.jsonl"},
    "result": {"output_path": "/state/jobs/j-1/result.json"},
}


def test_every_path_moves_under_the_job_storage_folder_and_comes_back() -> None:
    st = stage_plan(CFG, cluster_dir="/nfs/j-1", base_model="/cluster/models/base")
    c = st.config
    assert c["dataset"]["train_path"] == "/nfs/j-1/data/train.jsonl" and c["dataset"]["new_path"] is None
    assert c["dataset"]["canary_path"] == "/nfs/j-1/data/canary.jsonl"
    assert c["init"]["adapter"] == c["gate"]["champion_adapter"] == "/nfs/j-1/adapters/init"  # one copy for both
    assert (c["training"]["output_dir"], c["metrics"]["output_path"], c["result"]["output_path"]) == (
        "/nfs/j-1/output", "/nfs/j-1/metrics.jsonl", "/nfs/j-1/result.json")
    assert c["model"]["name"] == "/cluster/models/base" and CFG["model"]["name"] == "/models/base"  # input untouched
    assert sorted(name for _, name in st.copies) == ["adapters/init", "data/canary.jsonl", "data/eval.jsonl",
                                                     "data/train.jsonl"]
    result = {"adapter_dir": "/nfs/j-1/output/adapter", "init_adapter": "/nfs/j-1/adapters/init",
              "base_model": "/cluster/models/base", "steps": 3, "notes": ["/nfs/j-1x/not-ours"]}
    assert map_back(result, st.back) == {
        "adapter_dir": "/state/jobs/j-1/output/adapter", "init_adapter": "/state/jobs/j-0/output/adapter",
        "base_model": "/models/base", "steps": 3, "notes": ["/nfs/j-1x/not-ours"]}


def test_the_entrypoint_runs_the_trainer_in_its_folder_quoted_for_ray_s_shell() -> None:
    line = entrypoint("/opt/venv w/bin/python", "/nfs/j 1")
    assert shlex.split(line) == ["cd", "/nfs/j 1", "&&", "exec", "/opt/venv w/bin/python",
                                 "/nfs/j 1/trainer/train_qlora.py", "--config", "/nfs/j 1/config.yaml"]
    with pytest.raises(ValueError, match="not an absolute path"):
        entrypoint("python3", "/nfs/j-1")


def test_runtime_env_adds_ours_to_the_operator_s() -> None:
    ray = RaySettings(runtime_env={"env_vars": {"HF_HOME": "/cache"}, "py_executable": "/venv/bin/python"},
                      stop_wait_s=20)
    env = runtime_env(ray, {"OMP_NUM_THREADS": "1"}, "j-1")
    assert env["py_executable"] == "/venv/bin/python"
    assert env["env_vars"] == {"HF_HOME": "/cache", "OMP_NUM_THREADS": "1", "CHATOS_JOB_ID": "j-1",
                               "PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "20"}
    assert ray.runtime_env["env_vars"] == {"HF_HOME": "/cache"}


@pytest.mark.parametrize(("status", "message", "result", "event", "forced", "want"), [
    ("SUCCEEDED", "", {"steps": 1}, None, None, ("succeeded", "ok", 0)),
    ("SUCCEEDED", "", None, None, None, ("failed", "the Ray job SUCCEEDED but left no result.json in ray.storage", 0)),
    ("FAILED", "Job entrypoint command failed with exit code 3, last available logs", None, {"error": "no rows\nx"},
     None, ("failed", "Ray job FAILED (data problem): no rows", 3)),
    ("FAILED", "Job failed", None, None, None, ("failed", "Ray job FAILED (failed): line 2 | line 3 | line 4", None)),
    ("STOPPED", "", None, None, None, ("cancelled", "stopped on the Ray cluster", None)),
    ("STOPPED", "", None, None, ("cancelled", "cancelled by an operator"),
     ("cancelled", "cancelled by an operator", None)),
])
def test_a_terminal_status_means(status: str, message: str, result: dict[str, int] | None,
                                 event: dict[str, str] | None, forced: tuple[str, str] | None,
                                 want: tuple[str, str, int | None]) -> None:
    tail = ["line 1", "line 2", "", "line 3", "line 4"]
    assert outcome_of("j-1", status, message, result=result, finished_event=event, log_tail=tail,
                      forced=forced) == want


def test_exit_code_and_version_skew() -> None:
    assert exit_code_of("failed with exit code 143, last logs") == 143 and exit_code_of("gone") is None
    assert version_skew("2.60.0", "2.60.1") is None
    assert version_skew("2.60.0", "2.59.0") == (
        "Ray version skew: this service has ray 2.60.0, the cluster runs ray 2.59.0 (install the cluster's "
        "version: pip install 'ray[default]==2.59.0')")


def test_the_export_config_moves_to_the_cluster_and_its_result_comes_back() -> None:
    from daemon.publish.ray_export import cluster_config

    cfg = {"out_dir": "/state/exports/j-1", "adapter_dir": "/state/jobs/j-1/output/adapter",
           "base_model": "/models/base", "gguf_path": "/state/exports/j-1/m-v1.gguf",
           "converter": {"root": "/cache/llama.cpp-0.3.36", "argv": ["/venv/bin/python",
                                                                     "/cache/llama.cpp-0.3.36/convert_hf_to_gguf.py",
                                                                     "/state/exports/j-1/merged"]},
           "chat_template": "{{ '/state/exports/j-1' }}"}
    mapped, back = cluster_config(cfg, there="/nfs/j-1-export", converters="/nfs/converters", python="/venv/bin/python",
                                  cluster_python="/opt/t/bin/python", base_model="/cluster/base")
    assert mapped["adapter_dir"] == "/nfs/j-1-export/adapter" and mapped["base_model"] == "/cluster/base"
    conv = "/nfs/converters/llama.cpp-0.3.36"
    argv = ["/opt/t/bin/python", f"{conv}/convert_hf_to_gguf.py", "/nfs/j-1-export/merged"]
    assert mapped["converter"]["argv"] == argv
    assert mapped["gguf_path"] == "/nfs/j-1-export/m-v1.gguf"
    assert mapped["chat_template"] == cfg["chat_template"]  # only whole path prefixes move, never text
    assert map_back({"gguf": {"path": "/nfs/j-1-export/m-v1.gguf"}}, back) == {"gguf": {"path": cfg["gguf_path"]}}


def test_the_gguf_streams_back_only_when_its_sha256_matches(tmp_path: Path) -> None:
    import hashlib

    from daemon.publish.ray_export import stream_back

    src = tmp_path / "src.gguf"
    src.write_bytes(b"GGUF" + bytes(range(256)) * 9000)  # over two chunks
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    assert stream_back(src, tmp_path / "a.gguf", f"sha256:{good}") == (good, src.stat().st_size)
    assert (tmp_path / "a.gguf").read_bytes() == src.read_bytes()
    with pytest.raises(ValueError, match=f"has sha256 {good}, the export child wrote 00"):
        stream_back(src, tmp_path / "b.gguf", "00")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "src.gguf"]  # no partial, no b.gguf
