"""One training run: load (warm-started from ``init.adapter`` if set), evaluate the starting weights on the eval split
and the new examples, train, evaluate both again, save the adapter, evaluate the champion on both.

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
    cfg: dict[str, Any],
    train: list[Any],
    evals: list[Any],
    new: list[Any] | None,
    log: MetricsLog,
    progress: dict[str, Any],
) -> dict[str, Any]:
    """Load, evaluate the start, train, evaluate, save the adapter, evaluate the champion. Heavy imports live here.

    ``new`` are the new examples (``dataset.new_path``) or None. ``progress`` (last step and train loss) is kept
    current so that a failed or cancelled run still reports them.
    """
    name = cfg["model"]["name"]
    quiet_offline_env(name)
    import torch

    cuda = torch.cuda.is_available()
    backend = pick_backend(cfg["backend"], cuda)
    say(f"backend {backend} on {'cuda' if cuda else 'cpu'}; model {name}; template {cfg['model']['chat_template']}")

    recorder = make_callback(log, progress)  # after `import unsloth`: it imports transformers
    trainer, model, tok, info, new_ds = qlora_backends.build(backend)(cfg, train, evals, new, cuda, recorder)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_loss = evaluate(trainer, log, "base")  # the starting weights: the base, or the base + init.adapter
    new_before = evaluate(trainer, log, "new_before", new_ds) if new_ds is not None else None

    started = time.monotonic()
    try:
        out = trainer.train()
    finally:
        recorder.flush()  # a cancelled or crashed run still reports its last logged step
    train_seconds = time.monotonic() - started

    after_loss = evaluate(trainer, log, "candidate")
    new_after = evaluate(trainer, log, "new_after", new_ds) if new_ds is not None else None
    adapter_dir = save_adapter(cfg, model, tok)
    champion, init = cfg["gate"]["champion_adapter"], cfg["init"]["adapter"]
    if champion is not None and init is not None and os.path.realpath(champion) == os.path.realpath(init):
        # Warm-started from the champion: the "before" evaluations were the champion's; no second load.
        champion_loss, champion_new, champion_error = base_loss, new_before, None
    else:
        champion_loss, champion_new, champion_error = evaluate_champion(champion, model, trainer, log, new_ds)
    return {
        "backend": backend,
        "adapter_dir": str(adapter_dir),
        "first_train_loss": recorder.first_loss,
        "final_train_loss": recorder.last_loss,
        "train_loss_mean": num(out.training_loss),
        "eval_loss_before": base_loss,
        "eval_loss_after": after_loss,
        "init_adapter": init,
        "new_loss_before": new_before,
        "new_loss_after": new_after,
        "champion_adapter": champion,
        "champion_eval_loss": champion_loss,
        "champion_new_loss": champion_new,
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


def loss_on(trainer: Any, dataset: Any = None) -> float | None:
    """The loss on the eval split (``dataset`` None) or on ``dataset`` (prepared like it, see ``qlora_backends``)."""
    return num((trainer.evaluate() if dataset is None else trainer.evaluate(eval_dataset=dataset)).get("eval_loss"))


def evaluate(trainer: Any, log: MetricsLog, phase: str, dataset: Any = None) -> float | None:
    """:func:`loss_on`, logged as an ``evaluated`` line of ``phase``."""
    loss = loss_on(trainer, dataset)
    log.event("evaluated", phase=phase, eval_loss=loss)
    return loss


def evaluate_champion(
    champion: str | None, model: Any, trainer: Any, log: MetricsLog, new_ds: Any = None
) -> tuple[Any, Any, str | None]:
    """The champion adapter's losses on the same eval split and new examples: (eval loss, new loss or None, None),
    or (None, None, why not); OOM propagates."""
    if champion is None:
        return None, None, None
    try:
        model.load_adapter(champion, adapter_name="champion")
        model.set_adapter("champion")
        champion_loss = loss_on(trainer)
        champion_new = loss_on(trainer, new_ds) if new_ds is not None else None
        model.set_adapter("default")
        model.delete_adapter("champion")
        log.event("evaluated", phase="champion", eval_loss=champion_loss)
        if new_ds is not None:
            log.event("evaluated", phase="champion_new", eval_loss=champion_new)
        return champion_loss, champion_new, None
    except Exception as e:
        if is_oom(e):
            raise
        champion_error = one_line(e)
        say(f"champion adapter could not be evaluated: {champion_error}")
        return None, None, champion_error
