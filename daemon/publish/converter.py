"""The pinned GGUF converter in a cache dir (I/O edge): fetched, verified, extracted, or an operator's checkout.

``pip download`` the pinned ``llama-cpp-python`` sdist, check its sha256 against :data:`SDIST`, and extract only the
converter (``convert_hf_to_gguf.py`` + its ``conversion/`` package, ``convert_lora_to_gguf.py``), its own ``gguf-py``
and the vocab-only GGUFs + chat templates into ``<cache>/llama.cpp-<version>/`` (:func:`setup_converter`).
Idempotent (a marker holding the sha), locked against a concurrent setup, and strict about the archive (absolute
names, ``..`` and links refuse it). ``export.llama_cpp_dir`` may name an existing llama.cpp checkout instead
(:func:`validate_llama_cpp_dir`). :mod:`daemon.publish.export` plans the run that uses it.

The export stage's error types live here, at the bottom of the export modules: :class:`SetupError` is an
:class:`ExportError`, so a caller that catches the latter catches a failed setup too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from daemon import log, proc

_log = log.get("daemon.publish.converter")


class ExportError(Exception):
    """An expected export failure; ``str()`` is the one line shown to the operator."""


class SetupError(ExportError):
    """The converter could not be fetched, verified, extracted or found."""


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


def cache_dir_for(configured: Path | None, env: Mapping[str, str] | None = None) -> Path:
    """Where the converter lives for this config: ``export.cache_dir`` when set (so ``sudo chatos-retrain setup
    export`` and the service agree), else :func:`default_cache_dir`."""
    return configured if configured is not None else default_cache_dir(env)


class NotSetUp(SetupError):
    """The converter is not in the cache and the export may not fetch it (``export.auto_setup`` is false)."""


def require_installed(cache_dir: Path, pin: SdistPin = SDIST) -> ConverterPaths:
    """The converter already set up in ``cache_dir``, or :class:`NotSetUp` with what to run."""
    done = installed(cache_dir, pin)
    if done is None:
        raise NotSetUp(f"the GGUF converter is not set up in {cache_dir}: run `chatos-retrain setup export` "
                       "(or set export.auto_setup: true to let the service fetch it)")
    return done


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


def sha256_file(path: Path) -> str:
    """The file's sha256 in hex, streamed (a multi-GB GGUF never sits in memory)."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
