"""``export.executor: ray``: the merge + convert child as a Ray job, so this machine needs neither torch nor a GPU.

The export's config (:func:`daemon.publish.export.merge_config`, built for this machine) is moved to the cluster's
view of ``ray.storage`` (:func:`cluster_config`, pure): the adapter and the trainer's scripts are copied to
``<storage>/<job_id>-export/``, the converter once to ``<storage>/converters/<name>/``; the child writes its GGUF and
``export_result.json`` there; the GGUF comes back into ``exports/<job_id>/`` streamed in 1 MiB chunks and checked
against the sha256 the child computed, and the result's paths are mapped back to ours, so the export is judged and
registered as a local one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from daemon import log
from daemon.settings import Settings
from daemon.train import ray_jobs, runner
from daemon.train.ray_client import RayError

_log = log.get("daemon.publish.ray_export")
CHUNK = 1 << 20


def cluster_config(cfg: Mapping[str, Any], *, there: str, converters: str, python: str, cluster_python: str,
                   base_model: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The export config as the cluster runs it, and the path map back (cluster -> local) for its result. ``there``:
    the export's storage folder as the cluster sees it; ``converters``: the converters' folder there."""
    conv_root = str(cfg["converter"]["root"])
    forward = {str(cfg["out_dir"]): there, str(cfg["adapter_dir"]): f"{there}/adapter",
               conv_root: f"{converters}/{Path(conv_root).name}", python: cluster_python}
    if base_model:
        forward[str(cfg["base_model"])] = base_model
    mapped: dict[str, Any] = ray_jobs.map_back(dict(cfg), forward)
    return mapped, {v: k for k, v in forward.items()}


def stream_back(src: Path, dst: Path, want_sha256: str) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` in chunks through ``dst``'s ``.partial`` twin, hashing as it goes; renamed into place
    only when the sha256 matches ``want_sha256`` (else the partial is removed and ValueError says so)."""
    partial = dst.with_name(dst.name + ".partial")
    h, size = hashlib.sha256(), 0
    with src.open("rb") as f, partial.open("wb") as out:
        while block := f.read(CHUNK):
            h.update(block)
            out.write(block)
            size += len(block)
        out.flush()
        os.fsync(out.fileno())
    digest = h.hexdigest()
    if digest != want_sha256.removeprefix("sha256:"):
        partial.unlink(missing_ok=True)
        raise ValueError(f"the GGUF copied back from ray.storage has sha256 {digest}, the export child wrote "
                         f"{want_sha256}")
    os.replace(partial, dst)
    return digest, size


def _stage(here: Path, converters_here: Path, cfg: Mapping[str, Any], mapped: Mapping[str, Any]) -> None:
    import yaml

    try:
        here.mkdir(parents=True, exist_ok=True)
        shutil.copytree(cfg["adapter_dir"], here / "adapter", dirs_exist_ok=True)
        shutil.copytree(runner.TRAINER_SCRIPT.parent, here / "trainer", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        conv = Path(cfg["converter"]["root"])
        done = converters_here / conv.name / ".complete"
        if not done.is_file():  # once per converter version, shared by every export
            shutil.copytree(conv, converters_here / conv.name, dirs_exist_ok=True)
            done.write_text(json.dumps(cfg["converter"].get("version")))
        (here / "export.yaml").write_text(yaml.safe_dump(dict(mapped), sort_keys=False, allow_unicode=True))
    except OSError as exc:
        raise RayError(f"ray.storage {here.parent} is not writable: {exc.strerror or exc}") from None


def run(settings: Settings, cfg: Mapping[str, Any], out_dir: Path, job_id: str, stop: threading.Event
        ) -> tuple[int | None, str]:
    """Merge + convert on the cluster; the GGUF and ``export_result.json`` end up in ``out_dir`` as a local child
    leaves them. Returns (exit status, why) like :func:`daemon.train.runner.run_supervised`."""
    ray, t = settings.ray, settings.training
    name = f"{job_id}-export"
    here, there = ray_jobs.storage_dirs(ray, name)
    converters_here, converters_there = ray_jobs.storage_dirs(ray, "converters")
    cluster_py = ray_jobs.cluster_python(t, ray)
    mapped, back = cluster_config(cfg, there=there, converters=converters_there, python=str(t.python),
                                  cluster_python=cluster_py, base_model=ray.base_model)
    _stage(here, converters_here, cfg, mapped)
    argv = [cluster_py, f"{there}/trainer/merge_export.py", "--config", f"{there}/export.yaml"]
    entry = f"cd {shlex.quote(there)} && exec {shlex.join(argv)}"
    code, why, text = ray_jobs.run_job(ray, name, entrypoint=entry, env=t.env, timeout_s=settings.export.timeout,
                                       stop=stop)
    (out_dir / "export.log").write_text(text)
    if why != "finished":
        return code, why
    _fetch(here, out_dir, cfg, back)
    if code == 0:
        shutil.rmtree(here, ignore_errors=True)  # the GGUF is home and checked: storage keeps no copy
    return code, why


def _fetch(here: Path, out_dir: Path, cfg: Mapping[str, Any], back: Mapping[str, str]) -> None:
    """The child's result, mapped to our paths, into ``cfg["result_path"]``; its GGUF streamed home and checked."""
    try:
        loaded = json.loads((here / "export_result.json").read_text())
    except (OSError, ValueError):
        return  # judged as missing by export.outcome
    result: dict[str, Any] = ray_jobs.map_back(loaded, back)
    facts = result.get("gguf") or {}
    if result.get("status") == "succeeded" and facts.get("path") and facts.get("sha256"):
        name = Path(str(facts["path"])).name
        try:
            stream_back(here / name, out_dir / name, str(facts["sha256"]))
        except (OSError, ValueError) as exc:
            result = {**result, "status": "failed", "error": f"cannot bring the GGUF back: {exc}"}
    Path(cfg["result_path"]).write_text(json.dumps(result, indent=2))
