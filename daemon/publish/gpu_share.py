"""Sharing one GPU with Ollama: before a training job, the models Ollama holds are unloaded
(``training.unload_ollama``).

On a one-GPU box Ollama usually keeps the last chat's model in VRAM (5 minutes by default, or forever with
``OLLAMA_KEEP_ALIVE=-1``); a training job started beside it runs out of memory half way. ``GET /api/ps`` lists what is
loaded; ``POST /api/generate {"model", "keep_alive": 0}`` is Ollama's documented way to unload one now. Ollama down
or answering errors never stops a job: the trainer's VRAM preflight then says whether the job fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from daemon import log
from daemon.publish.ollama import NotFound, OllamaError, OllamaUnavailable
from daemon.publish.ollama_client import OllamaClient
from daemon.settings import Settings
from daemon.settings.sections import is_loopback_url

_log = log.get("daemon.publish.gpu_share")


@dataclass
class Freed:
    """What was unloaded (name -> bytes it held in VRAM) and why anything was not."""

    unloaded: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None
    unreachable: bool = False  # Ollama not running: it holds nothing (not a problem)

    def line(self) -> str:
        if self.skipped:
            return f"ollama left as it is: {self.skipped}"
        if self.unreachable:
            return f"ollama holds nothing: {self.error}"
        if self.error:
            return f"could not ask Ollama to unload its models: {self.error}"
        if not self.unloaded:
            return "ollama holds no model"
        gib = sum(self.unloaded.values()) / 2**30
        return f"ollama unloaded {', '.join(sorted(self.unloaded))} ({gib:.1f} GiB of VRAM freed)"


def wanted(settings: Settings) -> tuple[bool, str]:
    """Whether to unload before a job, and why: ``training.unload_ollama`` true/false, or auto = when the job runs
    here (``training.executor: local``) and Ollama runs on this host (the trainer's GPU is then the one it holds)."""
    setting = settings.training.unload_ollama
    if setting is True:
        return True, "training.unload_ollama is true"
    if setting is False:
        return False, "training.unload_ollama is false"
    if settings.training.executor != "local":
        return False, f"auto: the job runs on the {settings.training.executor} cluster, not beside Ollama"
    if is_loopback_url(settings.ollama.host):
        return True, "auto: Ollama runs on this host"
    return False, f"auto: Ollama runs on another host ({settings.ollama.host})"


def free_gpu(settings: Settings, client: OllamaClient | None = None) -> Freed:
    """Unload every model Ollama holds, when :func:`wanted`; never raises for Ollama's sake."""
    want, why = wanted(settings)
    if not want:
        return Freed(skipped=why)
    own = client is None
    client = client or OllamaClient.from_settings(settings.ollama)
    out = Freed()
    try:
        for m in client.ps():
            name = str(m.get("name") or m.get("model") or "")
            if not name:
                continue
            try:
                client.unload(name)
            except NotFound:
                continue  # deleted since it was listed: nothing held any more
            out.unloaded[name] = _int(m.get("size_vram", m.get("size")))
    except OllamaUnavailable as e:
        out.error, out.unreachable = str(e), True
    except OllamaError as e:
        out.error = str(e)
    finally:
        if own:
            client.close()
    if out.unreachable:
        _log.info("ollama.unload_skipped", reason=out.error)
    elif out.error:
        _log.warning("ollama.unload_failed", error=out.error)
    elif out.unloaded:
        _log.info("ollama.unloaded", models=sorted(out.unloaded), vram_bytes=sum(out.unloaded.values()))
    return out


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0
