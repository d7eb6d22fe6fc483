"""The settings' value types: durations (``"15m"``), lists from the environment (``a,b``), absolute paths, and the
strict base of every section."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_settings import NoDecode

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


def looks_like_path(value: str) -> bool:
    """``training.base_model`` is a local folder when it starts like a path, else a hub id (``Qwen/Qwen2.5-0.5B``)."""
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")
