"""The converter's side: its own gguf-py, its children (``convert_hf_to_gguf.py``, ``llama-quantize``), their
failures as one line, and the GGUF read back. Version skew between the converter and a gguf-py breaks it, so the
``gguf`` imported here is always the converter's (its folder is first on ``sys.path``; see ``merge_export.run``).
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from export_config import ConvertError
from trainer_common import first_line, sayer

say = sayer("merge_export")


def load_gguf_py(path: str) -> dict[str, Any]:
    """Import the converter's own ``gguf`` (first on sys.path) and make sure it is complete: a skewed or partial
    gguf-py fails here, in a second, instead of after the merge."""
    try:
        import gguf
    except Exception as e:
        raise ConvertError(f"cannot import the converter's gguf-py from {path}: {first_line(e)}") from None
    where = str(Path(getattr(gguf, "__file__", "") or "?").resolve())
    if not where.startswith(str(Path(path).resolve())):
        raise ConvertError(f"`import gguf` found {where}, not the converter's gguf-py in {path}")
    lacking = [name for name in ("GGUFReader", "SpecialVocab", "GGUFWriter") if not hasattr(gguf, name)]
    if lacking:
        raise ConvertError(f"the converter's gguf-py in {path} lacks {', '.join(lacking)} (version skew or a partial "
                           "copy): run `chatos-retrain setup export` again or fix export.llama_cpp_dir")
    return {"gguf_py": where}


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
