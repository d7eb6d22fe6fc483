"""GGUF export: the pinned converter in a cache dir, the merge/convert job plan, and the judgement of its result.

Three parts, in the order a cycle uses them:

* **Converter setup** (I/O edge, :func:`setup_converter`): ``pip download`` the pinned ``llama-cpp-python`` sdist,
  check its sha256 against :data:`SDIST`, and extract only the converter (``convert_hf_to_gguf.py`` + its
  ``conversion/`` package, ``convert_lora_to_gguf.py``), its own ``gguf-py`` and the vocab-only GGUFs + chat templates
  into ``<cache>/llama.cpp-<version>/``. Idempotent (a marker holding the sha), locked against a concurrent setup,
  and strict about the archive (absolute names, ``..`` and links refuse it). ``export.llama_cpp_dir`` may name an
  existing llama.cpp checkout instead (:func:`validate_llama_cpp_dir`).
* **Plan** (pure): the job config of ``daemon/trainer/merge_export.py`` (which runs in the trainer's interpreter and
  cannot import us), with the converter and quantizer argv already built (:func:`merge_config`).
* **Judgement** (pure): the child's ``export_result.json`` + exit status -> an :class:`ExportOutcome`; the GGUF's
  facts read by the ``gguf`` reader -> problems (:func:`gguf_problems`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from daemon import log, proc
from daemon.train.templates import ChatTemplate

_log = log.get("daemon.publish.export")

MERGE_EXPORT_SCRIPT = Path(__file__).resolve().parent.parent / "trainer" / "merge_export.py"


class ExportError(Exception):
    """An expected export failure; ``str()`` is the one line shown to the operator."""


class SetupError(ExportError):
    """The converter could not be fetched, verified, extracted or found."""


# -- converter setup -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SdistPin:
    """One PyPI source distribution, pinned by version and sha256 (PyPI's own digest for that file)."""

    project: str
    version: str
    filename: str
    sha256: str
    size: int

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def top(self) -> str:
        """The archive folder holding llama.cpp (``llama_cpp_python-<ver>/vendor/llama.cpp``)."""
        return f"{self.filename.removesuffix('.tar.gz')}/vendor/llama.cpp"


# sha256 as published by PyPI for this file (https://pypi.org/simple/llama-cpp-python/), checked 2026-11-25.
SDIST = SdistPin(
    project="llama-cpp-python",
    version="0.3.36",
    filename="llama_cpp_python-0.3.36.tar.gz",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    size=76_589_250,
)
MARKER = ".complete"  # holds the sdist's sha256; an empty or different marker means "extract again"
DOWNLOAD_TIMEOUT_S = 900.0

# What we take from vendor/llama.cpp/ (relative POSIX paths); everything else in the 77 MB sdist is left out.
_WANTED_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
_WANTED_TREES = ("conversion/", "gguf-py/")
_WANTED_GLOBS = (re.compile(r"models/ggml-vocab-[^/]+\.gguf"), re.compile(r"models/templates/[^/]+\.jinja"))


@dataclass(frozen=True, slots=True)
class ConverterPaths:
    """Where the converter and its files are: an extracted sdist in the cache or an operator's llama.cpp checkout."""

    root: Path
    source: str  # "sdist" | "checkout"
    version: str | None = None  # the llama-cpp-python version for an sdist
    sha256: str | None = None  # the sdist's sha256

    @property
    def convert_hf(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def convert_lora(self) -> Path:
        return self.root / "convert_lora_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"

    @property
    def vocab_dir(self) -> Path:
        return self.root / "models"

    @property
    def templates_dir(self) -> Path:
        return self.root / "models" / "templates"

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "source": self.source, "version": self.version, "sha256": self.sha256}


def default_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$CHATOS_RETRAIN_CACHE``, systemd's ``$CACHE_DIRECTORY``, ``$XDG_CACHE_HOME/chatos-retrain``, else
    ``~/.cache/chatos-retrain`` (the first two are used as they are, the others get ``chatos-retrain`` appended)."""
    env = os.environ if env is None else env
    if env.get("CHATOS_RETRAIN_CACHE"):
        return Path(env["CHATOS_RETRAIN_CACHE"]).expanduser()
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "chatos-retrain"
    return Path("~/.cache/chatos-retrain").expanduser()


def converter_dir(cache_dir: Path, pin: SdistPin = SDIST) -> Path:
    """``<cache>/llama.cpp-<version>``: the layout ``.ci/train-setup.sh`` and ``tinymodel.py`` already use."""
    return cache_dir / f"llama.cpp-{pin.version}"


def wanted(rel: str) -> bool:
    """Whether a path under ``vendor/llama.cpp/`` is one we extract."""
    return (
        rel in _WANTED_FILES
        or rel.startswith(_WANTED_TREES)
        or any(rx.fullmatch(rel) for rx in _WANTED_GLOBS)
    )


def member_problem(name: str, *, is_file: bool, is_dir: bool) -> str | None:
    """Why an archive member must not be extracted (absolute, escaping with ``..``, a link or device), or None."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return f"absolute path {name!r}"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return f"path {name!r} escapes the archive"
    if not (is_file or is_dir):
        return f"{name!r} is a link or special file"
    return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The file's sha256, streamed (a multi-GB GGUF never sits in memory)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def validate_llama_cpp_dir(path: Path) -> ConverterPaths:
    """An operator's llama.cpp checkout (or an extracted sdist): it must hold the converter and ``gguf-py``."""
    root = Path(path).expanduser()
    if not root.is_absolute():
        raise SetupError(f"export.llama_cpp_dir must be an absolute path, got {path}")
    if not root.is_dir():
        raise SetupError(f"export.llama_cpp_dir {root} is not a directory")
    paths = ConverterPaths(root=root, source="checkout")
    missing = [p for p in (paths.convert_hf, paths.gguf_py / "gguf" / "__init__.py") if not p.is_file()]
    try:
        imports_package = "from conversion import" in paths.convert_hf.read_text(encoding="utf-8", errors="replace")
    except OSError:
        imports_package = False
    if imports_package and not (root / "conversion" / "__init__.py").is_file():
        missing.append(root / "conversion" / "__init__.py")
    if missing:
        shown = ", ".join(str(p.relative_to(root)) for p in missing)
        raise SetupError(f"export.llama_cpp_dir {root} is not a llama.cpp checkout: missing {shown}")
    return paths


def installed(cache_dir: Path, pin: SdistPin = SDIST) -> ConverterPaths | None:
    """The extracted converter when it is complete for ``pin`` (marker holds its sha), else None."""
    root = converter_dir(cache_dir, pin)
    try:
        marker = (root / MARKER).read_text().strip()
    except OSError:
        return None
    if marker != pin.sha256:
        return None
    try:
        validate_llama_cpp_dir(root)
    except SetupError:
        return None
    return ConverterPaths(root=root, source="sdist", version=pin.version, sha256=pin.sha256)


def setup_converter(
    cache_dir: Path,
    *,
    llama_cpp_dir: Path | None,
    pin: SdistPin = SDIST,
    python: Path | None = None,
    timeout_s: float = DOWNLOAD_TIMEOUT_S,
) -> ConverterPaths:
    """``chatos-retrain setup export``: the converter ready to run, fetched and extracted only when needed.

    With ``llama_cpp_dir`` (``export.llama_cpp_dir``) nothing is downloaded: the checkout is validated and used.
    Otherwise ``<cache>/sdist/<file>`` is reused when its sha256 matches, else downloaded with pip (hash-checked by
    pip and again here), and the wanted files are extracted into ``<cache>/llama.cpp-<version>/``.
    """
    if llama_cpp_dir is not None:
        paths = validate_llama_cpp_dir(llama_cpp_dir)
        _log.info("export.converter_checkout", root=str(paths.root))
        return paths
    cache_dir = Path(cache_dir).expanduser()
    if not cache_dir.is_absolute():
        raise SetupError(f"the cache dir must be an absolute path, got {cache_dir}")
    done = installed(cache_dir, pin)
    if done is not None:
        _log.debug("export.converter_present", root=str(done.root))
        return done
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".setup.lock"):
        done = installed(cache_dir, pin)  # another process may have finished while we waited
        if done is not None:
            return done
        sdist = fetch_sdist(cache_dir, pin, python=python, timeout_s=timeout_s)
        root = extract_converter(sdist, converter_dir(cache_dir, pin), pin)
    _log.info("export.converter_ready", root=str(root), version=pin.version, sha256=pin.sha256)
    return ConverterPaths(root=root, source="sdist", version=pin.version, sha256=pin.sha256)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def pip_download_argv(python: Path, requirements: Path, dest: Path) -> list[str]:
    """``pip download`` of exactly the pinned sdist; the requirements file carries ``--hash`` so pip refuses a
    different file before it runs the sdist's build backend (which ``pip download`` does to read its metadata)."""
    return [str(python), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
            "--disable-pip-version-check", "-r", str(requirements), "-d", str(dest)]


def fetch_sdist(cache_dir: Path, pin: SdistPin = SDIST, *, python: Path | None = None,
                timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """``<cache>/sdist/<file>`` with the pinned sha256: reused when it matches, else downloaded and checked."""
    folder = cache_dir / "sdist"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / pin.filename
    if target.is_file():
        if sha256_file(target) == pin.sha256:
            return target
        _log.warning("export.sdist_replaced", path=str(target), reason="sha256 differs from the pinned one")
        target.unlink()
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp_s:
        tmp = Path(tmp_s)
        reqs = tmp / "requirements.txt"
        reqs.write_text(f"{pin.requirement} --hash=sha256:{pin.sha256}\n")
        argv = pip_download_argv(python or Path(sys.executable), reqs, tmp / "out")
        try:
            done = proc.run_command(argv, timeout=timeout_s, cwd=tmp,
                                    env={**os.environ, "PIP_NO_INPUT": "1", "PIP_PROGRESS_BAR": "off"})
        except proc.TimeoutExpired:
            raise SetupError(f"pip download {pin.requirement} did not finish within {timeout_s:g}s") from None
        except OSError as exc:
            raise SetupError(f"cannot run pip ({argv[0]}): {exc.strerror or exc}") from None
        if done.returncode != 0:
            raise SetupError(pip_failure(done.stdout + done.stderr, pin, done.returncode))
        got = tmp / "out" / pin.filename
        if not got.is_file():
            found = sorted(p.name for p in (tmp / "out").glob("*"))
            raise SetupError(f"pip download {pin.requirement} produced {found or 'nothing'}, not {pin.filename}")
        digest = sha256_file(got)
        if digest != pin.sha256:
            raise SetupError(f"{pin.filename}: sha256 {digest} is not the pinned {pin.sha256}; refusing it")
        os.replace(got, target)
    return target


def pip_failure(output: str, pin: SdistPin, code: int) -> str:
    """pip's output for a failed download -> one line."""
    if "DO NOT MATCH THE HASHES" in output:
        got = re.search(r"Got\s+([0-9a-f]{64})", output)
        return (f"{pin.filename}: sha256 {got.group(1) if got else '(unknown)'} is not the pinned {pin.sha256}; "
                "pip refused it")
    errors = [ln.strip() for ln in output.splitlines() if ln.strip().startswith("ERROR:")]
    if errors:
        return f"pip download {pin.requirement} failed: {errors[-1].removeprefix('ERROR:').strip()}"
    tail = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return f"pip download {pin.requirement} failed (exit {code}){': ' + tail[-1] if tail else ''}"


def extract_converter(sdist: Path, dest: Path, pin: SdistPin = SDIST) -> Path:
    """Extract the wanted files of a verified sdist into ``dest`` (replaced atomically); returns ``dest``.

    The whole archive is refused when any member is absolute, climbs out with ``..``, or is a link or special file:
    the pinned sdist has none, so one means the file is not what we pinned.
    """
    prefix = pin.top + "/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
    count = 0
    try:
        try:
            with tarfile.open(sdist, "r:gz") as tar:
                for m in tar:
                    problem = member_problem(m.name, is_file=m.isfile(), is_dir=m.isdir())
                    if problem:
                        raise SetupError(f"{sdist.name}: refusing the archive: {problem}")
                    if not m.isfile() or not m.name.startswith(prefix):
                        continue
                    rel = m.name[len(prefix):]
                    if not wanted(rel):
                        continue
                    out = tmp / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(m)
                    if src is None:
                        raise SetupError(f"{sdist.name}: cannot read {m.name}")
                    with src, out.open("wb") as f:
                        shutil.copyfileobj(src, f)
                    out.chmod(0o755 if m.mode & 0o100 else 0o644)
                    count += 1
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise SetupError(f"{sdist.name}: cannot extract: {exc}") from None
        try:
            validate_llama_cpp_dir(tmp)  # the archive had what we need
        except SetupError as exc:
            raise SetupError(f"{sdist.name} does not hold the converter: {str(exc).rpartition(': ')[2]}") from None
        (tmp / MARKER).write_text(pin.sha256 + "\n")
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log.info("export.extracted", dest=str(dest), files=count)
    return dest


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
    max_seq_length: int = 2048,
    min_free_factor: float = 3.0,
    keep_intermediates: bool = False,
) -> dict[str, Any]:
    """The config of one ``merge_export.py`` run: every path absolute, the converter/quantizer argv built here.

    ``python`` is the trainer's interpreter: the converter runs there (torch, transformers, numpy) with this
    converter's own ``gguf-py``. K-quants go through an f16 GGUF and ``quantize_bin``.
    """
    if backend not in ("transformers", "unsloth"):
        raise ValueError(f"backend must be 'transformers' or 'unsloth' (resolved, not 'auto'), got {backend!r}")
    if quantization not in CONVERT_OUTTYPES and quantization not in QUANTIZE_TYPES:
        raise ValueError(f"unknown quantization {quantization!r}")
    if quantization in QUANTIZE_TYPES and quantize_bin is None:
        raise ExportError(f"export.quantization {quantization} needs export.quantize_bin (a llama-quantize binary); "
                          f"use one of {', '.join(CONVERT_OUTTYPES)} without it")
    for name, p in (("adapter_dir", adapter_dir), ("out_dir", out_dir), ("python", python)):
        if not Path(p).is_absolute():
            raise ValueError(f"{name} must be an absolute path, got {p}")
    work = out_dir / "merged"
    final = out_dir / gguf_name
    stem = final.name.removesuffix(".gguf")
    quantize: dict[str, Any] | None = None
    if quantization in QUANTIZE_TYPES:
        assert quantize_bin is not None
        f16 = out_dir / f"{stem}.f16.partial.gguf"
        quantized = out_dir / f"{stem}.partial.gguf"
        convert = {"argv": converter_argv(python, converter, work, f16, "f16", model_name), "output": str(f16)}
        quantize = {"argv": quantize_argv(quantize_bin, f16, quantized, quantization), "output": str(quantized)}
    else:
        converted = out_dir / f"{stem}.partial.gguf"
        argv = converter_argv(python, converter, work, converted, quantization, model_name)
        convert = {"argv": argv, "output": str(converted)}
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
    }


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


def outcome(code: int | None, result: Mapping[str, Any] | None, template: ChatTemplate) -> ExportOutcome:
    """The child's exit status + ``export_result.json`` (None when unreadable) -> the verdict, re-checking the GGUF's
    facts here (the service, not the child, decides what is registrable)."""
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
    ok = not problems
    return ExportOutcome(
        ok,
        "ok" if ok else "GGUF check failed: " + "; ".join(problems),
        code,
        gguf_path=path,
        sha256=facts.get("sha256"),
        size=facts.get("size"),
        architecture=facts.get("architecture"),
        problems=problems,
        result=res,
    )
