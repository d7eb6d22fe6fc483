"""GGUF export (pure): the merge/convert job plan, and the judgement of its result.

Two parts, in the order a cycle uses them (the converter they name is set up by :mod:`daemon.publish.converter`):

* **Plan**: the job config of ``daemon/trainer/merge_export.py`` (which runs in the trainer's interpreter and
  cannot import us), with the converter and quantizer argv already built (:func:`merge_config`).
* **Judgement**: the child's ``export_result.json`` + exit status -> an :class:`ExportOutcome`; the GGUF's
  facts read by the ``gguf`` reader -> problems (:func:`gguf_problems`); the answers llama.cpp's engine gave in the
  child -> problems (:func:`engine_problems`).
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from daemon.publish.converter import ConverterPaths
from daemon.publish.converter import ExportError as ExportError  # the export stage's error; callers catch it here
from daemon.settings import Settings
from daemon.train.templates import ChatTemplate

MERGE_EXPORT_SCRIPT = Path(__file__).resolve().parent.parent / "trainer" / "merge_export.py"


# -- plan (pure) -----------------------------------------------------------------------------------------------------

CONVERT_OUTTYPES = ("f16", "bf16", "q8_0")  # convert_hf_to_gguf.py writes these itself
QUANTIZE_TYPES = {"q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}  # need llama-quantize


def converter_argv(python: Path, converter: ConverterPaths, model_dir: Path, outfile: Path, outtype: str,
                   model_name: str | None = None) -> list[str]:
    """``python convert_hf_to_gguf.py MODEL --outfile OUT --outtype T [--model-name N]``; absolute paths, no shell.

    ``--model-name`` sets ``general.name`` (else the converter names the model after the merged folder)."""
    if outtype not in CONVERT_OUTTYPES:
        raise ValueError(f"the converter writes {', '.join(CONVERT_OUTTYPES)}, not {outtype!r}")
    for p in (python, model_dir, outfile):
        if not Path(p).is_absolute():
            raise ValueError(f"not an absolute path: {p}")
    argv = [str(python), str(converter.convert_hf), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    return [*argv, "--model-name", model_name] if model_name else argv


def quantize_argv(quantize_bin: Path, src: Path, dst: Path, quantization: str) -> list[str]:
    """``llama-quantize SRC DST Q4_K_M``."""
    try:
        qtype = QUANTIZE_TYPES[quantization]
    except KeyError:
        raise ValueError(f"llama-quantize is used for {', '.join(QUANTIZE_TYPES)}, not {quantization!r}") from None
    return [str(quantize_bin), str(src), str(dst), qtype]


def strip_leading_bos(jinja: str) -> str:
    """The template without a leading ``{{ bos_token }}`` (any whitespace-control form): when the tokenizer adds BOS
    itself, llama.cpp and Ollama would otherwise start every prompt with two."""
    return re.sub(r"^\s*\{\{-?\s*bos_token\s*-?\}\}", "", jinja, count=1)


def gguf_filename(model_name: str, version: int | None, quantization: str) -> str:
    """``chatos-retrained-v3.q8_0.gguf``: a name that says what the file is."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-.") or "model"
    return f"{safe}{f'-v{version}' if version is not None else ''}.{quantization}.gguf"


@dataclass(frozen=True)
class EngineCheck:
    """The child's llama.cpp check of the GGUF (``export.engine.*``): load it, answer the smoke prompt and
    ``prompts`` (each ``{"id", "messages", "max_tokens"}``: raw answers piped through, judged elsewhere)."""

    enabled: bool = True
    n_ctx: int = 2048
    threads: int | None = None
    max_tokens: int = 64
    smoke_prompt: str = "Reply with one short sentence: what is 2 + 2?"
    prompts: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def of(cls, settings: Settings, prompts: tuple[Mapping[str, Any], ...] = ()) -> EngineCheck:
        """``export.engine.*``; the smoke prompt is the one Ollama's smoke chat asks."""
        eng = settings.export.engine
        return cls(enabled=eng.enabled, n_ctx=eng.n_ctx, threads=eng.threads, max_tokens=eng.max_tokens,
                   smoke_prompt=settings.export.smoke.prompt, prompts=prompts)

    def section(self, template: ChatTemplate) -> dict[str, Any]:
        """The config's ``engine`` section; the stops are the template's, the ones Ollama gets too."""
        return {"enabled": self.enabled, "n_ctx": self.n_ctx, "threads": self.threads, "max_tokens": self.max_tokens,
                "stop": list(template.stop), "smoke_prompt": self.smoke_prompt,
                "prompts": [dict(p) for p in self.prompts]}


def merge_config(
    *,
    job_id: str,
    backend: str,
    base_model: str,
    adapter_dir: Path,
    out_dir: Path,
    template: ChatTemplate,
    converter: ConverterPaths,
    python: Path,
    quantization: str = "q8_0",
    quantize_bin: Path | None = None,
    gguf_name: str = "model.gguf",
    model_name: str | None = None,
    merge_dtype: str = "auto",
    merge_device: str = "auto",
    max_seq_length: int = 2048,
    min_free_factor: float = 3.0,
    keep_intermediates: bool = False,
    engine: EngineCheck | None = None,
) -> dict[str, Any]:
    """The config of one ``merge_export.py`` run: every path absolute, the converter/quantizer argv built here.

    ``python`` is the trainer's interpreter: the converter runs there (torch, transformers, numpy) with this
    converter's own ``gguf-py``. K-quants go through an f16 GGUF and ``quantize_bin``. ``engine``: the llama.cpp
    check of the result (the defaults of :class:`EngineCheck` when None).
    """
    quantizer = _check_plan(backend, quantization, quantize_bin,
                            {"adapter_dir": adapter_dir, "out_dir": out_dir, "python": python})
    work = out_dir / "merged"
    final = out_dir / gguf_name
    stem = final.name.removesuffix(".gguf")
    convert, quantize = _convert_steps(python, converter, work, out_dir, stem, quantization, quantizer, model_name)
    return {
        "job_id": job_id,
        "backend": backend,
        "base_model": base_model,
        "adapter_dir": str(adapter_dir),
        "out_dir": str(out_dir),
        "work_dir": str(work),
        "gguf_path": str(final),
        "quantization": quantization,
        "merge_dtype": merge_dtype,
        "merge_device": merge_device,
        "max_seq_length": max_seq_length,
        "template_name": template.name,
        "chat_template": template.jinja,
        "chat_template_no_bos": strip_leading_bos(template.jinja),
        "converter": {**converter.describe(), "gguf_py": str(converter.gguf_py), **convert},
        "quantize": quantize,
        "min_free_factor": min_free_factor,
        "keep_intermediates": keep_intermediates,
        "log_path": str(out_dir / "convert.log"),
        "result_path": str(out_dir / "export_result.json"),
        "engine": (engine or EngineCheck()).section(template),
    }


def _check_plan(backend: str, quantization: str, quantize_bin: Path | None, paths: Mapping[str, Path]) -> Path | None:
    """Refuse what :func:`merge_config` cannot plan (ValueError, or ExportError for a missing quantizer); returns the
    ``llama-quantize`` binary when ``quantization`` needs one, else None."""
    if backend not in ("transformers", "unsloth"):
        raise ValueError(f"backend must be 'transformers' or 'unsloth' (resolved, not 'auto'), got {backend!r}")
    if quantization not in CONVERT_OUTTYPES and quantization not in QUANTIZE_TYPES:
        raise ValueError(f"unknown quantization {quantization!r}")
    if quantization in QUANTIZE_TYPES and quantize_bin is None:
        raise ExportError(f"export.quantization {quantization} needs export.quantize_bin (a llama-quantize binary); "
                          f"use one of {', '.join(CONVERT_OUTTYPES)} without it")
    for name, p in paths.items():
        if not Path(p).is_absolute():
            raise ValueError(f"{name} must be an absolute path, got {p}")
    return quantize_bin if quantization in QUANTIZE_TYPES else None


def _convert_steps(python: Path, converter: ConverterPaths, work: Path, out_dir: Path, stem: str, quantization: str,
                   quantizer: Path | None, model_name: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The converter step and, with a ``quantizer`` (K-quants), the quantize step: argv and output of each, both
    ``<out_dir>/<stem>*.partial.gguf`` (the child renames the last output into place)."""
    if quantizer is None:
        converted = out_dir / f"{stem}.partial.gguf"
        argv = converter_argv(python, converter, work, converted, quantization, model_name)
        return {"argv": argv, "output": str(converted)}, None
    f16 = out_dir / f"{stem}.f16.partial.gguf"
    quantized = out_dir / f"{stem}.partial.gguf"
    convert = {"argv": converter_argv(python, converter, work, f16, "f16", model_name), "output": str(f16)}
    quantize = {"argv": quantize_argv(quantizer, f16, quantized, quantization), "output": str(quantized)}
    return convert, quantize


def merge_export_argv(python: Path, config: Path, script: Path = MERGE_EXPORT_SCRIPT) -> list[str]:
    """``[python, /abs/merge_export.py, --config, /abs/export.yaml]``."""
    for p in (python, script, config):
        if not Path(p).is_absolute():
            raise ValueError(f"not an absolute path: {p}")
    return [str(python), str(script), "--config", str(config)]


def write_config(path: Path, cfg: Mapping[str, Any]) -> Path:
    """Write a :func:`merge_config` for the child (YAML, owner-only: it names private paths)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(dict(cfg), f, sort_keys=False, allow_unicode=True)
    return path


def read_result(path: Path) -> dict[str, Any] | None:
    """The child's ``export_result.json``, or None when it is missing or unreadable (judged by :func:`outcome`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- judgement (pure) ------------------------------------------------------------------------------------------------

# Exit codes of merge_export.py -> what they mean (the one line itself is in export_result.json's "error").
EXIT_MEANING = {
    0: "ok",
    1: "export failed",
    2: "bad export config or missing input",
    3: "the GGUF converter failed",
    4: "not enough free disk space",
    5: "out of memory",
    6: "the llama.cpp engine check failed",
}


def interpret_exit(code: int | None) -> str:
    """An exit status of the merge/convert child -> a short reason."""
    if code is None:
        return "no exit status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == 128 + signal.SIGTERM:
        return "terminated"
    return EXIT_MEANING.get(code, f"merge_export exited with status {code}")


def gguf_problems(facts: Mapping[str, Any], template: ChatTemplate) -> list[str]:
    """What is wrong with a GGUF, from the facts the ``gguf`` reader gave (``export_result.json``'s ``gguf``).

    Checked: tensors present, ``general.architecture`` one the template is meant for, ``tokenizer.chat_template``
    equal to the training template (without its leading ``{{ bos_token }}`` when the GGUF adds BOS), and no double
    BOS.
    """
    problems: list[str] = []
    if not isinstance(facts.get("tensor_count"), int) or facts["tensor_count"] <= 0:
        problems.append(f"the GGUF has no tensors (tensor_count={facts.get('tensor_count')!r})")
    arch = facts.get("architecture")
    if not arch:
        problems.append("the GGUF has no general.architecture")
    elif template.gguf_architectures and arch not in template.gguf_architectures:
        problems.append(f"general.architecture is {arch!r}, but the {template.name} template is for "
                        f"{', '.join(template.gguf_architectures)}")
    add_bos = facts.get("add_bos_token") is True
    expected = strip_leading_bos(template.jinja) if add_bos else template.jinja
    got = facts.get("chat_template")
    if got is None:
        problems.append("the GGUF has no tokenizer.chat_template")
    elif got != expected:
        why = " (the GGUF adds BOS, so the leading {{ bos_token }} must be stripped)" if add_bos else ""
        problems.append(f"tokenizer.chat_template differs from the {template.name} training template{why}")
    if add_bos and isinstance(got, str) and strip_leading_bos(got) != got:
        problems.append("tokenizer.chat_template starts with {{ bos_token }} and the GGUF adds BOS: double BOS")
    return problems


def engine_problems(engine: Mapping[str, Any] | None, require_stop: bool) -> list[str]:
    """What is wrong with the child's llama.cpp check (``export_result.json``'s ``engine``; absent or disabled: no
    check, nothing to say). Loaded and a smoke answer generated are required; with ``require_stop``
    (``export.engine.require_stop``, for a real model) the smoke answer must be non-empty and end on a stop, as
    ``export.smoke.require_stop`` asks of Ollama's answer."""
    if not isinstance(engine, Mapping) or engine.get("enabled") is False:
        return []
    if engine.get("loaded") is not True:
        return ["llama.cpp did not load the GGUF"]
    answers = engine.get("answers")
    smoke = answers[0] if isinstance(answers, list) and answers and isinstance(answers[0], Mapping) else None
    if smoke is None:
        return ["llama.cpp gave no smoke answer"]
    problems = []
    if require_stop:
        if not str(smoke.get("content") or "").strip():
            problems.append("llama.cpp's smoke answer is empty")
        if smoke.get("stopped") is not True:
            problems.append(f"llama.cpp's smoke answer did not end on a stop (finish_reason "
                            f"{smoke.get('finish_reason')!r} after {smoke.get('tokens')} tokens): check the template "
                            "and stops")
    return problems


@dataclass
class ExportOutcome:
    """What a merge/convert run produced and whether the GGUF may be registered."""

    ok: bool
    reason: str
    exit_code: int | None
    gguf_path: Path | None = None
    sha256: str | None = None
    size: int | None = None
    architecture: str | None = None
    problems: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    engine: dict[str, Any] | None = None  # the llama.cpp check's facts (load time, version, raw answers)


def outcome(code: int | None, result: Mapping[str, Any] | None, template: ChatTemplate, *,
            engine_require_stop: bool = False) -> ExportOutcome:
    """The child's exit status + ``export_result.json`` (None when unreadable) -> the verdict, re-checking the GGUF's
    facts and llama.cpp's answers here (the service, not the child, decides what is registrable): a GGUF the engine
    could not load (exit 6) or whose check fails is never sent to Ollama."""
    res = dict(result) if isinstance(result, Mapping) else None
    if code != 0 or res is None or res.get("status") != "succeeded":
        error = (res or {}).get("error")
        reason = interpret_exit(code) if code != 0 else "merge_export exited 0 without a successful result"
        if error:
            reason = f"{reason}: {str(error).splitlines()[0][:400]}"
        return ExportOutcome(False, reason, code, result=res)
    facts = res.get("gguf") or {}
    problems = gguf_problems(facts, template)
    path = Path(str(facts["path"])) if facts.get("path") else None
    if path is None:
        problems.insert(0, "export_result.json names no GGUF")
    engine = res.get("engine") if isinstance(res.get("engine"), dict) else None
    engine_issues = engine_problems(engine, engine_require_stop)
    ok = not problems and not engine_issues
    reasons = ([f"GGUF check failed: {'; '.join(problems)}"] if problems else []) + (
        [f"engine check failed: {'; '.join(engine_issues)}"] if engine_issues else [])
    return ExportOutcome(
        ok,
        "ok" if ok else "; ".join(reasons),
        code,
        gguf_path=path,
        sha256=facts.get("sha256"),
        size=facts.get("size"),
        architecture=facts.get("architecture"),
        problems=problems + engine_issues,
        result=res,
        engine=engine,
    )
