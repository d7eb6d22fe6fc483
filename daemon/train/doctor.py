"""Pre-flight checks (``chatos-retrain doctor``): can this config train? One line per check, with the fix."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon import proc
from daemon.settings import Settings
from daemon.train import jobspec, ray_jobs, templates
from daemon.train.ray_client import RayClient, RayError

# Runs inside the trainer's interpreter: what imports there, and what the device can do.
_PROBE = r"""
import json, importlib, sys
out = {"python": sys.version.split()[0], "modules": {}, "cuda": False, "gpus": []}
for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth"):
    try:
        if name == "unsloth" and "--no-unsloth" in sys.argv:
            raise ImportError("not probed")
        m = importlib.import_module(name)
        out["modules"][name] = getattr(m, "__version__", "?")
    except Exception as exc:
        out["modules"][name] = None
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        out.setdefault("errors", {})[name] = f"{type(exc).__name__}: {first}"
try:
    import torch
    out["cuda"] = bool(torch.cuda.is_available())
    for i in range(torch.cuda.device_count() if out["cuda"] else 0):
        free, total = torch.cuda.mem_get_info(i)
        out["gpus"].append({"name": torch.cuda.get_device_name(i), "free_gb": free / 2**30, "total_gb": total / 2**30})
except Exception:
    pass
print(json.dumps(out))
"""

MIN_FREE_GB = 2.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False  # ok, but worth a look (a CPU-only Ray cluster)

    def line(self) -> str:
        mark = ("warn" if self.warn else "ok  ") if self.ok else "FAIL"
        return f"[{mark}] {self.name}: {self.detail}" + ("" if self.ok or not self.fix else f" -> {self.fix}")


def run(settings: Settings, *, timeout: float = 180.0) -> list[Check]:
    """Every check, in the order ``doctor`` prints them; the trainer's stack only when its interpreter runs."""
    t = settings.training
    checks = [_template_check(t.chat_template), _base_model_check(t.base_model), _disk_check(settings)]
    if t.executor == "ray":  # the trainer runs on the cluster: its interpreter and GPU are checked there
        if settings.ray.base_model:
            checks[1] = Check("base model", True, f"{settings.ray.base_model} on the Ray cluster")
        return checks + _ray_checks(settings, timeout)
    info = _probe(t.python, t.backend, timeout, checks)
    if info is not None:
        checks.extend(_stack_checks(info, t.backend))
    return checks


def _template_check(name: str) -> Check:
    try:
        templates.get(name)
        return Check("chat template", True, name)
    except templates.UnknownTemplate as exc:
        return Check("chat template", False, str(exc), "set training.chat_template to one of the names")


def _base_model_check(base_model: str) -> Check:
    if not base_model:
        return Check("base model", False, "training.base_model is empty",
                     "point training.base_model at a local model folder (nothing is downloaded)")
    if jobspec.is_local_model(base_model):
        p = Path(base_model).expanduser()
        ok = (p / "config.json").is_file()
        return Check("base model", ok, str(p) + ("" if ok else " has no config.json"),
                     "use a folder written by save_pretrained (config.json, weights, tokenizer)")
    return Check("base model", True, f"hub id {base_model} (must already be in the local HF cache)")


def _disk_check(settings: Settings) -> Check:
    state_dir = settings.state_dir()
    probe_dir = state_dir if state_dir.exists() else state_dir.parent
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    free_gb = shutil.disk_usage(probe_dir).free / 2**30
    return Check("disk space", free_gb >= MIN_FREE_GB, f"{free_gb:.1f} GiB free under {probe_dir}",
                 f"free at least {MIN_FREE_GB:g} GiB for job outputs and exports")


def _probe(python: Path, backend: str, timeout: float, checks: list[Check]) -> dict[str, Any] | None:
    """Run :data:`_PROBE` in the trainer's interpreter: its answer, or None after appending the failed check."""
    if not python.exists():
        checks.append(Check("trainer interpreter", False, f"{python} does not exist",
                            "set training.python to the trainer venv's python (absolute path)"))
        return None
    want_unsloth = backend in ("unsloth", "auto")
    argv = [str(python), "-c", _PROBE] + ([] if want_unsloth else ["--no-unsloth"])
    try:
        done = proc.run_command(argv, timeout=timeout)
    except (OSError, proc.TimeoutExpired) as exc:
        checks.append(Check("trainer interpreter", False, f"{python} did not run: {exc}",
                            "check that the path is an executable Python"))
        return None
    try:
        info: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        checks.append(Check("trainer interpreter", False, f"{python} failed: {tail[0][:200]}",
                            "run it by hand to see why"))
        return None
    checks.append(Check("trainer interpreter", True, f"{python} (Python {info['python']})"))
    return info


def _ray_checks(settings: Settings, timeout: float) -> list[Check]:
    """``training.executor: ray``: the head and its Ray version, a probe job that round-trips a file through
    ``ray.storage`` and imports the training stack in the cluster's trainer interpreter, and whether a job asking
    ``entrypoint_num_gpus`` GPUs gets scheduled (a warning when not: a CPU-only cluster)."""
    ray, t = settings.ray, settings.training
    python = ray_jobs.cluster_python(t, ray)
    checks: list[Check] = []
    try:
        with RayClient(ray.address, timeout_s=ray.request_timeout_s) as client:
            checks.append(Check("Ray head", True, f"{ray.address}: ray {client.cluster_version} (ours "
                                f"{client.client_version})"))
        gpus, pending = ray.entrypoint_num_gpus, min(timeout, ray.pending_timeout)
        first = ray_jobs.probe(ray, python, _PROBE, num_gpus=gpus, pending_s=pending, timeout_s=timeout)
        if gpus and first.status == "PENDING":
            checks.append(Check("Ray GPU", True, f"no node had entrypoint_num_gpus={gpus:g} free within {pending:g}s "
                                "(a CPU-only cluster?): jobs would wait PENDING until ray.pending_timeout",
                                warn=True))
            first = ray_jobs.probe(ray, python, _PROBE, num_gpus=0, pending_s=pending, timeout_s=timeout)
        elif gpus:
            checks.append(Check("Ray GPU", True, f"a job asking {gpus:g} GPU was scheduled"))
        else:
            checks.append(Check("Ray GPU", True, "ray.entrypoint_num_gpus is 0: jobs train on a CPU", warn=True))
    except RayError as exc:
        return [*checks, Check("Ray head" if not checks else "Ray storage", False, str(exc),
                               "start the head (ray start --head --dashboard-host=...), check ray.address, "
                               "ray.storage and the Ray version")]
    checks.append(Check("Ray storage", first.round_trip, f"{ray.storage} " + (
        "round-trips a file with the cluster" if first.round_trip else f"did not round-trip (probe {first.status})"),
        "mount the same directory on the cluster (ray.cluster_storage: its path there)"))
    try:
        info: dict[str, Any] = json.loads(first.log.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = first.log.strip().splitlines()[-1:] or [f"the probe job ended {first.status}"]
        return [*checks, Check("trainer interpreter", False, f"{python} on the cluster: {tail[0][:200]}",
                               "set ray.python to the cluster's trainer venv python (absolute)")]
    checks.append(Check("trainer interpreter", True, f"{python} on the cluster (Python {info['python']})"))
    return checks + _stack_checks(info, t.backend)


def _stack_checks(info: dict[str, Any], backend: str) -> list[Check]:
    """The training stack's imports and the GPU, from the probe's answer."""
    checks: list[Check] = []
    mods = info["modules"]
    for name in ("torch", "transformers", "trl", "peft"):
        ok = mods.get(name) is not None
        err = info.get("errors", {}).get(name, "")
        checks.append(Check(f"import {name}", ok, mods.get(name) or err,
                            "pip install torch==2.13.0 first, then -e '.[train]' into that interpreter"))
    if backend == "unsloth":
        ok = mods.get("unsloth") is not None
        checks.append(Check("import unsloth", ok, mods.get("unsloth") or info.get("errors", {}).get("unsloth", ""),
                            "install the gpu extra into its own venv and set training.python to it"))
    gpus = info.get("gpus", [])
    if backend == "unsloth" or (backend == "auto" and mods.get("unsloth")):
        checks.append(Check("GPU", bool(gpus), ", ".join(f"{g['name']} ({g['free_gb']:.1f}/{g['total_gb']:.1f} "
                                                         "GiB free)" for g in gpus) or "no CUDA device",
                            "the unsloth backend wants a GPU; use backend transformers on CPU"))
    else:
        checks.append(Check("GPU", True, ", ".join(g["name"] for g in gpus) or "none (CPU training)"))
    return checks
