"""One training run: load, evaluate the base, train, evaluate, save the adapter, evaluate the champion.

:func:`run` returns the run's part of ``result.json``; torch & co. are imported inside it, after the config and the
data were checked.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import qlora_backends
from qlora_metrics import MetricsLog, make_callback, num
from trainer_common import ConfigError, is_oom, one_line, sayer

say = sayer("train_qlora")


def quiet_offline_env(model: str) -> None:
    """No hub lookup for a local base, no telemetry, no progress bars, no tokenizer threads warning."""
    if os.path.isabs(model):
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local base must never trigger a hub lookup
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pick_backend(backend: str, cuda: bool) -> str:
    """"auto" is Unsloth on a GPU when it imports, else transformers; an explicit "unsloth" must import."""
    if backend == "auto":
        backend = "transformers"
        if cuda:
            try:
                import unsloth

                backend = "unsloth"
            except Exception as e:
                say(f"auto backend: unsloth unavailable ({one_line(e)}); using transformers")
    elif backend == "unsloth":
        try:
            import unsloth  # noqa: F401
        except Exception as e:
            raise ConfigError(f"backend 'unsloth' but {sys.executable} cannot import unsloth: {one_line(e)}") from e
    return backend


def run(
    cfg: dict[str, Any], train: list[Any], evals: list[Any], log: MetricsLog, progress: dict[str, Any]
) -> dict[str, Any]:
    """Load, evaluate the base, train, evaluate, save the adapter, evaluate the champion. Heavy imports live here.

    ``progress`` (last step and train loss) is kept current so that a failed or cancelled run still reports them.
    """
    name = cfg["model"]["name"]
    quiet_offline_env(name)
    import torch

    cuda = torch.cuda.is_available()
    backend = pick_backend(cfg["backend"], cuda)
    say(f"backend {backend} on {'cuda' if cuda else 'cpu'}; model {name}; template {cfg['model']['chat_template']}")

    recorder = make_callback(log, progress)  # after `import unsloth`: it imports transformers
    trainer, model, tok, info = qlora_backends.build(backend)(cfg, train, evals, cuda, recorder)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_loss = num(trainer.evaluate().get("eval_loss"))
    log.event("evaluated", phase="base", eval_loss=base_loss)

    started = time.monotonic()
    try:
        out = trainer.train()
    finally:
        recorder.flush()  # a cancelled or crashed run still reports its last logged step
    train_seconds = time.monotonic() - started

    after_loss = num(trainer.evaluate().get("eval_loss"))
    log.event("evaluated", phase="candidate", eval_loss=after_loss)
    adapter_dir = save_adapter(cfg, model, tok)
    champion = cfg["gate"]["champion_adapter"]
    champion_loss, champion_error = evaluate_champion(champion, model, trainer, log)
    return {
        "backend": backend,
        "adapter_dir": str(adapter_dir),
        "first_train_loss": recorder.first_loss,
        "final_train_loss": recorder.last_loss,
        "train_loss_mean": num(out.training_loss),
        "eval_loss_before": base_loss,
        "eval_loss_after": after_loss,
        "champion_adapter": champion,
        "champion_eval_loss": champion_loss,
        "champion_error": champion_error,
        "steps": int(trainer.state.global_step),
        "epochs": num(trainer.state.epoch),
        "train_runtime_seconds": round(train_seconds, 3),
        "tokens_per_s": num(recorder.tokens / train_seconds) if recorder.tokens and train_seconds > 0 else None,
        "peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        **info,
    }


def save_adapter(cfg: dict[str, Any], model: Any, tok: Any) -> Path:
    """``output_dir/adapter``: written as ``adapter.partial`` and renamed, with the inference chat template."""
    adapter_dir = Path(cfg["training"]["output_dir"], "adapter")
    partial = adapter_dir.with_name("adapter.partial")
    for stale in (partial, adapter_dir):
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(str(partial))
    tok.chat_template = cfg["template"]["jinja"]  # the inference template (no generation markers) for export
    tok.save_pretrained(str(partial))
    os.replace(partial, adapter_dir)
    return adapter_dir


def evaluate_champion(champion: str | None, model: Any, trainer: Any, log: MetricsLog) -> tuple[Any, str | None]:
    """The champion adapter's eval loss on the same eval set: (loss, None), or (None, why not); OOM propagates."""
    if champion is None:
        return None, None
    try:
        model.load_adapter(champion, adapter_name="champion")
        model.set_adapter("champion")
        champion_loss = num(trainer.evaluate().get("eval_loss"))
        model.set_adapter("default")
        model.delete_adapter("champion")
        log.event("evaluated", phase="champion", eval_loss=champion_loss)
        return champion_loss, None
    except Exception as e:
        if is_oom(e):
            raise
        champion_error = one_line(e)
        say(f"champion adapter could not be evaluated: {champion_error}")
        return None, champion_error
