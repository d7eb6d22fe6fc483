"""Configuration: pydantic-settings models, loaded from YAML + environment, strict, with every error's path.

Precedence: CLI overrides > environment (``CHATOS_RETRAIN_<SECTION>__<KEY>``) > YAML file > defaults.
Relative paths in the YAML file are resolved against the file's folder once, at load, and stored absolute;
relative paths from the environment or the CLI are resolved against the current directory.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "CHATOS_RETRAIN_"
SEARCH_PATH = (
    Path("/etc/chatos-retrain/retrain.yaml"),
    Path("~/.config/chatos-retrain/retrain.yaml"),
)
DEFAULT_STATE_DIR = Path("~/.local/state/chatos-retrain")

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"6h"``, ``"1d"`` -> seconds (float). Negative values are rejected."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90, '90s', '15m', '6h' or '1d'")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _UNIT_S[m.group(2)]
    raise ValueError(f"expected a duration such as 90, '90s', '15m', '6h' or '1d', got {value!r}")


Duration = Annotated[float, BeforeValidator(parse_duration)]


def _split_list(value: Any) -> Any:
    """Lets the environment give a list as ``a,b`` as well as JSON (``["a","b"]``)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return yaml.safe_load(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]


def _absolute(value: Any) -> Any:
    """Expand ``~`` and make a path absolute against the current directory (YAML paths arrive absolute already)."""
    if isinstance(value, str | Path) and str(value):
        p = Path(value).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else (Path.cwd() / p).absolute()))
    if isinstance(value, str | Path):
        raise ValueError("an empty path is not allowed")
    return value


AbsPath = Annotated[Path, BeforeValidator(_absolute)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(v, timezone="UTC")
        except ValueError as exc:
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
        if v and _looks_like_path(v):
            p = Path(v).expanduser()
            return os.path.normpath(p if p.is_absolute() else (Path.cwd() / p).absolute())
        return v
    chat_template: str = "qwen-2.5"
    max_steps: int = Field(default=60, ge=1)
    timeout: Duration = Field(default=4 * 3600.0, gt=0)
    env: dict[str, str] = Field(default_factory=dict)
    config_template: AbsPath | None = None
    retry_backoff: Duration = Field(default=600.0, gt=0)


class GateSettings(Section):
    tolerance: float = Field(default=0.0, ge=0.0)


class ExportSmokeSettings(Section):
    enabled: bool = True
    require_stop: bool = True
    prompt: str = "Reply with one short sentence: what is 2 + 2?"
    num_predict: int = Field(default=64, ge=1, le=4096)


class ExportSettings(Section):
    enabled: bool = True
    quantization: Literal["f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k"] = "q8_0"
    llama_cpp_dir: AbsPath | None = None
    quantize_bin: AbsPath | None = None
    timeout: Duration = Field(default=2 * 3600.0, gt=0)
    smoke: ExportSmokeSettings = Field(default_factory=ExportSmokeSettings)


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
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(self.host)
            host = parts.hostname or ""
        except ValueError:
            raise ValueError(f"host {self.host!r} is not a URL") from None
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError(f"host {self.host!r} must look like http://127.0.0.1:11434")
        if not (host in ("localhost", "::1") or host.startswith("127.")) and not self.allow_remote:
            raise ValueError(f"host {self.host!r} is not a loopback address; set ollama.allow_remote: true to allow it")
        return self


class ServiceSettings(Section):
    stop_timeout_s: Duration = Field(default=30.0, gt=0)
    runtime_dir: AbsPath | None = None


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


# Fields holding paths, by section: resolved against the YAML file's folder, then made absolute.
PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "store": ("root",),
    "state": ("dir",),
    "training": ("python", "config_template", "base_model"),
    "export": ("llama_cpp_dir", "quantize_bin"),
    "service": ("runtime_dir",),
}


class _YamlSource(PydanticBaseSettingsSource):
    """The YAML file, with relative paths resolved against its folder."""

    def __init__(self, settings_cls: type[BaseSettings], data: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = dict(data)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


class Settings(BaseSettings):
    """The whole service configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        case_sensitive=False,
    )

    store: StoreSettings = Field(default_factory=StoreSettings)
    state: StateSettings = Field(default_factory=StateSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    dataset: DatasetSettings = Field(default_factory=DatasetSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    ollama: OllamaSettings = Field(default_factory=OllamaSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        yaml_data = _LOAD_CONTEXT.get("yaml", {})
        return init_settings, env_settings, _YamlSource(settings_cls, yaml_data)

    def state_dir(self) -> Path:
        """``$STATE_DIRECTORY`` (systemd) wins, then ``state.dir``, then ``~/.local/state/chatos-retrain``."""
        env = os.environ.get("STATE_DIRECTORY")
        if env:
            return Path(env.split(":")[0]).absolute()
        if self.state.dir is not None:
            return self.state.dir
        return DEFAULT_STATE_DIR.expanduser().absolute()

    def runtime_dir(self) -> Path:
        """``$RUNTIME_DIRECTORY`` (systemd) wins, then ``service.runtime_dir``, then the state dir."""
        env = os.environ.get("RUNTIME_DIRECTORY")
        if env:
            return Path(env.split(":")[0]).absolute()
        if self.service.runtime_dir is not None:
            return self.service.runtime_dir
        system_run = Path("/run/chatos-retrain")  # the system unit's RuntimeDirectory=, seen from the CLI too
        if system_run.is_dir() and os.access(system_run, os.X_OK):
            return system_run
        return self.state_dir()


_LOAD_CONTEXT: dict[str, Any] = {}
_LOAD_LOCK = threading.Lock()


class ConfigError(Exception):
    """A configuration that cannot be used. ``errors`` holds one ``At 'path': message`` line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: {len(errors)} configuration error(s)")
        self.source = source
        self.errors = errors


def find_config(explicit: Path | None) -> Path | None:
    """The file to load: ``--config``, else the first of the search path that exists, else None (defaults)."""
    if explicit is not None:
        return explicit
    for candidate in SEARCH_PATH:
        p = candidate.expanduser()
        if p.is_file():
            return p
    return None


def _looks_like_path(value: str) -> bool:
    """``training.base_model`` is a local folder when it starts like a path, else a hub id (``Qwen/Qwen2.5-0.5B``)."""
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def _resolve_yaml_paths(data: dict[str, Any], base: Path) -> None:
    for section, names in PATH_FIELDS.items():
        sec = data.get(section)
        if not isinstance(sec, dict):
            continue
        for name in names:
            value = sec.get(name)
            if isinstance(value, str) and value and (name != "base_model" or _looks_like_path(value)):
                p = Path(value).expanduser()
                sec[name] = os.path.normpath(p if p.is_absolute() else (base / p).absolute())


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a config file into a dict with paths made absolute. Raises ConfigError (one line each)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), ["At '': file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"At '': cannot read: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(str(path), [f"At '': invalid YAML{where}: {problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"At '': expected a mapping of sections, got {type(data).__name__}"])
    _resolve_yaml_paths(data, path.parent.absolute())
    return data


def format_errors(exc: ValidationError) -> list[str]:
    """pydantic errors -> ``At 'section.key': message`` lines, in document order."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"At '{loc}': {msg}")
    return lines


def load(config: Path | None = None, overrides: Mapping[str, Any] | None = None) -> tuple[Settings, Path | None]:
    """Load the effective settings. Returns (settings, the file used or None). Raises ConfigError."""
    path = find_config(config)
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path else "environment/defaults"
    with _LOAD_LOCK:
        _LOAD_CONTEXT["yaml"] = data
        try:
            settings = Settings(**dict(overrides or {}))
        except ValidationError as exc:
            raise ConfigError(source, format_errors(exc)) from None
        except ValueError as exc:  # pydantic-settings parse errors of env values (bad JSON)
            raise ConfigError(source, [f"At '': {exc}"]) from None
        finally:
            _LOAD_CONTEXT.pop("yaml", None)
    return settings, path


def iter_keys(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[str]:
    """Every config key as a dotted path (for documentation checks)."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section) and ann is not Window:
            yield from iter_keys(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def dump(settings: Settings) -> dict[str, Any]:
    """The effective config as plain JSON-able data (paths as strings)."""
    return settings.model_dump(mode="json")
