"""Stage: a promoted adapter -> one merged GGUF (a child in the trainer's interpreter) -> a model version, then
registration. An export that a crash or a stop interrupted is resumed by the next cycle (:func:`resume`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon import disk, faults, log
from daemon.cycle import registering
from daemon.cycle.context import Cycle, CycleResult, Outcome
from daemon.publish import converter, export, ray_export, registry
from daemon.settings import Settings
from daemon.state import PendingExport, State, private_dir
from daemon.train import gate, jobspec, regressions, runner, templates
from daemon.train.ray_client import RayError

_log = log.get("daemon.cycle")
PREVIOUS_CHAMPION = "previous_champion"  # in the pending export's gate numbers: the champion the candidate replaced
# state.service's pending export: the promoted job whose export has not finished yet. Set with the promotion (in
# gating), cleared with the model version (or when the export failed on its own), so an export that a crash or a
# stop interrupted is resumed by the next cycle instead of leaving the champion without a model.


def settled(state: State) -> None:
    with state.transaction():
        state.service.clear_pending_export()


def _plan(cycle: Cycle, job_id: str, res: dict[str, Any], cases: list[regressions.Case]
          ) -> tuple[dict[str, Any], Path, templates.ChatTemplate]:
    """The merge + convert job's config, its folder and the chat template (pure but for the converter set-up)."""
    settings, q = cycle.settings, cycle.settings.export.quantization
    # a checkout in export.llama_cpp_dir wins; else the pinned converter in the cache, fetched here only when
    # export.auto_setup allows it (the hardened unit then never downloads behind the operator's back)
    cache = converter.cache_dir_for(settings.export.cache_dir)
    if settings.export.llama_cpp_dir is None and not settings.export.auto_setup:
        conv = converter.require_installed(cache)
    else:
        conv = converter.setup_converter(cache, llama_cpp_dir=settings.export.llama_cpp_dir)
    template = templates.get(res.get("chat_template") or settings.training.chat_template)
    out_dir = private_dir(cycle.state.dir / "exports" / job_id)
    version = cycle.state.models.next_version()
    cfg = export.merge_config(
        job_id=job_id, backend=res.get("backend") or "transformers",
        base_model=res.get("base_model") or settings.training.base_model, adapter_dir=Path(res["adapter_dir"]),
        out_dir=out_dir, template=template, converter=conv, python=settings.training.python,
        quantization=q, quantize_bin=settings.export.quantize_bin,
        gguf_name=export.gguf_filename(settings.ollama.model_name, version, q),
        model_name=settings.ollama.model_name, engine=engine_check(settings, cases),
        merge_device=settings.export.merge_device,
    )
    return cfg, out_dir, template


def regression_cases(settings: Settings) -> list[regressions.Case]:
    """The operator's regression prompts (``gate.regressions_file``) when the ``regressions`` check runs; none when
    it does not, or when the file cannot be used (the gate already failed that check before the export)."""
    g = settings.gate
    if "regressions" not in g.checks or g.regressions_file is None:
        return []
    try:
        return regressions.load(g.regressions_file)
    except regressions.RegressionFileError:
        return []


def engine_check(settings: Settings, cases: list[regressions.Case] | None = None) -> export.EngineCheck:
    """``export.engine.*`` as the child's llama.cpp check; its prompts are the regression cases (``cases``, else
    read from the file; their raw answers come back and :func:`_regressions` judges them)."""
    cases = regression_cases(settings) if cases is None else cases
    return export.EngineCheck.of(settings, tuple(c.request() for c in cases))


def engine_require_stop(settings: Settings) -> bool:
    """``export.engine.require_stop``, or (null) ``export.smoke.require_stop``: a real model's answer must end on a
    stop token in llama.cpp as in Ollama; tiny random models ramble, and turning one off turns off both."""
    own = settings.export.engine.require_stop
    return settings.export.smoke.require_stop if own is None else own


def _regressions(cycle: Cycle, job_id: str, out: export.ExportOutcome, gate_numbers: dict[str, Any],
                 previous: str | None, cases: list[regressions.Case]) -> dict[str, Any] | None:
    """The gate's ``regressions`` check on the exported GGUF's answers: the updated numbers, or None when a required
    check now fails. Then the job is rejected, the champion it replaced is back, and the GGUF is deleted."""
    settings, state, result = cycle.settings, cycle.state, cycle.result
    if not cases:
        return gate_numbers
    engine = out.engine or {}
    answers = engine.get("answers") if engine.get("loaded") else None
    why_not = ("export.engine.enabled is false: the regression prompts run in llama.cpp's engine"
               if not settings.export.engine.enabled else "llama.cpp gave no answers")
    dec = gate.after_export(gate_numbers, answers, cases, why_not=why_not)
    result.counts["gate"] = dec.numbers
    if dec.promote:
        with state.transaction():
            state.jobs.judged(job_id, status="promoted", error=None, gate=dec.numbers)
        return dec.numbers
    with state.transaction():
        state.jobs.judged(job_id, status="rejected", error=dec.reason, gate=dec.numbers)
        state.service.restore_champion(previous)
        state.service.clear_pending_export()
    if out.gguf_path is not None:
        out.gguf_path.unlink(missing_ok=True)
    _log.warning("gate.rejected_after_export", job_id=job_id, reason=dec.reason, champion=previous)
    result.job_status = "rejected"
    result.end(Outcome.REJECTED, f"job {job_id} rejected on its exported GGUF: {dec.reason}")
    return None


def _convert(cycle: Cycle, cfg: dict[str, Any], out_dir: Path, job_id: str, gate_numbers: dict[str, Any]
             ) -> tuple[int | None, str]:
    """Run merge + convert as a supervised child; remember its pid (it outlives a SIGKILLed service)."""
    state, settings = cycle.state, cycle.settings
    cfg_path = export.write_config(out_dir / "export.yaml", cfg)
    if settings.export.executor == "ray":  # on the cluster: nothing here to stop after a crash (no pid)
        with state.transaction():
            state.service.set_pending_export(PendingExport(job_id, gate_numbers))
        try:
            return ray_export.run(settings, cfg, out_dir, job_id, cycle.stop)
        except RayError as exc:
            return None, str(exc)

    def spawned(pid: int, start: int | None) -> None:
        with state.transaction():
            state.service.set_pending_export(PendingExport(job_id, gate_numbers, pid, start))

    return runner.run_supervised(export.merge_export_argv(settings.training.python, cfg_path), cwd=out_dir,
                                 log_path=out_dir / "export.log", timeout_s=settings.export.timeout,
                                 stop=cycle.stop, env=settings.training.env, on_start=spawned)


def run(cycle: Cycle, job: dict[str, Any], res: dict[str, Any], gate_numbers: dict[str, Any]) -> None:
    """Export the promoted job ``job`` (its row) with result ``res``; then register the new model version."""
    settings, state, result = cycle.settings, cycle.state, cycle.result
    if not settings.export.enabled:
        result.reason += "; export disabled (export.enabled: false)"
        return
    job_id = job["job_id"]
    cases = regression_cases(settings)  # read once: the prompts asked and the expectations judged are the same
    with cycle.timed("export"):
        try:
            cfg, out_dir, template = _plan(cycle, job_id, res, cases)
        except converter.NotSetUp as exc:  # stays pending: the next cycle resumes it once the converter is there
            _log.error("export.converter_missing", job_id=job_id, reason=str(exc))
            result.end(Outcome.EXPORT_FAILED, f"{result.reason}; export waits: {exc}")
            return
        except (export.ExportError, ValueError, KeyError, OSError) as exc:
            result.end(Outcome.EXPORT_FAILED, f"{result.reason}; export not possible: {exc}")
            settled(state)
            return
        base = str(res.get("base_model") or settings.training.base_model or "")
        short = disk.check(f"the export of job {job_id}", out_dir,
                           disk.export_needs(jobspec.base_weights(base), settings.export.quantization))
        if short is not None:  # the export stays pending: the next cycle resumes it once there is room
            _log.warning("export.no_space", job_id=job_id, needed=short.needed, free=short.free)
            result.end(Outcome.NO_SPACE, f"{result.reason}; {short}")
            return
        cycle.step("exporting", f"job {job_id}: merge + convert to GGUF ({settings.export.quantization})")
        code, why = _convert(cycle, cfg, out_dir, job_id, gate_numbers)
        out = export.outcome(code, export.read_result(Path(cfg["result_path"])), template,
                             engine_require_stop=engine_require_stop(settings))
    if not out.ok or out.gguf_path is None or out.sha256 is None:
        result.end(Outcome.EXPORT_FAILED,
                   f"{result.reason}; export failed: {out.reason if why == 'finished' else why}")
        _log.error("export.failed", job_id=job_id, reason=out.reason, exit_code=code)
        if not cycle.stop.is_set():  # failed on its own: not retried; stopped by us: resumed by the next cycle
            settled(state)
        return
    previous = gate_numbers.get(PREVIOUS_CHAMPION)
    gate_numbers = {k: v for k, v in gate_numbers.items() if k != PREVIOUS_CHAMPION}
    checked = _regressions(cycle, job_id, out, gate_numbers, previous, cases)
    if checked is None:
        return
    gate_numbers = checked
    faults.point("export.before_record")  # a verified GGUF on disk, no model version yet
    ds = state.datasets.get(job["dataset_version"])
    with state.transaction():  # the model version and the end of the pending export, together
        version = registry.add_version(
            state, job_id=job_id, dataset_version=job["dataset_version"],
            manifest_hash=ds.content_hash if ds else None, gguf_path=str(out.gguf_path),
            gguf_sha256=out.sha256 if out.sha256.startswith("sha256:") else f"sha256:{out.sha256}",
            gguf_size=out.size or out.gguf_path.stat().st_size, architecture=out.architecture,
            chat_template=template.name, eval_numbers=gate_numbers, settings=settings,
        )
        state.service.clear_pending_export()
    mf = registry.write_modelfile(settings, out.gguf_path, version, registry.model_spec(settings, template.name))
    _log.info("export.done", job_id=job_id, model_version=version, gguf=str(out.gguf_path), size=out.size,
              modelfile=str(mf) if mf else None, **_engine_facts(out.engine))
    registering.run(cycle, version)


def _engine_facts(engine: dict[str, Any] | None) -> dict[str, Any]:
    """The llama.cpp check's headline for the ``export.done`` line (the whole answers stay in export_result.json)."""
    if not engine or engine.get("enabled") is False:
        return {"engine": "off"}
    smoke = (engine.get("answers") or [{}])[0]
    return {"engine_load_s": engine.get("load_s"), "engine_version": engine.get("version"),
            "engine_smoke_finish": smoke.get("finish_reason"), "engine_smoke_tokens": smoke.get("tokens")}


def _pending_job(cycle: Cycle) -> tuple[PendingExport, dict[str, Any]] | None:
    """The pending export and its job row, when it still needs finishing; else the marker is dropped."""
    settings, state = cycle.settings, cycle.state
    pending = state.service.pending_export()
    if pending is None:
        return None
    found = state.jobs.get(pending.job_id)
    job = found.as_dict() if found else None
    if (job is None or job["status"] != "promoted" or not job.get("result") or not settings.export.enabled
            or state.service.get().champion_job != job["job_id"]
            or any(m.job_id == job["job_id"] for m in state.models.all())):
        settled(state)
        return None
    return pending, job


def resume(cycle: Cycle) -> bool:
    """Finish the export of the champion when a crash or a stop interrupted it (``state.service.pending_export``).

    A child the dead service left running is stopped first (two writers must not share the export folder). The
    resumed export's own result goes into ``counts["export_resumed"]``."""
    found = _pending_job(cycle)
    if found is None:
        return True
    pending, job = found
    if pending.pid:
        runner.stop_stray(pending.pid, pending.pid_start, "left running by a service that stopped")
    _log.info("export.resumed", job_id=job["job_id"], reason="the service stopped before the export finished")
    sub = Cycle(cycle.settings, cycle.state, cycle.request,
                CycleResult(cycle.result.cycle_id, Outcome.PROMOTED, True, f"job {job['job_id']} promoted earlier",
                            dataset_version=job.get("dataset_version"), job_id=job["job_id"], job_status="promoted"),
                stop=cycle.stop, cancel=cycle.cancel, report=cycle.report, now=cycle.now)
    run(sub, job, job["result"], pending.gate)
    cycle.result.counts["export_resumed"] = {"job_id": sub.result.job_id, "outcome": str(sub.result.outcome),
                                             "model_tag": sub.result.model_tag}
    if sub.result.outcome == Outcome.REGISTERED:
        cycle.result.model_tag = sub.result.model_tag
    return True


