"""Merge a LoRA adapter into its 16-bit base, convert it to one GGUF, and read the GGUF back.

Runs under the *trainer's* interpreter (the same venv that trained the adapter), by absolute path:

    /path/to/python /abs/daemon/trainer/merge_export.py --config /abs/exports/<id>/export.yaml

The config is written by ``daemon.publish.export.merge_config`` (the service cannot be imported here): every path
is absolute and the converter/quantizer argv are already built. Steps:

1. free-disk pre-check (``min_free_factor`` x the base's weights, 3x by default: merged copy, f16 and final GGUF);
2. merge: PEFT ``merge_and_unload()`` on an fp16/bf16/fp32 base, for both backends (``backend: unsloth`` imports
   ``unsloth`` first; never its ``save_pretrained_gguf``, which goes online and compiles llama.cpp), on the device
   ``merge_device`` picks (auto: the GPU only with 1.3x the 16-bit model free, ``qlora_gpu.merge_device``); a
   pre-quantized (4-bit) base is refused;
3. tokenizer + chat template saved with it: the training template, without a leading ``{{ bos_token }}`` when the
   tokenizer adds BOS itself (decided the way the converter will decide, by ``gguf.SpecialVocab``); a
   ``tokenizer.model`` sentencepiece cannot parse is removed (it crashes the converter);
4. ``convert_hf_to_gguf.py`` as a child with ``PYTHONPATH`` on the converter's own ``gguf-py`` (version skew breaks
   it), then ``llama-quantize`` for K-quants; output to ``convert.log``;
5. the GGUF read back with that ``gguf-py``'s ``GGUFReader``: architecture, chat template, BOS flag, tensor count,
   size, sha256; the merged folder and partial files are deleted.
6. the GGUF loaded in llama.cpp's engine (``xllamacpp``, in a grandchild: ``export_engine``): a smoke chat and the
   config's ``engine.prompts`` answered greedily with the template's stops, the raw answers kept in the result
   (``engine.enabled: false`` skips it; an enabled check without ``xllamacpp`` is refused before the merge).

``export_result.json`` is written last, atomically, on success *and* failure (``status``, ``error`` as one line).
Exit codes: 0 ok, 1 anything else, 2 bad config or missing input, 3 the converter or quantizer failed, 4 not enough
disk, 5 out of memory, 6 llama.cpp could not load the GGUF or generate with it (the GGUF is deleted),
143 terminated (SIGTERM). The service judges the GGUF facts (``daemon.publish.export.outcome``).
Its parts, beside it: ``export_config`` (the config's checks, exit codes), ``export_merge`` (steps 2-3),
``export_gguf`` (steps 4-5), ``export_engine`` (step 6) and ``trainer_common``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.realpath(__file__))
if sys.path[:1] != [_HERE]:  # imported as daemon.trainer.merge_export (tests) or by file path (run by path, it is)
    sys.path.insert(0, _HERE)  # first: the parts below are this folder's files, whatever else is installed

from export_config import (  # noqa: E402
    EXIT_CONVERT,
    EXIT_DISK,
    EXIT_ENGINE,
    EXIT_OOM,
    DiskError,
    EngineError,
    validate,
)
from export_engine import check as engine_check  # noqa: E402
from export_engine import engine_settings, require_engine  # noqa: E402
from export_gguf import converter_failure, load_gguf_py, read_gguf, run_step, sha256_file  # noqa: E402
from export_merge import finish_tokenizer, import_stack, merge, missing_modules  # noqa: E402
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
    first_line,
    sayer,
    versions,
    write_json_atomic,
)

# The contract's names, for the service's tests (``daemon.trainer.merge_export.EXIT_DISK`` & co.).
__all__ = ["EXIT_CONFIG", "EXIT_CONVERT", "EXIT_DISK", "EXIT_ENGINE", "EXIT_OK", "EXIT_OOM", "EXIT_TERMINATED",
           "converter_failure", "main", "run", "validate"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

say = sayer("merge_export")


def is_oom(exc: BaseException) -> bool:
    """The export's test, looser than training's: a MemoryError or any error that says "out of memory"."""
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def weights_bytes(model: str) -> int | None:
    """Bytes of a local base's weight files (None for a hub id: estimated after loading)."""
    if not os.path.isabs(model) or not os.path.isdir(model):
        return None
    return sum(p.stat().st_size for p in Path(model).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def check_disk(folder: Path, model_bytes: int, factor: float) -> dict[str, Any]:
    free = shutil.disk_usage(folder).free
    need = int(model_bytes * factor)
    if free < need:
        raise DiskError(f"not enough free disk in {folder}: {free / 2**30:.2f} GiB free, {need / 2**30:.2f} GiB "
                        f"needed ({factor:g}x the {model_bytes / 2**30:.2f} GiB model)")
    return {"free_bytes": free, "needed_bytes": need, "model_bytes": model_bytes}


def check_inputs(cfg: dict[str, Any]) -> None:
    """The adapter, the converter's files and the quantizer exist before anything is written."""
    adapter = Path(cfg["adapter_dir"])
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"no adapter_config.json in {adapter}")
    conv = cfg["converter"]
    for p in (Path(conv["argv"][1]) if len(conv["argv"]) > 1 else None, Path(conv["gguf_py"]) / "gguf"):
        if p is not None and not p.exists():
            raise ConfigError(f"the converter is incomplete: {p} is missing (run `chatos-retrain setup export`)")
    if cfg.get("quantize") and not os.access(cfg["quantize"]["argv"][0], os.X_OK):
        raise ConfigError(f"export.quantize_bin {cfg['quantize']['argv'][0]} is not an executable file")


def converter_env(cfg: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """The converter's own gguf-py first on ``sys.path`` here (SpecialVocab, the reader) and on the children's
    ``PYTHONPATH``; every module the merge and the converter need; no hub lookup for a local base.
    Returns (the children's environment, where gguf-py was found)."""
    gguf_py = str(cfg["converter"]["gguf_py"])
    sys.path.insert(0, gguf_py)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([gguf_py, *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    gguf_info = load_gguf_py(gguf_py)
    missing = missing_modules()
    if missing:
        raise ConfigError(f"{sys.executable} lacks {', '.join(missing)} (needed by the merge or the converter): "
                          f"pip install {' '.join(missing)} into the trainer's environment")
    if os.path.isabs(cfg["base_model"]):
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local base must never trigger a hub lookup
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env, gguf_info


def convert(cfg: dict[str, Any], log_path: Path, env: dict[str, str]) -> tuple[Path, float, float | None]:
    """The converter, then the quantizer if any (the f16 intermediate removed): (GGUF produced, seconds, seconds)."""
    conv = cfg["converter"]
    convert_s = run_step(conv["argv"], Path(conv["output"]), log_path, env, "convert_hf_to_gguf.py")
    produced = Path(conv["output"])
    quantize_s = None
    if cfg.get("quantize"):
        q = cfg["quantize"]
        quantize_s = run_step(q["argv"], Path(q["output"]), log_path, env, "llama-quantize")
        produced.unlink(missing_ok=True)  # the f16 intermediate
        produced = Path(q["output"])
    return produced, convert_s, quantize_s


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """The steps; returns the success part of ``export_result.json``."""
    t0 = time.monotonic()
    out, work, final = Path(cfg["out_dir"]), Path(cfg["work_dir"]), Path(cfg["gguf_path"])
    check_inputs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    factor = float(cfg.get("min_free_factor", 3.0))
    size = weights_bytes(cfg["base_model"])
    disk = check_disk(out, size, factor) if size else None
    env, gguf_info = converter_env(cfg)
    engine = engine_settings(cfg)
    require_engine(engine)

    import_s = import_stack(cfg["backend"])
    say(f"merging {Path(cfg['adapter_dir'])} into {cfg['base_model']} ({cfg['backend']}, dtype {cfg['merge_dtype']}, "
        f"device {cfg.get('merge_device', 'auto')})")
    t = time.monotonic()
    merged = merge(cfg, work)
    if disk is None:  # a hub base: its size is known now (16-bit bytes per parameter)
        disk = check_disk(out, 2 * merged["parameters"], factor)
    tok = finish_tokenizer(cfg, work)
    merge_s = time.monotonic() - t
    say(f"merged in {merge_s:.2f}s ({merged['dtype']}, {merged['parameters']} parameters); "
        f"add_bos_token={tok['add_bos_token']}, removed {tok['removed'] or 'nothing'}")

    produced, convert_s, quantize_s = convert(cfg, Path(cfg["log_path"]), env)
    t = time.monotonic()
    facts = read_gguf(produced)
    os.replace(produced, final)
    facts["path"] = str(final)
    facts["sha256"] = sha256_file(final)
    verify_s = time.monotonic() - t
    if not cfg.get("keep_intermediates"):
        shutil.rmtree(work, ignore_errors=True)
    facts["chat_template_equal"] = facts["chat_template"] == (
        cfg["chat_template_no_bos"] if tok["bos_stripped"] else cfg["chat_template"])
    engine_s, engine_facts = run_engine(cfg, engine, final)
    conv = cfg["converter"]
    return {
        "status": "succeeded",
        "gguf": facts,
        "quantization": cfg["quantization"],
        "merge": {**merged, **tok},
        "converter": {"gguf_py": gguf_info["gguf_py"], "root": conv.get("root"), "version": conv.get("version")},
        "disk": disk,
        "engine": engine_facts,
        "timings": {
            "import_s": round(import_s, 3),
            "merge_s": round(merge_s, 3),
            "convert_s": round(convert_s, 3),
            "quantize_s": round(quantize_s, 3) if quantize_s is not None else None,
            "verify_s": round(verify_s, 3),
            "engine_s": round(engine_s, 3) if engine_s is not None else None,
            "total_s": round(time.monotonic() - t0, 3),
        },
    }


def run_engine(cfg: dict[str, Any], engine: dict[str, Any], gguf: Path) -> tuple[float | None, dict[str, Any]]:
    """Step 6: (seconds, the result's ``engine`` section); a GGUF llama.cpp cannot load is deleted (exit 6)."""
    if not engine["enabled"]:
        say("llama.cpp engine check skipped (engine.enabled: false)")
        return None, {"enabled": False}
    t = time.monotonic()
    try:
        facts = engine_check(engine, gguf, Path(cfg["log_path"]))
    except EngineError:
        if not cfg.get("keep_intermediates"):
            gguf.unlink(missing_ok=True)
        raise
    took = time.monotonic() - t
    smoke = facts["answers"][0]
    say(f"llama.cpp loaded the GGUF in {facts['load_s']}s; smoke answer {smoke['tokens']} tokens, finish_reason "
        f"{smoke['finish_reason']}; {len(facts['answers']) - 1} prompt(s) answered")
    return took, {"enabled": True, **facts}


def cleanup(cfg: dict[str, Any]) -> None:
    """After a failure: no merged copy and no partial GGUF left behind (the log stays)."""
    if isinstance(cfg.get("work_dir"), str) and not cfg.get("keep_intermediates"):
        shutil.rmtree(cfg["work_dir"], ignore_errors=True)
    for step in (cfg.get("converter"), cfg.get("quantize")):
        if isinstance(step, dict) and isinstance(step.get("output"), str):
            Path(step["output"]).unlink(missing_ok=True)


def write_result(path: Path, result: dict[str, Any]) -> None:
    """``export_result.json``, atomically (anything JSON cannot hold written as its str)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result, allow_nan=True, default=str)


def read_config(config: Path) -> dict[str, Any] | None:
    """The checked config, or None after saying why (and writing the failed result where the config allows)."""
    if not config.is_absolute():
        say(f"--config must be an absolute path, got {config}")
        return None
    try:
        import yaml

        raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    except Exception as e:  # OSError, yaml.YAMLError, UnicodeDecodeError: all "cannot read the config"
        say(f"cannot read {config}: {first_line(e)}")
        return None
    problems = validate(raw)
    if problems:
        for line in problems:
            say(f"{config}: {line}")
        if isinstance(raw, dict) and isinstance(raw.get("result_path"), str) and os.path.isabs(raw["result_path"]):
            write_result(Path(raw["result_path"]), {"status": "failed", "exit_code": EXIT_CONFIG,
                                                    "error": f"bad export config: {problems[0]}"})
        return None
    result: dict[str, Any] = raw
    return result


def attempt(cfg: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """:func:`run`, whatever happens: (exit code, the result's status part); a failure is cleaned up after."""
    try:
        return EXIT_OK, run(cfg)
    except Terminated:
        code, result = EXIT_TERMINATED, {"status": "failed", "error": "terminated (SIGTERM)"}
    except Failure as e:
        code, result = e.exit_code, {"status": "failed", "error": first_line(e)}
    except Exception as e:
        if is_oom(e):
            code, result = EXIT_OOM, {"status": "failed", "error": f"out of memory: {first_line(e)}"}
        else:
            traceback.print_exc()
            code, result = EXIT_FAILED, {"status": "failed", "error": f"{type(e).__name__}: {first_line(e)}"}
    say(f"failed: {result['error']}")
    cleanup(cfg)
    return code, result


def main(argv: list[str] | None = None) -> int:
    config = Path(config_argument(argv, "Merge a LoRA adapter, convert to GGUF, read it back (see the docstring).",
                                  "absolute path of the export config (YAML or JSON)"))
    cfg = read_config(config)
    if cfg is None:
        return EXIT_CONFIG
    catch_sigterm()
    result_path = Path(cfg["result_path"])
    result_path.unlink(missing_ok=True)
    base = {"job_id": cfg.get("job_id"), "backend": cfg["backend"], "started_at": time.time()}
    code, result = attempt(cfg)
    try:
        vers = {"python": sys.version.split()[0],
                **versions(("torch", "transformers", "peft", "unsloth", "xllamacpp"))}
    except Exception:
        vers = {}
    write_result(result_path, {**base, **result, "exit_code": code, "versions": vers, "finished_at": time.time()})
    if code == EXIT_OK:
        say(f"wrote {result['gguf']['path']} ({result['gguf']['size']} bytes) in {result['timings']['total_s']}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
