"""A fake trainer *interpreter*: called as ``fake-python /abs/train_qlora.py --config /abs/config.yaml`` (a training
job) or ``fake-python /abs/merge_export.py --config /abs/export.yaml`` (the merge + convert child of an export).

It checks its argv, cwd and environment the way the real contract demands, then behaves as told:

- training, ``FAKE_TRAINER_MODE``: ok | crash | oom | badconfig | hang | hang_hard (ignores SIGTERM) | noresult |
  garbage | garbage_crash (hostile metrics lines, then exit 1) | partial | slow_ok (``FAKE_STEP_S`` per step).
  Real trainer output shapes (metrics.jsonl lines, result.json written last).
- export, ``FAKE_EXPORT_MODE``: ok | fail (converter failure, exit 3) | hang | slow (a pause before the GGUF is
  renamed into place) | badtemplate (a GGUF whose chat template is not the training one) | engine (llama.cpp could
  not load the GGUF: exit 6, no GGUF) | rambles (the engine's smoke answer ran to max_tokens). It writes a tiny but
  valid GGUF (the architecture the template is meant for, the training chat template, the job id in ``general.name``
  so each export has its own digest) through a ``.partial.gguf`` renamed into place, and ``export_result.json`` last and
  atomically, in the shape ``daemon/trainer/merge_export.py`` writes and ``daemon.publish.export.outcome`` reads.

Training reports canary losses when the config names ``dataset.canary_path`` (``FAKE_CANARY_AFTER``,
``FAKE_CHAMPION_CANARY``: the candidate's and the champion's, default 2.5 like the base's).
``FAKE_TRAINER_ARGV_LOG`` (a file) receives the argv of the last call, either kind.
"""

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

# The architecture each template's GGUF must declare (daemon/train/templates.py gguf_architectures; chatml: any).
ARCH = {"qwen-2.5": "qwen2", "chatml": "qwen2", "llama-3.1": "llama", "mistral": "llama"}


def fail(msg: str) -> None:
    print(f"fake-trainer: {msg}", file=sys.stderr)
    sys.exit(97)


def check_common(script: Path, cfg_path: Path, name: str) -> None:
    if not script.is_absolute() or script.name != name or not script.exists():
        fail(f"script is not the absolute {name}: {script}")
    if not cfg_path.is_absolute():
        fail(f"config path is not absolute: {cfg_path}")
    if Path.cwd() != cfg_path.parent:
        fail(f"cwd {Path.cwd()} is not the job dir {cfg_path.parent}")
    if os.getpgid(0) != os.getpid():
        fail("not in its own process group")
    if os.environ.get("PYTHONUNBUFFERED") != "1":
        fail("PYTHONUNBUFFERED not set")


def hang(hard: bool = False) -> None:
    if hard:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(1)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_gguf(path: Path, architecture: str, chat_template: str, name: str) -> None:
    """A small valid GGUF (two tensors) written with the ``gguf`` package."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name(name)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_file_type(7)  # Q8_0, as the default export.quantization says
    w.add_chat_template(chat_template)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
    rng = np.random.default_rng(seed)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 8)).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones((8,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def export_main(script: Path, cfg_path: Path) -> None:
    """Emulate merge_export.py: GGUF at ``gguf_path`` (via a partial file), then ``export_result.json``."""
    check_common(script, cfg_path, "merge_export.py")
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    for key in ("adapter_dir", "out_dir", "work_dir", "gguf_path", "result_path", "log_path"):
        if not Path(cfg[key]).is_absolute():
            fail(f"relative path in the export config: {key}={cfg[key]}")
    if Path.cwd() != Path(cfg["out_dir"]):
        fail(f"cwd {Path.cwd()} is not the export dir {cfg['out_dir']}")
    if not Path(cfg["adapter_dir"]).is_dir():
        fail(f"missing adapter: {cfg['adapter_dir']}")
    Path(os.environ.get("FAKE_TRAINER_ARGV_LOG", "/dev/null")).write_text(json.dumps(sys.argv))
    mode = os.environ.get("FAKE_EXPORT_MODE", "ok")
    result_path = Path(cfg["result_path"])
    result_path.unlink(missing_ok=True)
    started = time.time()
    base = {"job_id": cfg.get("job_id"), "backend": cfg["backend"], "started_at": started}
    if mode == "hang":
        hang()
    if mode == "fail":
        write_json_atomic(result_path, {**base, "status": "failed", "exit_code": 3, "finished_at": time.time(),
                                        "error": "convert_hf_to_gguf.py failed: the converter does not support "
                                                 "the architecture FakeForCausalLM"})
        sys.exit(3)
    if mode == "engine":
        write_json_atomic(result_path, {**base, "status": "failed", "exit_code": 6, "finished_at": time.time(),
                                        "error": "llama.cpp could not load the GGUF: tensor 'blk.0.attn_q.weight' data "
                                                 "is not within the file bounds, model is corrupted or incomplete"})
        sys.exit(6)
    template = cfg["chat_template"] if mode != "badtemplate" else "{{ messages }}"
    partial = Path(cfg["converter"]["output"])
    write_gguf(partial, ARCH.get(cfg["template_name"], "qwen2"), template, f"fake-{cfg.get('job_id')}")
    if mode == "slow":
        time.sleep(float(os.environ.get("FAKE_EXPORT_SLOW_S", "1.0")))
    final = Path(cfg["gguf_path"])
    os.replace(partial, final)
    facts = {"path": str(final), "size": final.stat().st_size, "architecture": ARCH.get(cfg["template_name"], "qwen2"),
             "name": f"fake-{cfg.get('job_id')}", "file_type": 7, "tensor_count": 2, "context_length": 128,
             "chat_template": template, "add_bos_token": None, "sha256": sha256_file(final)}
    facts["chat_template_equal"] = facts["chat_template"] == cfg["chat_template"]
    rambles = mode == "rambles"  # the engine's smoke answer, as the real child's step 6 records it
    smoke = {"id": "smoke", "content": "\n" * 64 if rambles else "Four.", "tokens": 64 if rambles else 3,
             "finish_reason": "length" if rambles else "stop", "elapsed_s": 0.01}
    engine = {"enabled": True, "loaded": True, "load_s": 0.1, "version": "fake",
              "answers": [{**smoke, "stopped": smoke["finish_reason"] == "stop"}]}
    write_json_atomic(result_path, {**base, "status": "succeeded", "gguf": facts, "quantization": cfg["quantization"],
                                    "engine": engine,
                                    "timings": {"total_s": round(time.time() - started, 3)}, "exit_code": 0,
                                    "versions": {"python": sys.version.split()[0]}, "finished_at": time.time()})


def train_main(script: Path, cfg_path: Path) -> None:
    check_common(script, cfg_path, "train_qlora.py")
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    if os.environ.get("CHATOS_JOB_ID") != cfg["job_id"]:
        fail("CHATOS_JOB_ID not set")
    paths = [cfg["model"]["name"], cfg["dataset"]["train_path"], cfg["dataset"]["eval_path"],
             cfg["training"]["output_dir"], cfg["metrics"]["output_path"], cfg["result"]["output_path"]]
    for p in paths:
        if not Path(p).is_absolute():
            fail(f"relative path in the job config: {p}")
    for p in paths[:3]:
        if not Path(p).exists():
            fail(f"missing input: {p}")
    Path(os.environ.get("FAKE_TRAINER_ARGV_LOG", "/dev/null")).write_text(json.dumps(sys.argv))
    mode = os.environ.get("FAKE_TRAINER_MODE", "ok")
    metrics = open(cfg["metrics"]["output_path"], "a", buffering=1)  # noqa: SIM115
    job = cfg["job_id"]
    metrics.write(json.dumps({"event": "job_started", "job_id": job, "backend": "fake"}) + "\n")
    steps = int(cfg["training"]["max_steps"])
    if mode == "partial":
        metrics.write('{"job_id": "' + job + '", "step": 1, "train_lo')
        metrics.flush()
        time.sleep(0.3)
        metrics.write('ss": 2.0, "epoch": 0.1, "learning_rate": 0.0002, "tokens_per_s": 10}\n')
    if mode in ("garbage", "garbage_crash"):
        metrics.write("this is not json\n[1,2]\n")
    if mode == "garbage_crash":  # hostile lines of every kind, then a crash whose error spans lines
        metrics.buffer.write(b"\xff\xfe not utf-8 \x00\n")
        metrics.flush()
        metrics.write('{"step": "three", "train_loss": "NaN", "epoch": null}\n{"step": 1e999, "train_loss": -1e999}\n'
                      '{"event": "job_finished", "status": 7, "error": {"nested": ["not", "a", "string"]}}\n'
                      '{"truncated": \n' + "x" * 100_000 + "\n")
        metrics.write(json.dumps({"event": "job_finished", "status": "failed", "error": "ValueError: bad batch\n"
                                  "  File train.py, line 3\n  more traceback"}) + "\n")
        sys.exit(1)
    step_s = float(os.environ.get("FAKE_STEP_S", "0.1"))
    for step in range(1, steps + 1):
        metrics.write(json.dumps({"job_id": job, "step": step, "train_loss": 3.0 - step * 0.1, "epoch": step / steps,
                                  "learning_rate": 2e-4, "tokens_per_s": 100.0}) + "\n")
        if mode == "slow_ok":
            time.sleep(step_s)
    if mode in ("hang", "hang_hard"):
        hang(mode == "hang_hard")
    if mode in ("crash", "oom", "badconfig"):
        code, err = {"crash": (1, "RuntimeError: boom"), "oom": (4, "CUDA out of memory"),
                     "badconfig": (2, "unknown chat template 'x'")}[mode]
        metrics.write(json.dumps({"event": "job_finished", "status": "failed", "final_loss": None,
                                  "total_steps": steps, "runtime_seconds": 0.1, "error": err}) + "\n")
        sys.exit(code)
    out = Path(cfg["training"]["output_dir"]) / "adapter"
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text("{}")
    metrics.write(json.dumps({"event": "job_finished", "status": "succeeded", "final_loss": 3.0 - steps * 0.1,
                              "total_steps": steps, "runtime_seconds": 0.1}) + "\n")
    if mode != "noresult":
        after = float(os.environ.get("FAKE_EVAL_AFTER", "1.5"))
        backend = cfg["backend"] if cfg["backend"] in ("transformers", "unsloth") else "transformers"
        result = {"adapter_dir": str(out), "final_train_loss": 3.0 - steps * 0.1, "eval_loss_before": 2.0,
                  "eval_loss_after": after,
                  "champion_eval_loss": float(os.environ.get("FAKE_CHAMPION", "1.8"))
                  if cfg["gate"]["champion_adapter"] else None,
                  "steps": steps, "runtime_seconds": 0.1, "backend": backend,
                  "base_model": cfg["model"]["name"], "chat_template": cfg["model"]["chat_template"]}
        canary = cfg["dataset"].get("canary_path")
        if canary:  # the canary set: FAKE_CANARY_AFTER / FAKE_CHAMPION_CANARY (losses; 2.5 = no change)
            result.update(canary_examples=Path(canary).read_text().count("\n"),
                          canary_loss_before=2.5, canary_loss_after=float(os.environ.get("FAKE_CANARY_AFTER", "2.5")),
                          champion_canary_loss=float(os.environ.get("FAKE_CHAMPION_CANARY", "2.5"))
                          if cfg["gate"]["champion_adapter"] else None)
        write_json_atomic(Path(cfg["result"]["output_path"]), result)


def main() -> None:
    args = sys.argv[1:]
    if len(args) != 3 or args[1] != "--config":
        fail(f"bad argv {args}")
    script, cfg_path = Path(args[0]), Path(args[2])
    if script.name == "merge_export.py":
        export_main(script, cfg_path)
    else:
        train_main(script, cfg_path)


if __name__ == "__main__":
    main()
