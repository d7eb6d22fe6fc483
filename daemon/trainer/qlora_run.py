"""One training run: load (warm-started from ``init.adapter`` if set), evaluate the starting weights on the eval split,
the new examples and the canary set, train, evaluate them all again, save the adapter, evaluate the champion on them.

The SFT trainer computes every ``eval_loss`` whatever the objective; with ``objective`` kto or dpo a KTO/DPO trainer
(``qlora_pref``) trains instead, and each evaluation of the eval split also scores the preference eval split.

:func:`run` returns the run's part of ``result.json``; torch & co. are imported inside it, after the config and the
data were checked.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import qlora_backends
import qlora_gpu
import qlora_pref
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
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference log-prob precompute bar
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


def tune_torch(torch: Any, cuda: bool) -> None:
    """Intra-op threads from the cores this process may use, unless OMP_NUM_THREADS says otherwise (the runner's
    ``training.env`` sets it on a shared box; a GPU job keeps a few for the data path). On sm90+ (H100/H200) the
    cuDNN attention backend, which PyTorch >= 2.10 prefers there, builds a new plan for every new input shape (~1 s
    each); it is turned off so SDPA takes the flash / memory-efficient kernels."""
    if not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, min(cores, 4) if cuda else cores))
    capability = qlora_gpu.cuda_capability() if cuda else None
    if capability is not None and capability >= (9, 0) and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def import_stack() -> None:
    """The training stack's imports, up front, so that ``timings.imports`` holds them (the builders then find them
    loaded)."""
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401


def run(
    cfg: dict[str, Any],
    train: list[Any],
    evals: list[Any],
    new: list[Any] | None,
    log: MetricsLog,
    progress: dict[str, Any],
    prefs: tuple[list[Any], list[Any]] | None = None,
    canary: list[Any] | None = None,
) -> dict[str, Any]:
    """Load, evaluate the start, train, evaluate, save the adapter, evaluate the champion. Heavy imports live here.

    ``new`` are the new examples (``dataset.new_path``) or None; ``prefs`` the preference train and eval examples
    (objective kto or dpo) or None; ``canary`` the canary set (``dataset.canary_path``, the gate's forgetting guard)
    or None. ``progress`` (last step and train loss) is kept current so that a failed or
    cancelled run still reports them.
    """
    name = cfg["model"]["name"]
    quiet_offline_env(name)
    clock = time.monotonic()
    import torch

    cuda = torch.cuda.is_available()
    tune_torch(torch, cuda)
    backend = pick_backend(cfg["backend"], cuda)
    vram = qlora_gpu.preflight(cfg, backend, qlora_gpu.gpu_memory())  # before the rest loads: fail fast
    if vram is not None:
        cfg["training"]["gradient_checkpointing"] = vram["gradient_checkpointing"]
        say(f"VRAM preflight: ~{vram['vram_estimate_bytes'] / qlora_gpu.GIB:.1f} GiB needed, "
            f"{vram['vram_free_bytes'] / qlora_gpu.GIB:.1f} GiB free; gradient checkpointing "
            f"{vram['gradient_checkpointing']}")
    import_stack()
    timings: dict[str, float | None] = {"imports": time.monotonic() - clock}
    objective = cfg["objective"]
    say(f"backend {backend} on {'cuda' if cuda else 'cpu'}; model {name}; template {cfg['model']['chat_template']}; "
        f"objective {objective}")

    recorder = make_callback(log, progress, extra=prefs is not None)  # after `import unsloth`: it imports transformers
    extras = {k: v for k, v in (("new", new), ("canary", canary)) if v is not None}
    built = qlora_backends.build(backend)(cfg, train, evals, extras, cuda, recorder if prefs is None else None)
    sft, model, tok, new_ds, canary_ds = built.trainer, built.model, built.tok, built.new_ds, built.sets.get("canary")
    timings.update(built.timings)
    trainer, pref_info, scorer = sft, {}, None
    if prefs is not None:  # the SFT trainer only evaluates; built before the warm start (see qlora_pref)
        trainer, pref_info = qlora_pref.build_trainer(cfg, model, tok, prefs[0], prefs[1], built.args, recorder)
        scorer = qlora_pref.PreferenceScorer(tok, prefs[1], objective, cfg["model"]["max_seq_length"])
    qlora_backends.warm_start(cfg, model)
    trainer.data_collator = recorder.counter.wrap(trainer.data_collator)
    say(f"ready in {time.monotonic() - clock:.1f}s after start: imports {timings['imports']:.1f}s, model "
        f"{timings.get('model_load') or 0:.1f}s, tokenize {timings.get('tokenize') or 0:.1f}s; "
        f"{built.info.get('padding_why', '')}")

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_loss = evaluate(sft, log, "base", scorer=scorer, model=model)  # the starting weights (+ init.adapter)
    new_before = evaluate(sft, log, "new_before", new_ds) if new_ds is not None else None
    canary_before = evaluate(sft, log, "canary_before", canary_ds) if canary_ds is not None else None

    started = time.monotonic()
    try:
        out = trainer.train()
    finally:
        recorder.flush()  # a cancelled or crashed run still reports its last logged step
    train_seconds = time.monotonic() - started

    after_loss = evaluate(sft, log, "candidate", scorer=scorer, model=model)
    new_after = evaluate(sft, log, "new_after", new_ds) if new_ds is not None else None
    canary_after = evaluate(sft, log, "canary_after", canary_ds) if canary_ds is not None else None
    clock = time.monotonic()
    adapter_dir = save_adapter(cfg, model, tok)
    timings["save"] = time.monotonic() - clock
    champion, init = cfg["gate"]["champion_adapter"], cfg["init"]["adapter"]
    if champion is not None and init is not None and os.path.realpath(champion) == os.path.realpath(init):
        # Warm-started from the champion: the "before" evaluations were the champion's; no second load.
        champion_loss, champion_new, champion_error = base_loss, new_before, None
        champion_pref, champion_canary = base_loss.pref, canary_before
    else:
        champion_loss, champion_new, champion_error, champion_pref, champion_canary = evaluate_champion(
            champion, model, sft, log, new_ds, scorer, canary_ds)
    before, after = base_loss.pref, after_loss.pref
    evaluated = {id(x): x for x in (base_loss, new_before, canary_before, after_loss, new_after, canary_after,
                                    champion_loss, champion_new, champion_canary) if x is not None}
    timings.update(train=train_seconds, eval=sum(x.seconds for x in evaluated.values()), **recorder.timings())
    return {
        "backend": backend,
        "objective": objective,
        "adapter_dir": str(adapter_dir),
        "first_train_loss": recorder.first_loss,
        "final_train_loss": recorder.last_loss,
        "train_loss_mean": num(out.training_loss),
        "eval_loss_before": base_loss.loss,
        "eval_loss_after": after_loss.loss,
        "init_adapter": init,
        "new_loss_before": new_before.loss if new_before is not None else None,
        "new_loss_after": new_after.loss if new_after is not None else None,
        "champion_adapter": champion,
        "champion_eval_loss": champion_loss.loss if champion_loss is not None else None,
        "champion_new_loss": champion_new.loss if champion_new is not None else None,
        "champion_error": champion_error,
        "canary_examples": len(canary) if canary is not None else None,
        "canary_loss_before": _loss(canary_before),
        "canary_loss_after": _loss(canary_after),
        "champion_canary_loss": _loss(champion_canary),
        "pref_train_examples": len(prefs[0]) if prefs is not None else None,
        "pref_eval_examples": len(prefs[1]) if prefs is not None else None,
        "pref_accuracy_before": _pref(before, "accuracy"),
        "pref_accuracy_after": _pref(after, "accuracy"),
        "champion_pref_accuracy": _pref(champion_pref, "accuracy"),
        "pref_reward_desirable_before": _pref(before, "reward_desirable"),
        "pref_reward_desirable_after": _pref(after, "reward_desirable"),
        "pref_reward_undesirable_before": _pref(before, "reward_undesirable"),
        "pref_reward_undesirable_after": _pref(after, "reward_undesirable"),
        "pref_desirable_weight": pref_info.get("pref_desirable_weight"),
        "pref_undesirable_weight": pref_info.get("pref_undesirable_weight"),
        "steps": int(trainer.state.global_step),
        "epochs": num(trainer.state.epoch),
        "train_runtime_seconds": round(train_seconds, 3),
        "tokens_per_s": num(recorder.tokens / train_seconds) if recorder.tokens and train_seconds > 0 else None,
        "peak_gpu_memory_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
        "timings": {k: (round(v, 3) if v is not None else None) for k, v in timings.items()},
        **(vram or {}),
        **built.info,
    }


def _loss(scores: Scores | None) -> float | None:
    return scores.loss if scores is not None else None


def _pref(scores: dict[str, Any] | None, key: str) -> Any:
    return num(scores[key]) if scores is not None else None


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


@dataclass
class Scores:
    """One evaluation: the SFT loss and, with a preference objective, the preference scores (``qlora_pref``)."""

    loss: float | None
    pref: dict[str, Any] | None = None
    seconds: float = 0.0  # what the evaluation took (the gate's cost: bench_cycle reads it from metrics.jsonl)


def loss_on(trainer: Any, dataset: Any = None) -> float | None:
    """The loss on the eval split (``dataset`` None) or on ``dataset`` (prepared like it, see ``qlora_backends``)."""
    return num((trainer.evaluate() if dataset is None else trainer.evaluate(eval_dataset=dataset)).get("eval_loss"))


def scores_of(trainer: Any, dataset: Any = None, scorer: Any = None, model: Any = None) -> Scores:
    """:func:`loss_on` and, with a ``scorer``, the preference scores of ``model`` as it is."""
    t = time.monotonic()
    loss = loss_on(trainer, dataset)
    pref = scorer.score(model) if scorer is not None else None
    return Scores(loss, pref, round(time.monotonic() - t, 3))


def evaluate(trainer: Any, log: MetricsLog, phase: str, dataset: Any = None, *, scorer: Any = None,
             model: Any = None) -> Scores:
    """:func:`scores_of`, logged as an ``evaluated`` line of ``phase`` (with ``pref_accuracy`` under a scorer)."""
    scores = scores_of(trainer, dataset, scorer, model)
    _log_scores(log, phase, scores)
    return scores


def _log_scores(log: MetricsLog, phase: str, scores: Scores) -> None:
    extra = {"pref_accuracy": num(scores.pref["accuracy"])} if scores.pref is not None else {}
    log.event("evaluated", phase=phase, eval_loss=scores.loss, seconds=scores.seconds, **extra)


def evaluate_champion(
    champion: str | None, model: Any, trainer: Any, log: MetricsLog, new_ds: Any = None, scorer: Any = None,
    canary_ds: Any = None,
) -> tuple[Scores | None, Scores | None, str | None, dict[str, Any] | None, Scores | None]:
    """The champion adapter's scores on the same eval split, new examples and canary set: (eval scores, new scores or
    None, None, preference scores or None, canary scores or None), or (None, None, why not, None, None); OOM
    propagates."""
    if champion is None:
        return None, None, None, None, None
    try:
        model.load_adapter(champion, adapter_name="champion")
        model.set_adapter("champion")
        champion_scores = scores_of(trainer, None, scorer, model)
        champion_new = scores_of(trainer, new_ds) if new_ds is not None else None
        champion_canary = scores_of(trainer, canary_ds) if canary_ds is not None else None
        model.set_adapter("default")
        model.delete_adapter("champion")
        _log_scores(log, "champion", champion_scores)
        if champion_new is not None:
            _log_scores(log, "champion_new", champion_new)
        if champion_canary is not None:
            _log_scores(log, "champion_canary", champion_canary)
        return champion_scores, champion_new, None, champion_scores.pref, champion_canary
    except Exception as e:
        if is_oom(e):
            raise
        champion_error = one_line(e)
        say(f"champion adapter could not be evaluated: {champion_error}")
        return None, None, champion_error, None, None
