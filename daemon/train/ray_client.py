"""The Ray Jobs adapter: the only module that speaks to Ray (``ray.job_submission``, imported lazily, so the service
starts without the ``[ray]`` extra). Every call is bounded by ``timeout_s`` and every failure is one
:class:`RayError` line (head unreachable, version skew, a refused request); :mod:`daemon.train.ray_jobs` decides what
a job's statuses mean.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from daemon import log

_log = log.get("daemon.train.ray")

T = TypeVar("T")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


class RayError(Exception):
    """A one-line reason a Ray call failed; ``unreachable`` when the head did not answer (worth retrying)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class JobInfo:
    status: str  # PENDING RUNNING STOPPED SUCCEEDED FAILED
    message: str


def version_skew(client_version: str, cluster_version: str) -> str | None:
    """A one-line reason when client and cluster Ray differ in major.minor (the Jobs API is not promised across)."""
    if client_version.split(".")[:2] == cluster_version.split(".")[:2]:
        return None
    return (f"Ray version skew: this service has ray {client_version}, the cluster runs ray {cluster_version} "
            f"(install the cluster's version: pip install 'ray[default]=={cluster_version}')")


class RayClient:
    """A connected Jobs client for ``address`` (raises :class:`RayError` when the head is unreachable or its Ray
    version differs from ours)."""

    def __init__(self, address: str, *, timeout_s: float) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ray-client")
        try:
            import ray
            from ray.job_submission import JobSubmissionClient
        except ImportError as exc:
            self.close()
            raise RayError(f"executor ray needs the [ray] extra (pip install 'chatos-retrain[ray]'): {exc}") from None
        self.client_version: str = ray.__version__
        self._client: Any = self._call(lambda: JobSubmissionClient(address), "connect")
        self.cluster_version: str = str(getattr(self._client, "_server_ray_version", None) or "unknown")
        skew = version_skew(self.client_version, self.cluster_version)
        if skew is not None:
            self.close()
            raise RayError(skew)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> RayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[], T], what: str) -> T:
        future = self._pool.submit(fn)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            raise RayError(f"Ray head {self.address} did not answer {what} within {self.timeout_s:g}s",
                           unreachable=True) from None
        except (ConnectionError, OSError) as exc:  # requests' errors are OSErrors
            raise RayError(f"Ray head {self.address} unreachable ({what}): {_first_line(exc)}",
                           unreachable=True) from None
        except RuntimeError as exc:
            raise RayError(f"Ray refused {what}: {_first_line(exc)}") from None

    def info(self, submission_id: str) -> JobInfo | None:
        """The job's status, or None when the cluster does not know it."""
        try:
            got = self._call(lambda: self._client.get_job_info(submission_id), "get_job_info")
        except RayError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return None
            raise
        return JobInfo(str(getattr(got.status, "value", got.status)), str(got.message or ""))

    def submit(self, submission_id: str, *, entrypoint: str, runtime_env: Mapping[str, Any], num_gpus: float,
               num_cpus: float | None) -> bool:
        """Submit the job unless the cluster has it already (a re-submit after a crash); True when submitted now."""
        if self.info(submission_id) is not None:
            _log.info("ray.job_found", job_id=submission_id, address=self.address)
            return False
        extra: dict[str, Any] = {"entrypoint_num_gpus": num_gpus} if num_gpus else {}
        if num_cpus is not None:
            extra["entrypoint_num_cpus"] = num_cpus
        _log.info("ray.submit", job_id=submission_id, address=self.address, entrypoint=entrypoint, **extra)
        self._call(lambda: self._client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                                   runtime_env=dict(runtime_env), **extra), "submit_job")
        return True

    def stop(self, submission_id: str, why: str) -> None:
        _log.warning("ray.stop_job", job_id=submission_id, reason=why)
        self._call(lambda: self._client.stop_job(submission_id), "stop_job")

    def logs(self, submission_id: str) -> str:
        return str(self._call(lambda: self._client.get_job_logs(submission_id), "get_job_logs"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
