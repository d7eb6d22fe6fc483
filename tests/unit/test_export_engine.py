"""The export's llama.cpp check, as a contract: the config section the service writes (``export.merge_config`` from
``export.engine.*``), the child's checks of it, the one line it makes of llama.cpp's stderr, and the service's
verdict on the ``engine`` section of ``export_result.json`` (``export.outcome``). The engine itself runs in
tests/e2e/test_export_cpu.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.cycle import exporting
from daemon.publish import converter, export
from daemon.settings import Settings
from daemon.train import templates
from daemon.trainer import merge_export

TRAINER = Path(__file__).resolve().parents[2] / "daemon" / "trainer"
if str(TRAINER) not in sys.path:
    sys.path.insert(0, str(TRAINER))  # as each script does before importing its parts

import export_engine  # noqa: E402
import trainer_common  # noqa: E402

QWEN = templates.get("qwen-2.5")
LLAMA = templates.get("llama-3.1")


def _config(tmp: Path, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "job_id": "e1", "backend": "transformers", "base_model": "/models/base", "adapter_dir": tmp / "adapter",
        "out_dir": tmp / "out", "template": QWEN, "python": Path("/v/bin/python"),
        "converter": converter.ConverterPaths(root=Path("/opt/llama.cpp"), source="checkout"),
    }
    return export.merge_config(**{**args, **kw})


def _result(engine: dict[str, Any] | None) -> dict[str, Any]:
    facts = {"path": "/o/m.gguf", "architecture": "qwen2", "tensor_count": 26, "chat_template": QWEN.jinja,
             "add_bos_token": None, "sha256": "ab" * 32, "size": 123}
    return {"status": "succeeded", "gguf": facts, **({"engine": engine} if engine is not None else {})}


def _engine(content: str = "4.", finish: str = "stop", **kw: Any) -> dict[str, Any]:
    smoke = {"id": "smoke", "content": content, "finish_reason": finish, "stopped": finish == "stop", "tokens": 3,
             "elapsed_s": 0.01}
    return {"enabled": True, "loaded": True, "load_s": 0.9, "version": "2026.10.11549", "answers": [smoke], **kw}


# -- the plan -------------------------------------------------------------------------------------------------------


def test_merge_config_engine_section_defaults_and_template_stops(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert cfg["engine"] == {"enabled": True, "n_ctx": 2048, "threads": None, "max_tokens": 64,
                             "stop": ["<|im_end|>", "<|endoftext|>"],
                             "smoke_prompt": "Reply with one short sentence: what is 2 + 2?", "prompts": []}
    assert merge_export.validate(cfg) == []
    llama = _config(tmp_path, template=LLAMA)
    assert llama["engine"]["stop"] == list(LLAMA.stop) and "<|eot_id|>" in llama["engine"]["stop"]


def test_merge_config_engine_from_settings(tmp_path: Path) -> None:
    s = Settings.model_validate({"export": {"engine": {"n_ctx": 512, "threads": 2, "max_tokens": 16},
                                            "smoke": {"prompt": "Say hi."}}})
    assert s.export.engine.enabled is True and s.export.engine.require_stop is None
    assert exporting.engine_require_stop(s) is True  # null: as export.smoke.require_stop (on by default)
    assert exporting.engine_require_stop(Settings.model_validate({"export": {"smoke": {"require_stop": False}}})) \
        is False
    assert exporting.engine_require_stop(Settings.model_validate(
        {"export": {"smoke": {"require_stop": False}, "engine": {"require_stop": True}}})) is True
    prompts = ({"id": "r1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},)
    check = exporting.engine_check(s)
    cfg = _config(tmp_path, engine=export.EngineCheck(**{**check.__dict__, "prompts": prompts}))
    assert cfg["engine"] == {"enabled": True, "n_ctx": 512, "threads": 2, "max_tokens": 16,
                             "stop": list(QWEN.stop), "smoke_prompt": "Say hi.", "prompts": [dict(prompts[0])]}
    assert merge_export.validate(cfg) == []
    off = exporting.engine_check(Settings.model_validate({"export": {"engine": {"enabled": False}}}))
    assert _config(tmp_path, engine=off)["engine"]["enabled"] is False
    assert Settings().export.engine.model_dump() == {"enabled": True, "n_ctx": 2048, "threads": None,
                                                     "max_tokens": 64, "require_stop": None}


@pytest.mark.parametrize(("engine", "fragment"), [
    ("on", "At 'engine': must be a mapping"),
    ({"enabled": "yes"}, "At 'engine.enabled'"),
    ({"n_ctx": 0}, "At 'engine.n_ctx'"),
    ({"max_tokens": True}, "At 'engine.max_tokens'"),
    ({"threads": -1}, "At 'engine.threads'"),
    ({"stop": "<|im_end|>"}, "At 'engine.stop'"),
    ({"stop": [""]}, "At 'engine.stop'"),
    ({"prompts": {"id": "x"}}, "At 'engine.prompts': must be a list"),
    ({"prompts": [{"id": "x"}]}, "At 'engine.prompts[0]'"),
    ({"prompts": [{"id": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}]},
     "At 'engine.prompts[0]'"),
])
def test_child_refuses_a_bad_engine_section(tmp_path: Path, engine: Any, fragment: str) -> None:
    cfg = {**_config(tmp_path), "engine": engine}
    problems = merge_export.validate(cfg)
    assert any(p.startswith(fragment) for p in problems), problems


def test_engine_settings_default_on_when_the_section_is_absent() -> None:
    assert export_engine.engine_settings({})["enabled"] is True
    assert export_engine.engine_settings({"engine": {"enabled": False}})["enabled"] is False


def test_missing_xllamacpp_is_one_line_naming_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xllamacpp" else real(name, *a))
    with pytest.raises(trainer_common.ConfigError) as e:
        export_engine.require_engine(export_engine.engine_settings({}))
    line = trainer_common.first_line(e.value)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert f"{sys.executable} lacks xllamacpp" in line and "pip install xllamacpp==2026.10.11549" in line
    assert "export.engine.enabled: false" in line
    export_engine.require_engine(export_engine.engine_settings({"engine": {"enabled": False}}))  # off: not needed


def test_load_failure_reads_llama_cpps_reason() -> None:
    log = ("0.00.060.268 E llama_model_load_from_file_impl: failed to load model\n"
           "0.00.105.766 E llama_model_load: error loading model: tensor 'token_embd.weight' data is not within the "
           "file bounds, model is corrupted or incomplete\n"
           "0.00.106.101 E srv          init: exiting due to model loading error\n")
    assert export_engine.load_failure(log) == ("tensor 'token_embd.weight' data is not within the file bounds, "
                                               "model is corrupted or incomplete")
    assert export_engine.load_failure("0.00.003.810 E srv  init: exiting due to model loading error\n") == \
        "srv  init: exiting due to model loading error"
    assert export_engine.load_failure("") == "no reason given"


# -- the verdict ----------------------------------------------------------------------------------------------------


def test_outcome_accepts_a_loaded_engine_and_keeps_its_facts() -> None:
    out = export.outcome(0, _result(_engine()), QWEN)
    assert out.ok and out.reason == "ok" and out.engine is not None and out.engine["load_s"] == 0.9
    rambling = _engine("\n\n\n", "length")  # a tiny random model: loaded and generated is all that is asked
    assert export.outcome(0, _result(rambling), QWEN).ok
    assert export.outcome(0, _result({"enabled": False}), QWEN).ok
    assert export.outcome(0, _result(None), QWEN).ok  # a result from before the engine check


def test_outcome_require_stop_refuses_a_smoke_answer_cut_by_max_tokens() -> None:
    assert export.outcome(0, _result(_engine()), QWEN, engine_require_stop=True).ok
    out = export.outcome(0, _result(_engine("\n\n\n", "length")), QWEN, engine_require_stop=True)
    assert not out.ok
    assert out.reason == ("engine check failed: llama.cpp's smoke answer is empty; llama.cpp's smoke answer did not "
                          "end on a stop (finish_reason 'length' after 3 tokens): check the template and stops")


def test_outcome_refuses_an_engine_that_did_not_load() -> None:
    out = export.outcome(0, _result({"enabled": True, "loaded": False}), QWEN)
    assert not out.ok and out.reason == "engine check failed: llama.cpp did not load the GGUF"
    out = export.outcome(0, _result({**_engine(), "answers": []}), QWEN)
    assert not out.ok and "llama.cpp gave no smoke answer" in out.reason
    both = export.outcome(0, {**_result({"loaded": False}), "gguf": {"path": "/o/m.gguf"}}, QWEN)
    assert both.reason.startswith("GGUF check failed: ") and "; engine check failed: " in both.reason


def test_outcome_of_exit_6_is_the_childs_one_line() -> None:
    res = {"status": "failed", "exit_code": 6,
           "error": "llama.cpp could not load the GGUF: tensor 'blk.1.ffn_down.weight' data is not within the file "
                    "bounds, model is corrupted or incomplete"}
    out = export.outcome(6, res, QWEN)
    assert not out.ok and out.gguf_path is None
    assert out.reason == ("the llama.cpp engine check failed: llama.cpp could not load the GGUF: tensor "
                          "'blk.1.ffn_down.weight' data is not within the file bounds, model is corrupted or "
                          "incomplete")
    assert merge_export.EXIT_ENGINE == 6 and export.interpret_exit(6) == "the llama.cpp engine check failed"
