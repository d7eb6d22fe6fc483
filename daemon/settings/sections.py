"""The configuration's sections, one model each (``store``, ``dataset``, ``policy``, ...): their keys, defaults and
checks. Documented key by key in ``configs/retrain.example.yaml``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from daemon.settings.values import AbsPath, Duration, Section, StrList, looks_like_path


class StoreSettings(Section):
    root: AbsPath = Field(default_factory=lambda: Path("~/ChatOS-Memory").expanduser())
    max_line_bytes: int = Field(default=4 * 1024 * 1024, gt=0)

    @field_validator("root")
    @classmethod
    def _root_not_a_file(cls, v: Path) -> Path:
        try:
            bad = v.exists() and not v.is_dir()
        except OSError:  # a parent we may not enter (the CLI as another user): the service reports it later
            return v
        if bad:
            raise ValueError(f"{v} exists and is not a directory")
        return v


class StateSettings(Section):
    dir: AbsPath | None = None


class WatchSettings(Section):
    polling: bool = False
    settle_s: Duration = Field(default=5.0, gt=0)
    max_wait_s: Duration = Field(default=60.0, gt=0)
    reconcile_interval: Duration = Field(default=600.0, gt=0)
    poll_interval_s: Duration = Field(default=2.0, gt=0)
    selftest_timeout_s: Duration = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _ceiling_above_gap(self) -> WatchSettings:
        if self.max_wait_s < self.settle_s:
            raise ValueError("watch.max_wait_s must be >= watch.settle_s")
        return self


PII_KINDS = ("email", "phone", "secret", "ipv4")


class DatasetSettings(Section):
    min_score: int = Field(default=1, ge=-1, le=1)
    include_unrated: bool = False
    eval_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    min_eval_examples: int = Field(default=2, ge=0)
    min_train_examples: int = Field(default=4, ge=1)
    dedup: bool = True
    pii_scrub: bool = True
    pii_kinds: StrList = Field(default_factory=lambda: list(PII_KINDS))
    modes: StrList = Field(default_factory=lambda: ["normal", "code"])
    include_system: bool = False

    @field_validator("pii_kinds")
    @classmethod
    def _known_kinds(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if k not in PII_KINDS]
        if bad:
            raise ValueError(f"unknown PII kind(s) {bad}; known: {list(PII_KINDS)}")
        return v

    @field_validator("modes")
    @classmethod
    def _modes_not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one mode is needed (ChatOS writes 'normal' and 'code')")
        return v


class Window(Section):
    cron: str = Field(description="5-field cron expression, UTC, when the window opens")
    duration: Duration = Field(gt=0)

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        from daemon import cron

        try:
            cron.trigger(v)
        except cron.CronError as exc:
            raise ValueError(f"invalid cron expression {v!r}: {exc}") from None
        return v


class PolicySettings(Section):
    min_new_examples: int = Field(default=50, ge=0)
    min_total_examples: int = Field(default=100, ge=0)
    min_positive_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    cooldown: Duration = Field(default=6 * 3600.0)
    windows: list[Window] = Field(default_factory=list)
    max_runs_per_day: int = Field(default=2, ge=1)


class TrainingSettings(Section):
    python: AbsPath = Field(default_factory=lambda: Path(sys.executable))
    backend: Literal["auto", "unsloth", "transformers"] = "auto"
    base_model: str = ""

    @field_validator("base_model")
    @classmethod
    def _local_model_absolute(cls, v: str) -> str:
        if v and looks_like_path(v):
            p = Path(v).expanduser()
            return os.path.normpath(p if p.is_absolute() else (Path.cwd() / p).absolute())
        return v
    chat_template: str = "qwen-2.5"
    max_steps: int = Field(default=1000, ge=1)  # a cap: the plan (train.plan) decides the steps
    new_epochs: int = Field(default=4, ge=1)
    replay_ratio: float = Field(default=3.0, ge=0.0)
    warm_lr_scale: float = Field(default=1.0, gt=0.0, le=1.0)
    full_epochs: int = Field(default=1, ge=1)
    full_retrain_every: int = Field(default=10, ge=1)
    objective: Literal["sft", "kto", "dpo", "auto"] = "sft"
    kto_min_desirable: int = Field(default=4, ge=1)
    kto_min_undesirable: int = Field(default=4, ge=1)
    dpo_min_pairs: int = Field(default=4, ge=1)
    timeout: Duration = Field(default=4 * 3600.0, gt=0)
    env: dict[str, str] = Field(default_factory=dict)
    config_template: AbsPath | None = None
    retry_backoff: Duration = Field(default=600.0, gt=0)
    unload_ollama: Literal["auto"] | bool = "auto"  # auto: when ollama.host is this host
    executor: Literal["local", "ray"] = "local"  # ray: a Ray Jobs job on the cluster of the `ray` section


GateCheck = Literal["loss", "learned_new", "preference", "canary", "regressions"]
GATE_CHECKS: tuple[GateCheck, ...] = ("loss", "learned_new", "preference", "canary", "regressions")


class GateSettings(Section):
    tolerance: float = Field(default=0.0, ge=0.0)
    min_new_gain: float = Field(default=0.05, ge=0.0, lt=1.0)
    checks: list[GateCheck] = Field(default_factory=lambda: list(GATE_CHECKS), min_length=1)
    required: list[GateCheck] | None = None  # None: every check in `checks`
    preference_tolerance: float = Field(default=0.05, ge=0.0, le=1.0)
    max_canary_increase: float = Field(default=0.10, ge=0.0)
    regressions_file: AbsPath | None = None

    @model_validator(mode="after")
    def _required_runs(self) -> GateSettings:
        missing = [c for c in self.required or [] if c not in self.checks]
        if missing:
            raise ValueError(f"gate.required names {', '.join(missing)}, which gate.checks does not run")
        return self

    def required_checks(self) -> tuple[str, ...]:
        """The checks that must pass: ``required``, else every check that runs."""
        return tuple(self.checks if self.required is None else self.required)


class ExportSmokeSettings(Section):
    enabled: bool = True
    require_stop: bool = True
    prompt: str = "Reply with one short sentence: what is 2 + 2?"
    num_predict: int = Field(default=64, ge=1, le=4096)


class ExportEngineSettings(Section):
    enabled: bool = True
    n_ctx: int = Field(default=2048, ge=64)
    threads: int | None = Field(default=None, ge=1)
    max_tokens: int = Field(default=64, ge=1, le=4096)
    require_stop: bool | None = None  # None: as export.smoke.require_stop


class ExportSettings(Section):
    enabled: bool = True
    quantization: Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"] = "q8_0"
    llama_cpp_dir: AbsPath | None = None
    quantize_bin: AbsPath | None = None
    timeout: Duration = Field(default=2 * 3600.0, gt=0)
    smoke: ExportSmokeSettings = Field(default_factory=ExportSmokeSettings)
    engine: ExportEngineSettings = Field(default_factory=ExportEngineSettings)
    cache_dir: AbsPath | None = None
    auto_setup: bool = False
    merge_device: Literal["auto", "cpu", "cuda"] = "auto"
    executor: Literal["local", "ray"] = "local"  # ray: merge + convert as a Ray job (the `ray` section)


class RaySettings(Section):
    """Where ``training.executor: ray`` (and ``export.executor: ray``) send their jobs (daemon.train.ray_jobs)."""

    address: str = "http://127.0.0.1:8265"  # the head's dashboard / Jobs API
    entrypoint_num_gpus: float = Field(default=1.0, ge=0)
    entrypoint_num_cpus: float | None = Field(default=None, ge=0)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    storage: str = ""  # a directory both sides see (empty: `ray` jobs cannot run)
    cluster_storage: str | None = None  # the same directory as the cluster mounts it (None: the same path)
    python: str = ""  # the trainer interpreter on the cluster (empty: training.python)
    base_model: str = ""  # the base model's path on the cluster (empty: training.base_model)
    request_timeout_s: Duration = Field(default=30.0, gt=0)
    pending_timeout: Duration = Field(default=600.0, gt=0)
    unreachable_timeout: Duration = Field(default=120.0, gt=0)
    stop_wait_s: Duration = Field(default=10.0, gt=0)
    poll_interval_s: Duration = Field(default=1.0, gt=0)


class RetentionSettings(Section):
    job_artifacts_age: Duration = Field(default=7 * 86400.0, ge=0)
    keep_datasets: int = Field(default=3, ge=1)


class OllamaSettings(Section):
    host: str = "http://127.0.0.1:11434"
    allow_remote: bool = False
    model_name: str = "chatos-retrained"
    keep_versions: int = Field(default=3, ge=1)
    timeout_s: Duration = Field(default=30.0, gt=0)
    system: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    retry_backoff: Duration = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> OllamaSettings:
        check_loopback_url(self.host, allow_remote=self.allow_remote, key="ollama.allow_remote",
                           example="http://127.0.0.1:11434", what="host")
        return self


def loopback_host(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this host (a loopback address)."""
    from urllib.parse import urlsplit

    try:
        return loopback_host(urlsplit(url).hostname or "")
    except ValueError:
        return False


def check_loopback_url(url: str, *, allow_remote: bool, key: str, example: str, what: str = "url") -> None:
    """An http(s) URL whose host is loopback, unless ``allow_remote`` (named ``key`` in the error) says otherwise."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ValueError(f"{what} {url!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"{what} {url!r} must look like {example}")
    if not loopback_host(host) and not allow_remote:
        raise ValueError(f"{what} {url!r} is not a loopback address; set {key}: true to allow it")


class ServiceSettings(Section):
    stop_timeout_s: Duration = Field(default=30.0, gt=0)
    runtime_dir: AbsPath | None = None


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "journal", "json", "console"] = "auto"


class MetricsSettings(Section):
    textfile: AbsPath | None = None

    @field_validator("textfile")
    @classmethod
    def _prom_suffix(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix != ".prom":
            raise ValueError(f"{v} must end in .prom (node_exporter's textfile collector reads only *.prom files)")
        return v


NotifyEvent = Literal["promoted", "rejected", "job_failed", "registration_failed", "ollama_waiting"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("promoted", "rejected", "job_failed", "registration_failed",
                                          "ollama_waiting")


class NotifyWebhookSettings(Section):
    url: str | None = None  # None: no webhook
    secret: SecretStr | None = None  # shown as ****** by `config show`
    secret_file: AbsPath | None = None
    allow_remote: bool = False
    timeout_s: Duration = Field(default=10.0, gt=0)
    retries: int = Field(default=3, ge=0, le=10)
    backoff_s: Duration = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _checked(self) -> NotifyWebhookSettings:
        if self.url is not None:
            check_loopback_url(self.url, allow_remote=self.allow_remote, key="notify.webhook.allow_remote",
                               example="http://127.0.0.1:8080/hook")
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("set notify.webhook.secret or notify.webhook.secret_file, not both")
        return self


class NotifyDesktopSettings(Section):
    enabled: bool = False


class NotifyCommandSettings(Section):
    argv: list[str] = Field(default_factory=list)  # empty: no command hook
    timeout_s: Duration = Field(default=10.0, gt=0)

    @field_validator("argv")
    @classmethod
    def _argv(cls, v: list[str]) -> list[str]:
        if v and not os.path.isabs(v[0]):
            raise ValueError(f"argv[0] {v[0]!r} must be an absolute path (no shell, no PATH lookup)")
        if any(not a or "\0" in a for a in v):
            raise ValueError("argv items must be non-empty strings without NUL")
        return v


class NotifySettings(Section):
    events: list[NotifyEvent] = Field(default_factory=lambda: list(NOTIFY_EVENTS))
    ollama_wait_hours: float = Field(default=6.0, gt=0)
    webhook: NotifyWebhookSettings = Field(default_factory=NotifyWebhookSettings)
    desktop: NotifyDesktopSettings = Field(default_factory=NotifyDesktopSettings)
    command: NotifyCommandSettings = Field(default_factory=NotifyCommandSettings)
