"""``training.executor: ray`` against a real local Ray head (``ray start --head``, no mocks): a full CPU cycle on the
tiny model (trigger -> Ray job -> adapter back from storage -> gate -> export -> registered with the Ollama
stand-in); the service killed with SIGKILL mid-job and restarted re-attaches to the one Ray job; cancel stops the Ray
job; the head stopped mid-job is one clear reason and a backoff, and a later cycle succeeds once it is back.

The cancel, restart and head-loss tests run the fake trainer interpreter (tests/fakes) as the Ray job's entrypoint:
they test the executor, not training, and keep CI's added time small (measured in bench/README.md)."""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import fb, feedback_file, logs_file, need, need_module, rec, write_lines
from ollama_standin import StandinServer
from ray_head import Head, new_head, remove

from daemon.cycle.context import CycleResult
from daemon.cycle.pipeline import CycleRequest, run_cycle
from daemon.demo.storegen import generate_store
from daemon.publish.converter import default_cache_dir, installed
from daemon.state import State
from daemon.train.ray_client import RayClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ray_head() -> Iterator[Head]:
    """One real Ray head for the session (its Jobs API on a free port); stopped at the end."""
    need_module("ray.job_submission", "ray[default] is not installed: pip install -e '.[dev]' (or '.[ray]')")
    head = new_head().start()
    try:
        yield head
    finally:
        head.stop()
        remove(head)


def jobs_on(head: Head) -> list[Any]:
    from ray.job_submission import JobSubmissionClient

    return list(JobSubmissionClient(head.address).list_jobs())


def wait_for(pred: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def ray_section(head: Head, default_storage: Path, **kw: Any) -> dict[str, Any]:
    base = {"address": head.address, "storage": str(default_storage), "entrypoint_num_gpus": 0, "poll_interval_s": 0.2}
    return base | kw


def test_a_cpu_cycle_trains_on_ray_gates_exports_on_ray_and_registers(
    ray_head: Head, tiny_models: dict[str, Path], make_settings: Any, store: Path, tmp_path: Path,
    ollama_standin: StandinServer,
) -> None:
    need(installed(default_cache_dir()) is not None,
         f"the converter is not set up in {default_cache_dir()}: run .ci/train-setup.sh")
    model = tiny_models["qwen2"]
    overrides = tmp_path / "ray-job-overrides.yaml"
    overrides.write_text("training:\n  learning_rate: 0.01\n  eval_steps: null\nlora:\n  r: 8\n")
    generate_store(store, 80, days=2, seed=31, assistant_words=(6, 20), feedback_fraction=0.7)
    s = make_settings(
        training={"python": sys.executable, "base_model": str(model), "backend": "transformers", "max_steps": 8,
                  "timeout": "10m", "env": {"OMP_NUM_THREADS": "1"}, "config_template": str(overrides),
                  "executor": "ray"},
        ray=ray_section(ray_head, tmp_path / "ray-storage"),
        policy={"min_new_examples": 5, "min_total_examples": 5, "cooldown": 0, "max_runs_per_day": 20},
        dataset={"min_train_examples": 4, "min_eval_examples": 2},
        gate={"tolerance": 10.0, "min_new_gain": 0.0, "required": ["loss"]},
        export={"quantization": "q8_0", "smoke": {"require_stop": False}, "executor": "ray"},
        ollama={"host": ollama_standin.url, "model_name": "chatos-ray", "keep_versions": 1, "timeout_s": 30},
    )
    steps: list[str] = []
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None), progress=lambda phase, d: steps.append(d) if phase == "training"
                      else None)
        assert r.outcome == "registered" and r.model_tag == "chatos-ray:v1", r.reason
        row = st.jobs.get(r.job_id or "")
        assert row is not None and row.params["executor"] == "ray" and row.status == "promoted"
        version = st.models.get(1)
        assert version is not None
    # training and the export ran on Ray under our job id, and the adapter and result came home with our paths
    ours = {j.submission_id: str(j.status.value) for j in jobs_on(ray_head) if r.job_id in (j.submission_id or "")}
    assert ours == {r.job_id: "SUCCEEDED", f"{r.job_id}-export": "SUCCEEDED"}
    gguf = Path(version.gguf_path)
    assert gguf.is_relative_to(s.state_dir() / "exports") and gguf.name == "chatos-ray-v1.q8_0.gguf"
    assert version.gguf_sha256 == "sha256:" + hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert not (tmp_path / "ray-storage" / f"{r.job_id}-export").exists()  # the GGUF is not left in storage
    assert "[merge_export]" in (gguf.parent / "export.log").read_text()  # the child's log, from Ray
    assert Path(row.result_path).is_file() and row.result is not None
    adapter = Path(row.result["adapter_dir"])
    assert adapter.is_relative_to(Path(row.job_dir)) and (adapter / "adapter_config.json").is_file()
    assert row.result["base_model"] == str(model)
    lines = Path(row.metrics_path).read_text().splitlines()
    assert '"job_finished"' in lines[-1] and any(f"step {row.result['steps']}/" in d for d in steps)
    assert "Running entrypoint for job" in Path(row.log_path).read_text()  # Ray's log, for `logs`


def fake_settings(make_settings: Any, head: Head, fake_python: Path, base_model: Path, tmp_path: Path,
                  mode: str = "slow_ok", **ray: Any) -> Any:
    return make_settings(
        training={"python": str(fake_python), "base_model": str(base_model), "backend": "transformers",
                  "max_steps": 20, "env": {"FAKE_TRAINER_MODE": mode, "FAKE_STEP_S": "0.3"}, "retry_backoff": 1,
                  "executor": "ray"},
        ray=ray_section(head, tmp_path / "ray-storage", **ray),
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0, "max_runs_per_day": 10},
        dataset={"min_train_examples": 1, "min_eval_examples": 1},
        export={"enabled": False},
    )


def records(store: Path, n: int = 6, prefix: str = "a") -> None:
    write_lines(logs_file(store), [rec(f"{prefix}0000000000{i}", answer=f"a{i}") for i in range(n)])
    write_lines(feedback_file(store), [fb(f"{prefix}0000000000{i}", True) for i in range(n)])


def in_thread(fn: Callable[[], CycleResult]) -> tuple[threading.Thread, list[CycleResult]]:
    out: list[CycleResult] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def running_job(st: State) -> str:
    rows = st.jobs.recent(status="running")
    return rows[0].job_id if rows and rows[0].latest_metrics else ""


def test_cancel_stops_the_ray_job_and_the_cycle_says_cancelled(
    ray_head: Head, make_settings: Any, store: Path, fake_python: Path, base_model: Path, tmp_path: Path
) -> None:
    records(store)
    s = fake_settings(make_settings, ray_head, fake_python, base_model, tmp_path, mode="hang")
    cancel, stop = threading.Event(), threading.Event()
    with State(s.state_dir()) as st:
        t, out = in_thread(lambda: run_cycle(s, st, CycleRequest(None), stop=stop, cancel=cancel))
        with State(s.state_dir()) as watch:
            job_id = wait_for(lambda: running_job(watch), "the Ray job's first step mirrored")
        cancel.set()
        t.join(120)
        assert out and out[0].outcome == "cancelled" and out[0].job_status == "cancelled", out
        assert "cancelled by an operator" in out[0].reason
        row = st.jobs.get(job_id)
        assert row is not None and row.status == "cancelled"
    with RayClient(ray_head.address, timeout_s=30) as c:
        info = c.info(job_id)
    assert info is not None and info.status == "STOPPED"


def test_kill_9_of_the_service_mid_job_reattaches_to_the_one_ray_job(
    ray_head: Head, store: Path, fake_python: Path, base_model: Path, tmp_path: Path
) -> None:
    from service_proc import Proc  # the service as a real subprocess

    records(store)
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(
        f"store:\n  root: {store}\nstate:\n  dir: {tmp_path / 'state'}\n"
        "watch:\n  settle_s: 0.3s\n  max_wait_s: 2s\n  selftest_timeout_s: 2s\n"
        "policy:\n  min_new_examples: 1\n  min_total_examples: 1\n  cooldown: 0s\n"
        "dataset:\n  min_train_examples: 1\n  min_eval_examples: 1\nexport:\n  enabled: false\n"
        f"training:\n  python: {fake_python}\n  base_model: {base_model}\n  backend: transformers\n  max_steps: 20\n"
        "  executor: ray\n  env:\n    FAKE_TRAINER_MODE: slow_ok\n    FAKE_STEP_S: '1.0'\n"
        f"ray:\n  address: {ray_head.address}\n  storage: {tmp_path / 'ray-storage'}\n  entrypoint_num_gpus: 0\n"
        "  poll_interval_s: 0.2\nlog:\n  format: json\n"
    )
    before = {j.submission_id for j in jobs_on(ray_head)}
    p = Proc(tmp_path, cfg)
    try:
        p.wait_for(lambda: p.events("ray.job_submitted"), "the Ray job submitted")
        with State(tmp_path / "state") as st:
            job_id = wait_for(lambda: running_job(st), "the Ray job's first step mirrored")
        p.p.kill()
        p.p.wait(10)
        with RayClient(ray_head.address, timeout_s=30) as c:
            assert (c.info(job_id) or c).status == "RUNNING"  # the job runs on without its service
        q = Proc(tmp_path, cfg)
        try:
            q.wait_for(lambda: [e for e in q.events("job.reattached") if e.get("job_id") == job_id], "re-attached")
            q.wait_for(lambda: [e for e in q.events("cycle.summary") if e.get("job_id") == job_id], "its cycle",
                       timeout=120)
        finally:
            q.close()
    finally:
        p.close()
    new = [j for j in jobs_on(ray_head) if j.submission_id not in before]
    assert [(j.submission_id, str(j.status.value)) for j in new] == [(job_id, "SUCCEEDED")]  # one job, not two
    with State(tmp_path / "state") as st:
        row = st.jobs.get(job_id)
        assert row is not None and row.status == "promoted" and row.result is not None
        assert Path(row.result["adapter_dir"]).is_relative_to(Path(row.job_dir))


def test_head_stopped_mid_job_is_one_reason_then_a_backoff_and_a_later_cycle_succeeds(
    ray_head: Head, make_settings: Any, store: Path, fake_python: Path, base_model: Path, tmp_path: Path
) -> None:
    records(store)
    s = fake_settings(make_settings, ray_head, fake_python, base_model, tmp_path, mode="hang",
                      unreachable_timeout=3, request_timeout_s=5)
    with State(s.state_dir()) as st:
        t, out = in_thread(lambda: run_cycle(s, st, CycleRequest(None)))
        with State(s.state_dir()) as watch:
            wait_for(lambda: running_job(watch), "the Ray job's first step mirrored")
        ray_head.stop()
        try:
            t.join(120)
            assert out and out[0].outcome == "train_failed", out
            assert f"Ray head {ray_head.address} unreachable" in out[0].reason and "\n" not in out[0].reason
            assert st.service.get().train_backoff_until is not None
        finally:
            ray_head.start()  # the session's head comes back (same address) for this test and any after it
        ok = fake_settings(make_settings, ray_head, fake_python, base_model, tmp_path, mode="ok")
        time.sleep(1.5)  # training.retry_backoff is 1s
        records(store, prefix="b")
        r = run_cycle(ok, st, CycleRequest(None))
        assert r.outcome == "promoted", r.reason


@pytest.mark.parametrize("case", ["pending", "storage", "unreachable", "failed"])
def test_each_failure_is_one_line(
    case: str, ray_head: Head, make_settings: Any, store: Path, fake_python: Path, base_model: Path, tmp_path: Path
) -> None:
    records(store)
    ray: dict[str, Any] = {}
    if case == "pending":  # a CPU-only head never has the GPU the entrypoint asks for
        ray = {"entrypoint_num_gpus": 1, "pending_timeout": 2}
    elif case == "storage":  # a file where the directory should be (a read-only mode would not stop root)
        (tmp_path / "taken").write_text("")
        ray = {"storage": str(tmp_path / "taken" / "storage")}
    elif case == "unreachable":
        ray = {"address": "http://127.0.0.1:9", "request_timeout_s": 5}
    s = fake_settings(make_settings, ray_head, fake_python, base_model, tmp_path,
                      mode="oom" if case == "failed" else "slow_ok", **ray)
    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None))
        job = st.jobs.get(r.job_id or "")
    assert r.outcome == "train_failed" and "\n" not in r.reason, r.reason
    expected = {
        "pending": "still PENDING after ray.pending_timeout (2s): no node has entrypoint_num_gpus=1 free",
        "storage": f"ray.storage {tmp_path / 'taken' / 'storage'} is not writable: Not a directory",
        "unreachable": "Ray head http://127.0.0.1:9 unreachable (connect)",
        "failed": "Ray job FAILED (out of memory): CUDA out of memory",
    }[case]
    assert expected in r.reason
    assert job is not None and job.status == "failed" and expected in (job.error or "")
    if case == "pending":
        with RayClient(ray_head.address, timeout_s=30) as c:
            info = c.info(job.job_id)
        assert info is not None and info.status in ("STOPPED", "PENDING")  # stop_job sent; Ray may still settle


def test_doctor_checks_the_head_storage_gpu_and_the_cluster_s_stack(
    ray_head: Head, make_settings: Any, tmp_path: Path, base_model: Path
) -> None:
    from daemon.train import doctor

    s = make_settings(training={"python": sys.executable, "base_model": str(base_model), "backend": "transformers",
                                "executor": "ray"},
                      ray=ray_section(ray_head, tmp_path / "ray-storage", entrypoint_num_gpus=1, pending_timeout=5))
    lines = {c.name: c.line() for c in doctor.run(s, timeout=120)}
    assert lines["Ray head"].startswith("[ok  ] Ray head: ") and "ray 2.60" in lines["Ray head"]
    assert lines["Ray GPU"].startswith("[warn] Ray GPU: no node had entrypoint_num_gpus=1 free within 5s")
    assert lines["Ray storage"] == f"[ok  ] Ray storage: {tmp_path / 'ray-storage'} round-trips a file with the cluster"
    assert lines["trainer interpreter"].startswith(f"[ok  ] trainer interpreter: {sys.executable} on the cluster")
    assert lines["import torch"].startswith("[ok  ] import torch: 2.")
    assert list((tmp_path / "ray-storage").iterdir()) == []  # the probes clean up
    down = make_settings(training={"executor": "ray"},
                         ray={"address": "http://127.0.0.1:9", "storage": str(tmp_path), "request_timeout_s": 5})
    bad = [c for c in doctor.run(down, timeout=8) if not c.ok]
    assert [c.name for c in bad] == ["base model", "Ray head"] and "unreachable" in bad[1].detail


def test_cancel_without_a_service_stops_the_job_on_its_cluster(
    ray_head: Head, make_settings: Any, store: Path, fake_python: Path, base_model: Path, tmp_path: Path
) -> None:
    import subprocess

    import yaml

    records(store)
    s = fake_settings(make_settings, ray_head, fake_python, base_model, tmp_path, mode="hang")
    cfg = tmp_path / "retrain.yaml"
    cfg.write_text(yaml.safe_dump({"store": {"root": str(store)}, "state": {"dir": str(s.state_dir())},
                                   "service": {"runtime_dir": str(tmp_path / "run")},
                                   "training": {"executor": "ray"}, "ray": dict(s.ray.model_dump())}))
    with State(s.state_dir()) as st:
        t, out = in_thread(lambda: run_cycle(s, st, CycleRequest(None)))
        with State(s.state_dir()) as watch:
            job_id = wait_for(lambda: running_job(watch), "the Ray job's first step mirrored")
        done = subprocess.run([sys.executable, "-m", "daemon", "--config", str(cfg), "cancel", job_id],
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0 and done.stdout.strip() == f"cancelled {job_id}", done.stderr
        t.join(120)
        assert out and out[0].outcome == "cancelled", out
    with RayClient(ray_head.address, timeout_s=30) as c:
        info = c.info(job_id)
    assert info is not None and info.status == "STOPPED"


def test_a_job_its_cluster_does_not_know_is_interrupted_at_the_re_attach(
    ray_head: Head, make_settings: Any, tmp_path: Path
) -> None:
    from daemon.train import ray_jobs, runner

    s = make_settings(training={"executor": "ray"}, ray=ray_section(ray_head, tmp_path / "ray-storage"))
    job_dir = tmp_path / "state" / "jobs" / "j-lost"
    cfg = {"job_id": "j-lost", "backend": "transformers", "model": {}, "lora": {},
           "training": {"output_dir": str(job_dir / "output")}, "metrics": {"output_path": str(job_dir / "m.jsonl")},
           "result": {"output_path": str(job_dir / "result.json")}}
    with State(s.state_dir()) as st:  # recorded, then the service died before the submit reached the head
        runner.record_job(st, config=cfg, dataset_version=1, cycle_id=None, executor={"executor": "ray"})
        live, lost = runner.reattach(st)
        assert [j.id for j in live] == ["j-lost"] and lost == []  # a Ray job is asked about, not given up
        out = ray_jobs.supervise(st, live[0], s.ray, timeout_s=60, cancel=threading.Event(), stop=threading.Event())
        assert (out.status, out.reason) == ("interrupted", f"the Ray cluster at {ray_head.address} does not know job "
                                            "j-lost (its head restarted, or the job was never submitted)")
        row = st.jobs.get("j-lost")
        assert row is not None and row.status == "interrupted" and row.error == out.reason
