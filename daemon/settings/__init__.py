"""Configuration: pydantic-settings models, loaded from YAML + environment, strict, with every error's path.

Precedence: CLI overrides > environment (``CHATOS_RETRAIN_<SECTION>__<KEY>``) > YAML file > defaults.
Relative paths in the YAML file are resolved against the file's folder once, at load, and stored absolute;
relative paths from the environment or the CLI are resolved against the current directory.

Split by role: value types (``values``), the sections' models (``sections``), and here the whole ``Settings``
and its loading. Every name callers use is importable from ``daemon.settings``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from daemon.settings.sections import (
    PII_KINDS,
    DatasetSettings,
    ExportSettings,
    ExportSmokeSettings,
    GateSettings,
    LogSettings,
    MetricsSettings,
    NotifySettings,
    OllamaSettings,
    PolicySettings,
    RaySettings,
    RetentionSettings,
    ServiceSettings,
    StateSettings,
    StoreSettings,
    TrainingSettings,
    WatchSettings,
    Window,
)
from daemon.settings.values import AbsPath, Duration, Section, StrList, looks_like_path, parse_duration

__all__ = [
    "DEFAULT_STATE_DIR",
    "ENV_PREFIX",
    "PATH_FIELDS",
    "PII_KINDS",
    "SEARCH_PATH",
    "AbsPath",
    "ConfigError",
    "DatasetSettings",
    "Duration",
    "ExportSettings",
    "ExportSmokeSettings",
    "GateSettings",
    "LogSettings",
    "MetricsSettings",
    "NotifySettings",
    "OllamaSettings",
    "PolicySettings",
    "RaySettings",
    "RetentionSettings",
    "Section",
    "ServiceSettings",
    "Settings",
    "StateSettings",
    "StoreSettings",
    "StrList",
    "TrainingSettings",
    "WatchSettings",
    "Window",
    "dump",
    "find_config",
    "format_errors",
    "iter_keys",
    "load",
    "parse_duration",
    "read_yaml",
]

ENV_PREFIX = "CHATOS_RETRAIN_"
SEARCH_PATH = (
    Path("/etc/chatos-retrain/retrain.yaml"),
    Path("~/.config/chatos-retrain/retrain.yaml"),
)
DEFAULT_STATE_DIR = Path("~/.local/state/chatos-retrain")


# Fields holding paths, by section: resolved against the YAML file's folder, then made absolute.
PATH_FIELDS: dict[str, tuple[str, ...]] = {
    "store": ("root",),
    "state": ("dir",),
    "training": ("python", "config_template", "base_model"),
    "export": ("llama_cpp_dir", "quantize_bin"),
    "service": ("runtime_dir",),
    "metrics": ("textfile",),
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
    ray: RaySettings = Field(default_factory=RaySettings)
    ollama: OllamaSettings = Field(default_factory=OllamaSettings)
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)

    @model_validator(mode="after")
    def _ray_needs_storage(self) -> Settings:
        users = [f"{name}.executor" for name in ("training", "export") if getattr(self, name).executor == "ray"]
        if users and not self.ray.storage:
            verb = "is" if len(users) == 1 else "are"
            raise ValueError(f"At 'ray.storage': empty, while {' and '.join(users)} {verb} ray: give it a directory "
                             "both this machine and the Ray cluster see")
        return self

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


def _resolve_yaml_paths(data: dict[str, Any], base: Path) -> None:
    for section, names in PATH_FIELDS.items():
        sec = data.get(section)
        if not isinstance(sec, dict):
            continue
        for name in names:
            value = sec.get(name)
            if isinstance(value, str) and value and (name != "base_model" or looks_like_path(value)):
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
        lines.append(f"At '{loc}': {msg}" if loc else msg)  # a cross-section rule names its own key
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
