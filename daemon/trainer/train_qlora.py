"""LoRA/QLoRA fine-tuning job: one absolute YAML config in, ``metrics.jsonl`` + adapter + ``result.json`` out.

Runs under the *trainer's* interpreter (possibly a separate Unsloth venv), by absolute path:

    /path/to/python /abs/daemon/trainer/train_qlora.py --config /abs/jobs/<id>/config.yaml

It imports nothing from the service package (the chat template arrives rendered in the config's ``template:``
block) and keeps torch & co. inside :func:`run`'s callees, so a bad config fails in a fraction of a second.
The config contract is documented in ``configs/chatos_qlora.yaml``. Its parts, beside it: ``qlora_config`` (the
config's table and checks), ``qlora_data`` (the examples), ``qlora_metrics`` (``metrics.jsonl`` and the step
callback), ``qlora_backends`` (model + trainer per backend), ``qlora_pref`` (the preference objectives),
``qlora_init`` (the warm start), ``qlora_gpu`` (the card's precision and memory, the base in the cache), ``qlora_run``
(the run) and ``trainer_common``.

``objective``: ``sft`` (default) trains the SFT split with TRL's SFTTrainer. ``kto`` / ``dpo`` train
``dataset.pref_train_path`` with TRL's KTOTrainer / DPOTrainer on the same PEFT model (the reference is the base with
the adapter disabled; details in ``qlora_pref``), ``preference:`` giving beta, the kto weights and whether the
reference log-probs are precomputed. The SFT splits stay required: every ``eval_loss`` of the ``evaluated`` lines and
of ``result.json`` is the SFT loss on them, computed by an SFTTrainer built for evaluation only, so the gate compares
the same number whatever the objective. Each evaluation of the eval split (base, candidate, champion) also scores
``dataset.pref_eval_path``: the share of its examples the implicit reward classifies correctly (``qlora_pref``).

Optional inputs beside the train and eval splits:
  * ``init.adapter``: warm start. The LoRA is built from ``lora:`` as usual, then loaded with that adapter's weights
    (its ``adapter_config.json`` must match ``lora:`` in r, lora_alpha and target_modules, and every LoRA tensor must
    land: else exit 2, one line naming what differs). "Before" evaluations then score the base + that adapter.
  * ``dataset.new_path``: the new examples (same JSONL format; missing or empty: exit 3), evaluated like the eval split
    before and after training and, with ``gate.champion_adapter``, under the champion.
  * ``dataset.canary_path``: the canary set (same JSONL format; general text and chat turns shipped with the
    service, the gate's forgetting guard; missing or empty: exit 3), evaluated like the new examples.
  * ``gate.champion_adapter``: scored on the same eval split (and new examples, and canary set). When it is also
    ``init.adapter`` (the same folder), the "before" evaluations are its scores and it is not loaded again.

Outputs, in this order:
  * ``metrics.output_path`` (JSON lines, one complete line per write): ``{"event": "job_started", ...}``, step lines
    ``{"job_id", "step", "train_loss", "eval_loss"?, "epoch", "learning_rate", "tokens_per_s", "timestamp"}``,
    ``{"event": "evaluated", "phase", "eval_loss", "seconds"}`` (seconds: what it took) with phase, in this order,
    "base" (the starting weights on the eval split), "new_before"*, "canary_before"***, then after training "candidate",
    "new_after"*, "canary_after"***, "champion"**, "champion_new"*,**, "champion_canary"**,*** (* only with
    ``dataset.new_path``; *** only with ``dataset.canary_path``; ** only with a champion that is not ``init.adapter``;
    ``eval_loss`` is the loss on that phase's set; kto/dpo add ``pref_accuracy`` to base, candidate and champion), and
    last ``{"event": "job_finished", "status", "final_loss", "total_steps", "runtime_seconds", "error"?}``. With kto or
    dpo, a step line's ``train_loss`` / ``eval_loss`` are the KTO/DPO loss (train split / preference eval split)
    and it also carries every other number TRL logs, flat under TRL's names (``rewards/chosen``,
    ``rewards/rejected``, ``rewards/margins``, ``kl``, ``logps/chosen``..., ``eval_rewards/chosen``... at an
    evaluation; see ``qlora_metrics``);
  * ``training.output_dir/adapter/`` (PEFT adapter + tokenizer with the inference chat template);
  * ``result.json`` (``result.output_path``, default next to the metrics file), atomically, only on success:
    ``job_id``, ``status``, ``base_model``, ``chat_template``, ``backend``, ``adapter_dir``, ``first_train_loss``,
    ``final_train_loss``, ``train_loss_mean``, ``eval_loss_before`` (the starting weights on the eval split),
    ``eval_loss_after``, ``init_adapter`` (path or null), ``new_loss_before``, ``new_loss_after`` (null without new
    examples), ``champion_adapter``, ``champion_eval_loss``, ``champion_new_loss`` (null without a champion or new
    examples), ``champion_error``, ``canary_examples``, ``canary_loss_before``, ``canary_loss_after``,
    ``champion_canary_loss`` (the SFT loss on the canary set: the starting weights, the candidate, the champion; null
    without ``dataset.canary_path``, the champion's also without a champion), ``objective``,
    ``pref_train_examples``, ``pref_eval_examples``,
    ``pref_accuracy_before`` (the starting weights), ``pref_accuracy_after`` (the candidate),
    ``champion_pref_accuracy``, ``pref_reward_desirable_before`` / ``_after`` and ``pref_reward_undesirable_before``
    / ``_after`` (mean implicit reward log π − log π_ref of the desirable (kto label true, dpo chosen) and undesirable
    completions of the preference eval split), ``pref_desirable_weight``, ``pref_undesirable_weight`` (the kto
    weights used) (every pref_* null for sft; the weights null for dpo), ``steps``, ``epochs``,
    ``train_runtime_seconds``, ``tokens_per_s``,
    ``peak_gpu_memory_bytes``, ``device``, ``dtype``, ``load_in_4bit``, ``train_examples``, ``eval_examples``,
    ``new_examples`` (count or null), ``runtime_seconds``, ``peak_rss_bytes``, ``versions``, ``python``,
    ``finished_at``.

Exit codes: 0 ok, 1 anything else, 2 bad config, 3 data problem, 4 out of memory, 5 not enough GPU memory (the VRAM
preflight, before loading), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

_HERE = os.path.dirname(os.path.realpath(__file__))
if sys.path[:1] != [_HERE]:  # imported by file path or as daemon.trainer.train_qlora (run by path, it is there)
    sys.path.insert(0, _HERE)  # first: the parts below are this folder's files, whatever else is installed

import qlora_gpu  # noqa: E402
from qlora_config import load_config, result_path  # noqa: E402
from qlora_data import read_examples, read_preferences  # noqa: E402
from qlora_gpu import check_base_cached  # noqa: E402
from qlora_metrics import MetricsLog, utcnow  # noqa: E402
from qlora_run import run  # noqa: E402
from trainer_common import (  # noqa: E402
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_TERMINATED,
    ConfigError,
    Failure,
    Terminated,
    catch_sigterm,
    config_argument,
    is_oom,
    one_line,
    sayer,
    versions,
    write_json_atomic,
)

EXIT_OOM = 4
VERSIONED = ("torch", "transformers", "trl", "peft", "unsloth")

say = sayer("train_qlora")


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    config = config_argument(argv, "Train a LoRA adapter from an absolute job config (see module docstring).",
                             "ABSOLUTE path of the job's YAML config")
    catch_sigterm()
    try:
        cfg = load_config(config)
        _base_cached(cfg)
    except ConfigError as e:
        say(f"bad config: {e}")
        _report_early_failure(e.raw, str(e), t0)
        return EXIT_CONFIG

    log = MetricsLog(cfg["metrics"]["output_path"], cfg["job_id"])
    log.event(
        "job_started",
        pid=os.getpid(),
        backend=cfg["backend"],
        model=cfg["model"]["name"],
        chat_template=cfg["model"]["chat_template"],
        max_steps=cfg["training"]["max_steps"],
        python=sys.executable,
    )
    progress: dict[str, Any] = {"step": 0, "loss": None}
    status, code, error, outcome = _train(cfg, log, progress)
    runtime = round(time.monotonic() - t0, 3)
    if error:
        say(f"{status}: {error}")
    finished: dict[str, Any] = {
        "status": status,
        "final_loss": outcome["final_train_loss"] if outcome else progress["loss"],
        "total_steps": outcome["steps"] if outcome else progress["step"],
        "runtime_seconds": runtime,
        "exit_code": code,
    }
    if error:
        finished["error"] = error
    log.event("job_finished", **finished)
    log.close()
    if outcome is not None:
        _write_result(cfg, status, outcome, runtime)
    return code


def _base_cached(cfg: dict[str, Any]) -> None:
    """A hub id must be in the local cache (``qlora_gpu.check_base_cached``): fail in the first second, not after
    the heavy imports; the error is reported into the config's metrics path like any config error."""
    try:
        check_base_cached(cfg["model"]["name"])
    except ConfigError as e:
        raise ConfigError(str(e), cfg) from None


def _train(
    cfg: dict[str, Any], log: MetricsLog, progress: dict[str, Any]
) -> tuple[str, int, str | None, dict[str, Any] | None]:
    """Read the data and :func:`run`; whatever happens, (status, exit code, error, outcome) for the last report."""
    try:
        train = read_examples(cfg["dataset"]["train_path"], "dataset.train_path")
        evals = read_examples(cfg["dataset"]["eval_path"], "dataset.eval_path")
        new_path = cfg["dataset"]["new_path"]
        new = read_examples(new_path, "dataset.new_path") if new_path is not None else None
        canary_path = cfg["dataset"]["canary_path"]
        canary = read_examples(canary_path, "dataset.canary_path") if canary_path is not None else None
        say(f"{len(train)} train / {len(evals)} eval" + (f" / {len(new)} new" if new is not None else "")
            + (f" / {len(canary)} canary" if canary is not None else "") + " examples")
        prefs = _read_preferences(cfg)
        outcome = run(cfg, train, evals, new, log, progress, prefs, canary)
        outcome.update(train_examples=len(train), eval_examples=len(evals),
                       new_examples=len(new) if new is not None else None)
        return "completed", EXIT_OK, None, outcome
    except Failure as e:
        return "failed", e.exit_code, str(e), None
    except Terminated as e:
        return "cancelled", EXIT_TERMINATED, str(e), None
    except BaseException as e:  # the job's last word must be written whatever happened
        traceback.print_exc()
        code = EXIT_OOM if is_oom(e) else EXIT_FAILED
        if code == EXIT_OOM:
            return "failed", code, f"out of memory: {one_line(e)}{qlora_gpu.oom_numbers()}", None
        return "failed", code, one_line(e), None


def _read_preferences(cfg: dict[str, Any]) -> tuple[list[Any], list[Any]] | None:
    """The preference train and eval examples (objective kto or dpo), else None."""
    objective, dataset = cfg["objective"], cfg["dataset"]
    if objective == "sft":
        return None
    train = read_preferences(dataset["pref_train_path"], "dataset.pref_train_path", objective,
                             both_labels=objective == "kto")
    evals = read_preferences(dataset["pref_eval_path"], "dataset.pref_eval_path", objective)
    say(f"{objective}: {len(train)} train / {len(evals)} eval preference examples")
    return train, evals


def _write_result(cfg: dict[str, Any], status: str, outcome: dict[str, Any], runtime: float) -> None:
    """``result.json``, atomically, after ``job_finished``: the run's outcome and where it ran."""
    result = {
        "job_id": cfg["job_id"],
        "status": status,
        "base_model": cfg["model"]["name"],
        "chat_template": cfg["model"]["chat_template"],
        **outcome,
        "runtime_seconds": runtime,
        "peak_rss_bytes": _peak_rss(),
        "versions": versions(VERSIONED),
        "python": sys.executable,
        "finished_at": utcnow(),
    }
    write_json_atomic(result_path(cfg), result)
    say(f"done in {runtime:.1f}s: eval loss {outcome['eval_loss_before']} -> {outcome['eval_loss_after']}")


def _report_early_failure(raw: Any, error: str, t0: float) -> None:
    """A config error still reaches ``metrics.jsonl`` when the file's metrics path is usable."""
    try:
        path = raw["metrics"]["output_path"]
        job_id = raw.get("job_id") or os.environ.get("CHATOS_JOB_ID") or "unknown"
        if not (isinstance(path, str) and os.path.isabs(path)):
            return
        log = MetricsLog(path, str(job_id))
    except Exception:
        return
    log.event("job_started", pid=os.getpid(), python=sys.executable)
    log.event(
        "job_finished",
        status="failed",
        final_loss=None,
        total_steps=0,
        runtime_seconds=round(time.monotonic() - t0, 3),
        exit_code=EXIT_CONFIG,
        error=error,
    )
    log.close()


def _peak_rss() -> int | None:
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
