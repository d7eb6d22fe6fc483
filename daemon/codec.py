"""The service's JSON codec: orjson when it is installed (a dependency: ~3x json's decoding, ~4x its encoding), json
otherwise, with byte-identical output either way. Pure; a leaf every layer may import."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

try:
    from orjson import JSONDecodeError as OrjsonError
    from orjson import dumps as orjson_dumps
    from orjson import loads as orjson_loads
except ImportError:  # pragma: no cover - depends on what is installed
    OrjsonError = ValueError  # type: ignore[assignment,misc]
    orjson_loads = None  # type: ignore[assignment]
    orjson_dumps = None  # type: ignore[assignment]

__all__ = ["OrjsonError", "load_json", "messages_json", "orjson_dumps", "orjson_loads"]

# Decodes JSON that this service wrote itself (stored messages, dataset lines): no rejection reasons needed.
load_json: Callable[[str | bytes], Any] = orjson_loads if orjson_loads is not None else json.loads

_enc = json.encoder.encode_basestring  # the C encoder of json.dumps(ensure_ascii=False)
_OPEN: dict[str, str] = {}


def messages_json(messages: Iterable[tuple[str, str]]) -> str:
    """``json.dumps([{"role", "content"}, ...], ensure_ascii=False, separators=(",", ":"))``, byte for byte (it runs
    once per ingested record): compact, as the dataset's lines are, so that a dataset line is
    ``'{"messages":' + this + '}'`` whenever nothing is dropped or scrubbed (see dataset.examples). orjson
    writes the same bytes as that json.dumps."""
    if orjson_dumps is not None:
        return orjson_dumps([{"role": r, "content": c} for r, c in messages]).decode()
    parts = []
    for role, content in messages:
        head = _OPEN.get(role)
        if head is None:
            head = _OPEN[role] = '{"role":' + _enc(role) + ',"content":'
        parts.append(head + _enc(content) + "}")
    return "[" + ",".join(parts) + "]"
