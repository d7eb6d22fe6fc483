"""Merge a LoRA adapter into its 16-bit base, convert it to one GGUF, and read the GGUF back.

Runs under the *trainer's* interpreter (the same venv that trained the adapter), by absolute path:

    /path/to/python /abs/daemon/trainer/merge_export.py --config /abs/exports/<id>/export.yaml

The config is written by ``daemon.publish.export.merge_config`` (the service cannot be imported here): every path
is absolute and the converter/quantizer argv are already built. Steps:

1. free-disk pre-check (``min_free_factor`` x the base's weights, 3x by default: merged copy, f16 and final GGUF);
2. merge: PEFT ``merge_and_unload()`` on an fp16/bf16/fp32 base (``backend: transformers``) or Unsloth
   ``save_pretrained_merged(..., "merged_16bit")`` (``backend: unsloth``; never ``save_pretrained_gguf``, which goes
   online and compiles llama.cpp); a pre-quantized (4-bit) base is refused;
3. tokenizer + chat template saved with it: the training template, without a leading ``{{ bos_token }}`` when the
   tokenizer adds BOS itself (decided the way the converter will decide, by ``gguf.SpecialVocab``); a
   ``tokenizer.model`` sentencepiece cannot parse is removed (it crashes the converter);
4. ``convert_hf_to_gguf.py`` as a child with ``PYTHONPATH`` on the converter's own ``gguf-py`` (version skew breaks
   it), then ``llama-quantize`` for K-quants; output to ``convert.log``;
5. the GGUF read back with that ``gguf-py``'s ``GGUFReader``: architecture, chat template, BOS flag, tensor count,
   size, sha256; the merged folder and partial files are deleted.

``export_result.json`` is written last, atomically, on success *and* failure (``status``, ``error`` as one line).
Exit codes: 0 ok, 1 anything else, 2 bad config or missing input, 3 the converter or quantizer failed, 4 not enough
disk, 5 out of memory, 143 terminated (SIGTERM). The service judges the GGUF facts (``daemon.publish.export.outcome``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_CONVERT = 3
EXIT_DISK = 4
EXIT_OOM = 5
EXIT_TERMINATED = 128 + signal.SIGTERM

BACKENDS = ("transformers", "unsloth")
MERGE_DTYPES = ("auto", "float16", "bfloat16", "float32")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ExportFailed(Exception):
    """An expected failure: one line for the operator and the exit code that names it."""

    exit_code = EXIT_FAILED


class ConfigError(ExportFailed):
    exit_code = EXIT_CONFIG


class ConvertError(ExportFailed):
    exit_code = EXIT_CONVERT


class DiskError(ExportFailed):
    exit_code = EXIT_DISK


class Terminated(BaseException):
    """SIGTERM arrived (timeout or cancel from the service); unwinds like KeyboardInterrupt."""


def say(msg: str) -> None:
    print(f"[merge_export] {msg}", file=sys.stderr, flush=True)


def one_line(exc: BaseException | str) -> str:
    text = str(exc).strip() or (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return text.splitlines()[0][:400] if text else "unknown error"


# ------------------------------------------------------------------------------------------------- config (pure)

_REQUIRED_STR = ("backend", "base_model", "adapter_dir", "out_dir", "work_dir", "gguf_path", "quantization",
                 "chat_template", "result_path", "log_path")
_ABS = ("adapter_dir", "out_dir", "work_dir", "gguf_path", "result_path", "log_path")


def validate(raw: Any) -> list[str]:
    """Every problem of a parsed config as ``At 'key': message`` (empty when it is usable)."""
    if not isinstance(raw, dict):
        return ["At '<root>': must be a mapping"]
    problems = []
    for key in _REQUIRED_STR:
        if not isinstance(raw.get(key), str) or not raw[key]:
            problems.append(f"At {key!r}: required (a non-empty string)")
    for key in _ABS:
        if isinstance(raw.get(key), str) and raw[key] and not os.path.isabs(raw[key]):
            problems.append(f"At {key!r}: must be an absolute path, got {raw[key]!r}")
    if raw.get("backend") not in BACKENDS:
        problems.append(f"At 'backend': must be one of {', '.join(BACKENDS)}, got {raw.get('backend')!r}")
    if raw.get("merge_dtype", "auto") not in MERGE_DTYPES:
        problems.append(f"At 'merge_dtype': must be one of {', '.join(MERGE_DTYPES)}")
    for key in ("converter", "quantize"):
        step = raw.get(key)
        if step is None and key == "quantize":
            continue
        if not isinstance(step, dict) or not isinstance(step.get("argv"), list) or not step["argv"] \
                or not all(isinstance(a, str) for a in step["argv"]) or not isinstance(step.get("output"), str):
            problems.append(f"At {key!r}: needs 'argv' (a list of strings) and 'output'")
    conv = raw.get("converter")
    if isinstance(conv, dict) and not isinstance(conv.get("gguf_py"), str):
        problems.append("At 'converter.gguf_py': required")
    factor = raw.get("min_free_factor", 3.0)
    if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 0:
        problems.append("At 'min_free_factor': must be a number >= 0")
    return problems


def converter_failure(output: str, returncode: int, what: str = "convert_hf_to_gguf.py") -> str:
    """The converter's (or quantizer's) output -> one line that says what went wrong and what to do."""
    text = output or ""
    if "BPE pre-tokenizer was not recognized" in text:
        chk = re.search(r"chkhsh:\s*([0-9a-f]{16,64})", text)
        return ("the converter does not know this tokenizer's BPE pre-tokenizer"
                f"{f' (chkhsh {chk.group(1)})' if chk else ''}: use a base model llama.cpp supports "
                "or a newer llama.cpp (export.llama_cpp_dir)")
    m = re.search(r"Architecture '?([\w.-]+)'? not supported", text)
    if m:
        return f"the converter does not support the architecture {m.group(1)} (a newer llama.cpp may)"
    m = re.search(r"(ModuleNotFoundError|ImportError|AttributeError): (.+)", text)
    if m:
        return (f"{what} and its gguf-py do not match ({m.group(1)}: {m.group(2).strip()[:200]}); "
                "run `chatos-retrain setup export` again or point export.llama_cpp_dir at a complete checkout")
    m = re.search(r"(FileNotFoundError|No such file or directory)[:\s]+(.+)", text)
    if m:
        return f"{what}: a file is missing: {m.group(2).strip()[:300]}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^(\w+Error|\w+Exception|error|ERROR)\b", ln)]
    last = (errors or lines or [""])[-1]
    return f"{what} failed (exit {returncode}){': ' + last[:300] if last else ''}"


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


# ---------------------------------------------------------------------------------------------------- steps


# The merge needs torch/transformers/peft; the converter imports sentencepiece even for BPE vocabularies, numpy and
# yaml (its gguf-py); missing ones fail fast here instead of after a long merge.
NEEDED_MODULES = {"torch": "torch", "transformers": "transformers", "peft": "peft", "numpy": "numpy",
                  "sentencepiece": "sentencepiece", "yaml": "pyyaml", "safetensors": "safetensors"}


def missing_modules() -> list[str]:
    """Distribution names of the modules this interpreter lacks."""
    import importlib.util

    return [dist for mod, dist in NEEDED_MODULES.items() if importlib.util.find_spec(mod) is None]


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


def _quantized_base(model: str) -> str | None:
    cfg = Path(model, "config.json")
    if not cfg.is_file():
        return None
    try:
        q = json.loads(cfg.read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None
    return (q or {}).get("quant_method", "quantized") if isinstance(q, dict) else None


def merge(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Load base + adapter in 16/32-bit, merge, save the merged model and tokenizer into ``work``."""
    method = _quantized_base(cfg["base_model"])
    if method:
        raise ConfigError(f"base model {cfg['base_model']} is pre-quantized ({method}); the merge needs its 16-bit "
                          "original (training.base_model)")
    shutil.rmtree(work, ignore_errors=True)
    if cfg["backend"] == "unsloth":
        return _merge_unsloth(cfg, work)
    return _merge_peft(cfg, work)


def load_gguf_py(path: str) -> dict[str, Any]:
    """Import the converter's own ``gguf`` (first on sys.path) and make sure it is complete: a skewed or partial
    gguf-py fails here, in a second, instead of after the merge."""
    try:
        import gguf
    except Exception as e:
        raise ConvertError(f"cannot import the converter's gguf-py from {path}: {one_line(e)}") from None
    where = str(Path(getattr(gguf, "__file__", "") or "?").resolve())
    if not where.startswith(str(Path(path).resolve())):
        raise ConvertError(f"`import gguf` found {where}, not the converter's gguf-py in {path}")
    lacking = [name for name in ("GGUFReader", "SpecialVocab", "GGUFWriter") if not hasattr(gguf, name)]
    if lacking:
        raise ConvertError(f"the converter's gguf-py in {path} lacks {', '.join(lacking)} (version skew or a partial "
                           "copy): run `chatos-retrain setup export` again or fix export.llama_cpp_dir")
    return {"gguf_py": where}


def import_stack(backend: str) -> float:
    """Import the merge stack up front (``unsloth`` first: it patches transformers and peft); returns seconds."""
    t = time.monotonic()
    if backend == "unsloth":
        import unsloth  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    return time.monotonic() - t


def _torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _merge_peft(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(cfg["base_model"], dtype=_torch_dtype(cfg["merge_dtype"]))
    if getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False):
        raise ConfigError(f"base model {cfg['base_model']} loaded quantized; the merge needs a 16-bit base")
    dtype = next(base.parameters()).dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConfigError(f"base model {cfg['base_model']} loaded as {dtype}; merge_dtype must be 16 or 32-bit")
    model = PeftModel.from_pretrained(base, cfg["adapter_dir"])
    merged = model.merge_and_unload()
    merged.save_pretrained(str(work))
    tok = _load_tokenizer(cfg)
    tok.save_pretrained(str(work))
    return {"dtype": str(dtype).removeprefix("torch."), "parameters": sum(p.numel() for p in merged.parameters())}


def _load_tokenizer(cfg: dict[str, Any]) -> Any:
    """The adapter's tokenizer (the trainer saved it with the inference template), else the base's."""
    from transformers import AutoTokenizer

    adapter = Path(cfg["adapter_dir"])
    src = adapter if (adapter / "tokenizer_config.json").is_file() else cfg["base_model"]
    return AutoTokenizer.from_pretrained(str(src))


def _merge_unsloth(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Unsloth loads an adapter dir by loading the base its ``adapter_config.json`` names: a copy of the adapter
    pointing at the configured 16-bit base makes sure that is the base (a QLoRA run may have trained on a
    pre-quantized ``*-bnb-4bit`` repo)."""
    from unsloth import FastLanguageModel

    adapter = work.with_name(work.name + ".adapter")
    shutil.rmtree(adapter, ignore_errors=True)
    shutil.copytree(cfg["adapter_dir"], adapter)
    ac_path = adapter / "adapter_config.json"
    ac = json.loads(ac_path.read_text(encoding="utf-8"))
    ac["base_model_name_or_path"] = cfg["base_model"]
    ac_path.write_text(json.dumps(ac, indent=2), encoding="utf-8")
    try:
        model, tok = FastLanguageModel.from_pretrained(
            model_name=str(adapter),
            max_seq_length=int(cfg.get("max_seq_length") or 2048),
            dtype=None if cfg["merge_dtype"] == "auto" else _torch_dtype(cfg["merge_dtype"]),
            load_in_4bit=False,
        )
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_quantized", False):
            raise ConfigError(f"base model {cfg['base_model']} loaded quantized; the merge needs a 16-bit base")
        model.save_pretrained_merged(str(work), tok, save_method="merged_16bit")
    finally:
        shutil.rmtree(adapter, ignore_errors=True)
    base = [p for n, p in model.named_parameters() if "lora_" not in n]
    return {"dtype": str(base[0].dtype).removeprefix("torch."), "parameters": sum(p.numel() for p in base)}


def finish_tokenizer(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Make the merged folder's chat template exactly the one to embed and drop files that break the converter."""
    import gguf  # the converter's own gguf-py (see main)

    removed = []
    tc_path = work / "tokenizer_config.json"
    if tc_path.is_file():
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        if "chat_template" in tc:  # the converter prefers this key over chat_template.jinja
            del tc["chat_template"]
            tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for stray in ("chat_template.json", "additional_chat_templates"):
        p = work / stray
        if p.is_dir():
            shutil.rmtree(p)
            removed.append(stray)
        elif p.exists():
            p.unlink()
            removed.append(stray)
    add_bos = gguf.SpecialVocab(work, load_merges=False).add_special_token.get("bos") is True
    template = cfg["chat_template_no_bos"] if add_bos and cfg.get("chat_template_no_bos") else cfg["chat_template"]
    (work / "chat_template.jinja").write_text(template, encoding="utf-8")
    if _unparsable_sentencepiece(work / "tokenizer.model", has_json=(work / "tokenizer.json").is_file()):
        (work / "tokenizer.model").unlink()
        removed.append("tokenizer.model")
    return {"add_bos_token": add_bos, "bos_stripped": template != cfg["chat_template"], "removed": removed}


def _unparsable_sentencepiece(path: Path, *, has_json: bool) -> bool:
    """A ``tokenizer.model`` the converter would die on: sentencepiece rejects it (or, without sentencepiece, a
    ``tokenizer.json`` is there to convert from instead)."""
    if not path.is_file():
        return False
    try:
        import sentencepiece
    except ImportError:
        return has_json
    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception:
        return True
    return False


def run_step(argv: list[str], output: Path, log_path: Path, env: dict[str, str], what: str) -> float:
    """Run a converter/quantizer child (its own output appended to ``log_path``); returns seconds taken."""
    say(f"running {what}: {' '.join(argv)}")
    output.unlink(missing_ok=True)
    started = time.monotonic()
    with log_path.open("ab") as logf:
        mark = logf.tell()
        logf.write(f"$ {' '.join(argv)}\n".encode())
        logf.flush()
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                  cwd=output.parent, check=False)
        except OSError as e:
            raise ConvertError(f"cannot run {what} ({argv[0]}): {e.strerror or e}") from None
    took = time.monotonic() - started
    if proc.returncode != 0 or not output.is_file():
        with log_path.open("rb") as f:
            f.seek(mark)
            text = f.read()[-64 * 1024:].decode("utf-8", "replace")
        if proc.returncode == 0:
            raise ConvertError(f"{what} exited 0 but wrote no {output.name}")
        if proc.returncode < 0 and -proc.returncode == signal.SIGKILL:
            raise MemoryError(f"{what} was killed (SIGKILL; out of memory?)")
        raise ConvertError(converter_failure(text, proc.returncode, what))
    return took


def read_gguf(path: Path) -> dict[str, Any]:
    """What the ``gguf`` reader says about the file (the service judges these facts)."""
    import gguf

    reader = gguf.GGUFReader(path)

    def field(key: str) -> Any:
        f = reader.get_field(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    return {
        "path": str(path),
        "size": path.stat().st_size,
        "architecture": arch,
        "name": field("general.name"),
        "file_type": field("general.file_type"),
        "tensor_count": len(reader.tensors),
        "context_length": field(f"{arch}.context_length") if arch else None,
        "chat_template": field("tokenizer.chat_template"),
        "add_bos_token": field("tokenizer.ggml.add_bos_token"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "tokenizer_model": field("tokenizer.ggml.model"),
        "tokenizer_pre": field("tokenizer.ggml.pre"),
        "vocab_size": len(tokens.data) if tokens is not None else None,
    }


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """The steps; returns the success part of ``export_result.json``."""
    t0 = time.monotonic()
    out = Path(cfg["out_dir"])
    work = Path(cfg["work_dir"])
    final = Path(cfg["gguf_path"])
    log_path = Path(cfg["log_path"])
    adapter = Path(cfg["adapter_dir"])
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"no adapter_config.json in {adapter}")
    conv = cfg["converter"]
    for p in (Path(conv["argv"][1]) if len(conv["argv"]) > 1 else None, Path(conv["gguf_py"]) / "gguf"):
        if p is not None and not p.exists():
            raise ConfigError(f"the converter is incomplete: {p} is missing (run `chatos-retrain setup export`)")
    if cfg.get("quantize") and not os.access(cfg["quantize"]["argv"][0], os.X_OK):
        raise ConfigError(f"export.quantize_bin {cfg['quantize']['argv'][0]} is not an executable file")
    out.mkdir(parents=True, exist_ok=True)
    factor = float(cfg.get("min_free_factor", 3.0))
    size = weights_bytes(cfg["base_model"])
    disk = check_disk(out, size, factor) if size else None

    # The converter's own gguf-py, for SpecialVocab and the reader here and (via PYTHONPATH) in the converter.
    gguf_py = str(conv["gguf_py"])
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

    import_s = import_stack(cfg["backend"])
    say(f"merging {adapter} into {cfg['base_model']} ({cfg['backend']}, dtype {cfg['merge_dtype']})")
    t = time.monotonic()
    merged = merge(cfg, work)
    if disk is None:  # a hub base: its size is known now (16-bit bytes per parameter)
        disk = check_disk(out, 2 * merged["parameters"], factor)
    tok = finish_tokenizer(cfg, work)
    merge_s = time.monotonic() - t
    say(f"merged in {merge_s:.2f}s ({merged['dtype']}, {merged['parameters']} parameters); "
        f"add_bos_token={tok['add_bos_token']}, removed {tok['removed'] or 'nothing'}")

    convert_s = run_step(conv["argv"], Path(conv["output"]), log_path, env, "convert_hf_to_gguf.py")
    produced = Path(conv["output"])
    quantize_s = None
    if cfg.get("quantize"):
        q = cfg["quantize"]
        quantize_s = run_step(q["argv"], Path(q["output"]), log_path, env, "llama-quantize")
        produced.unlink(missing_ok=True)  # the f16 intermediate
        produced = Path(q["output"])

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
    return {
        "status": "succeeded",
        "gguf": facts,
        "quantization": cfg["quantization"],
        "merge": {**merged, **tok},
        "converter": {"gguf_py": gguf_info["gguf_py"], "root": conv.get("root"), "version": conv.get("version")},
        "disk": disk,
        "timings": {
            "import_s": round(import_s, 3),
            "merge_s": round(merge_s, 3),
            "convert_s": round(convert_s, 3),
            "quantize_s": round(quantize_s, 3) if quantize_s is not None else None,
            "verify_s": round(verify_s, 3),
            "total_s": round(time.monotonic() - t0, 3),
        },
    }


def cleanup(cfg: dict[str, Any]) -> None:
    """After a failure: no merged copy and no partial GGUF left behind (the log stays)."""
    if isinstance(cfg.get("work_dir"), str) and not cfg.get("keep_intermediates"):
        shutil.rmtree(cfg["work_dir"], ignore_errors=True)
    for step in (cfg.get("converter"), cfg.get("quantize")):
        if isinstance(step, dict) and isinstance(step.get("output"), str):
            Path(step["output"]).unlink(missing_ok=True)


def versions() -> dict[str, str | None]:
    import importlib.metadata

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "unsloth"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge a LoRA adapter, convert to GGUF, read it back (see the docstring).")
    p.add_argument("--config", required=True, type=Path, help="absolute path of the export config (YAML or JSON)")
    return p


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if not args.config.is_absolute():
        say(f"--config must be an absolute path, got {args.config}")
        return EXIT_CONFIG
    try:
        import yaml

        raw = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    except Exception as e:  # OSError, yaml.YAMLError, UnicodeDecodeError: all "cannot read the config"
        say(f"cannot read {args.config}: {one_line(e)}")
        return EXIT_CONFIG
    problems = validate(raw)
    if problems:
        for line in problems:
            say(f"{args.config}: {line}")
        if isinstance(raw, dict) and isinstance(raw.get("result_path"), str) and os.path.isabs(raw["result_path"]):
            write_result(Path(raw["result_path"]), {"status": "failed", "exit_code": EXIT_CONFIG,
                                                    "error": f"bad export config: {problems[0]}"})
        return EXIT_CONFIG
    cfg: dict[str, Any] = raw
    signal.signal(signal.SIGTERM, _on_sigterm)
    result_path = Path(cfg["result_path"])
    result_path.unlink(missing_ok=True)
    started = time.time()
    base = {"job_id": cfg.get("job_id"), "backend": cfg["backend"], "started_at": started}
    code = EXIT_OK
    try:
        result = run(cfg)
    except Terminated:
        code, result = EXIT_TERMINATED, {"status": "failed", "error": "terminated (SIGTERM)"}
    except ExportFailed as e:
        code, result = e.exit_code, {"status": "failed", "error": one_line(e)}
    except Exception as e:
        if is_oom(e):
            code, result = EXIT_OOM, {"status": "failed", "error": f"out of memory: {one_line(e)}"}
        else:
            traceback.print_exc()
            code, result = EXIT_FAILED, {"status": "failed", "error": f"{type(e).__name__}: {one_line(e)}"}
    if code != EXIT_OK:
        say(f"failed: {result['error']}")
        cleanup(cfg)
    try:
        vers = versions()
    except Exception:
        vers = {}
    write_result(result_path, {**base, **result, "exit_code": code, "versions": vers,
                               "finished_at": time.time()})
    if code == EXIT_OK:
        say(f"wrote {result['gguf']['path']} ({result['gguf']['size']} bytes) in {result['timings']['total_s']}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
