"""Step 6 of the export: the GGUF run in llama.cpp's own engine before Ollama ever sees it.

The converter and the ``gguf`` reader only prove the file is well-formed; a GGUF can still fail to load (a truncated
tensor, a hyper-parameter llama.cpp rejects) or fail to generate. Here ``xllamacpp`` (the llama.cpp server engine as
a Python extension, a prebuilt CPU wheel) loads the exported file, answers a smoke chat and then each prompt of the
config's ``engine.prompts`` greedily (temperature 0), through the GGUF's embedded chat template, with the template's
stop strings (the ones Ollama gets too). The raw answers go into ``export_result.json``'s ``engine`` section; the
service judges them (``daemon.publish.export.outcome``).

The engine runs in a grandchild (this file run by path, ``--spec FILE``): llama.cpp reports a load failure only as a
generic ``RuntimeError`` and prints its reason to stderr, and a native crash must not take the export child with it.
The grandchild's stderr is appended to ``convert.log``; its exit says what happened (0 ok, 3 load failed, 4
generation failed, a signal: crashed), and its one-line reason is the llama.cpp ``error loading model:`` line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from export_config import EngineError  # run by path, this file's folder is sys.path[0]; imported, merge_export's
from trainer_common import ConfigError, first_line, sayer, versions, write_json_atomic

ENGINE_PIP = "xllamacpp==2026.10.11549"
DEFAULTS: dict[str, Any] = {"enabled": True, "n_ctx": 2048, "threads": None, "max_tokens": 64, "stop": [],
                            "smoke_prompt": "Reply with one short sentence: what is 2 + 2?", "prompts": []}
EXIT_LOAD = 3
EXIT_GENERATE = 4
SMOKE_ID = "smoke"

say = sayer("merge_export")


def engine_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config's ``engine`` section over the defaults (an absent section: on, with the defaults)."""
    return {**DEFAULTS, **(cfg.get("engine") or {})}


def require_engine(engine: dict[str, Any]) -> None:
    """Before the merge: an enabled engine check needs ``xllamacpp`` in this interpreter (exit 2 when it is not)."""
    if engine["enabled"] and importlib.util.find_spec("xllamacpp") is None:
        raise ConfigError(f"{sys.executable} lacks xllamacpp (llama.cpp's engine, which loads the GGUF before Ollama "
                          f"does): pip install {ENGINE_PIP} into the trainer's environment, or set "
                          "export.engine.enabled: false")


def load_failure(log_text: str) -> str:
    """llama.cpp's reason from the grandchild's stderr: its ``error loading model:`` line, else its last error line."""
    m = re.findall(r"error loading model: (.+)", log_text)
    if m:
        return m[-1].strip()
    errors = [ln.strip() for ln in log_text.splitlines() if re.match(r"^[\d.]+ E ", ln.strip())]
    return re.sub(r"^[\d.]+ E\s+", "", errors[-1]) if errors else "no reason given"


def check(engine: dict[str, Any], gguf: Path, log_path: Path) -> dict[str, Any]:
    """Run the grandchild on ``gguf``; returns the ``engine`` section (raises :class:`EngineError` on failure)."""
    spec_path = gguf.with_name(gguf.name + ".engine-spec.json")
    answer_path = gguf.with_name(gguf.name + ".engine.json")
    answer_path.unlink(missing_ok=True)
    write_json_atomic(spec_path, {**engine, "gguf": str(gguf), "answer_path": str(answer_path)})
    argv = [sys.executable, os.path.realpath(__file__), "--spec", str(spec_path)]
    say(f"loading {gguf.name} in llama.cpp (xllamacpp, n_ctx {engine['n_ctx']}, "
        f"threads {engine['threads'] or 'auto'}): smoke chat + {len(engine['prompts'])} prompt(s)")
    try:
        with log_path.open("ab") as logf:
            mark = logf.tell()
            logf.write(f"$ {' '.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
            try:
                code = proc.wait()
            finally:  # SIGTERM (Terminated) while waiting: the grandchild goes too
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        with log_path.open("rb") as f:
            f.seek(mark)
            text = f.read()[-256 * 1024:].decode("utf-8", "replace")
        answers = json.loads(answer_path.read_text(encoding="utf-8")) if answer_path.is_file() else {}
    finally:
        spec_path.unlink(missing_ok=True)
        answer_path.unlink(missing_ok=True)
    if code == 0 and answers.get("loaded"):
        return dict(answers)
    if code < 0:
        raise EngineError(f"llama.cpp could not load the GGUF: the engine crashed ({_signal_name(-code)}): "
                          f"{load_failure(text)}")
    if code == EXIT_GENERATE:
        raise EngineError(f"llama.cpp could not generate with the GGUF: {answers.get('error') or load_failure(text)}")
    raise EngineError(f"llama.cpp could not load the GGUF: {load_failure(text)}")


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


# -- the grandchild -----------------------------------------------------------------------------------------------


def _chat(server: Any, item_id: str, messages: list[Any], max_tokens: int, stop: list[str]) -> dict[str, Any]:
    """One greedy chat -> its answer record (raises on an engine error)."""
    t = time.monotonic()
    out = server.handle_chat_completions({"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                          "stop": stop})
    if not isinstance(out, dict) or "error" in out or not out.get("choices"):
        err = out.get("error") if isinstance(out, dict) else out
        raise RuntimeError(f"{item_id}: {err.get('message', err) if isinstance(err, dict) else err}")
    choice = out["choices"][0]
    reason = choice.get("finish_reason")
    return {"id": item_id, "content": (choice.get("message") or {}).get("content") or "", "finish_reason": reason,
            "stopped": reason == "stop", "tokens": int((out.get("usage") or {}).get("completion_tokens") or 0),
            "elapsed_s": round(time.monotonic() - t, 3)}


def serve(spec: dict[str, Any]) -> int:
    """Load the GGUF, answer the smoke chat and every prompt; write the answers file. Returns the exit code."""
    import xllamacpp

    answer_path = Path(spec["answer_path"])
    params = xllamacpp.CommonParams()
    params.model.path = spec["gguf"]
    params.n_ctx = int(spec["n_ctx"])
    if spec.get("threads"):
        params.cpuparams.n_threads = int(spec["threads"])
    t = time.monotonic()
    try:
        server = xllamacpp.Server(params)
    except Exception as e:  # llama.cpp printed the reason on stderr; the parent reads it from the log
        print(f"[export_engine] load failed: {first_line(e)}", file=sys.stderr, flush=True)
        return EXIT_LOAD
    load_s = round(time.monotonic() - t, 3)
    result: dict[str, Any] = {"loaded": True, "load_s": load_s, "version": versions(["xllamacpp"])["xllamacpp"],
                              "n_ctx": params.n_ctx, "threads": spec.get("threads"), "stop": spec["stop"]}
    items = [{"id": SMOKE_ID, "messages": [{"role": "user", "content": spec["smoke_prompt"]}]}, *spec["prompts"]]
    answers: list[dict[str, Any]] = []
    try:
        for item in items:
            answers.append(_chat(server, item["id"], item["messages"],
                                 int(item.get("max_tokens") or spec["max_tokens"]), list(spec["stop"])))
    except Exception as e:
        write_json_atomic(answer_path, {**result, "answers": answers, "error": first_line(e)})
        return EXIT_GENERATE
    write_json_atomic(answer_path, {**result, "answers": answers})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2 or args[0] != "--spec":
        print("usage: export_engine.py --spec FILE (run by merge_export.py)", file=sys.stderr)
        return 2
    return serve(json.loads(Path(args[1]).read_text(encoding="utf-8")))


if __name__ == "__main__":
    sys.exit(main())
