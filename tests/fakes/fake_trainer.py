"""A fake trainer *interpreter*: called as ``fake-python /abs/train_qlora.py --config /abs/config.yaml``.

It checks its argv, cwd and environment the way the real contract demands, then behaves as FAKE_TRAINER_MODE says:
ok | crash | oom | badconfig | hang | hang_hard (ignores SIGTERM) | noresult | garbage | partial | slow_ok.
Real trainer output shapes (metrics.jsonl lines, result.json written last) so the runner is tested for real.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path


def fail(msg: str) -> None:
    print(f"fake-trainer: {msg}", file=sys.stderr)
    sys.exit(97)


def main() -> None:
    args = sys.argv[1:]
    if len(args) != 3 or args[1] != "--config":
        fail(f"bad argv {args}")
    script, cfg_path = Path(args[0]), Path(args[2])
    if not script.is_absolute() or script.name != "train_qlora.py" or not script.exists():
        fail(f"script is not the absolute train_qlora.py: {script}")
    if not cfg_path.is_absolute():
        fail(f"config path is not absolute: {cfg_path}")
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    if Path.cwd() != cfg_path.parent:
        fail(f"cwd {Path.cwd()} is not the job dir {cfg_path.parent}")
    if os.environ.get("CHATOS_JOB_ID") != cfg["job_id"] or os.environ.get("PYTHONUNBUFFERED") != "1":
        fail("CHATOS_JOB_ID / PYTHONUNBUFFERED not set")
    if os.getpgid(0) != os.getpid():
        fail("not in its own process group")
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
    if mode == "garbage":
        metrics.write("this is not json\n[1,2]\n")
    for step in range(1, steps + 1):
        metrics.write(json.dumps({"job_id": job, "step": step, "train_loss": 3.0 - step * 0.1, "epoch": step / steps,
                                  "learning_rate": 2e-4, "tokens_per_s": 100.0}) + "\n")
        if mode == "slow_ok":
            time.sleep(0.1)
    if mode in ("hang", "hang_hard"):
        if mode == "hang_hard":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
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
        result = {"adapter_dir": str(out), "final_train_loss": 3.0 - steps * 0.1, "eval_loss_before": 2.0,
                  "eval_loss_after": after,
                  "champion_eval_loss": float(os.environ.get("FAKE_CHAMPION", "1.8"))
                  if cfg["gate"]["champion_adapter"] else None,
                  "steps": steps, "runtime_seconds": 0.1, "backend": "fake"}
        tmp = Path(cfg["result"]["output_path"] + ".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, cfg["result"]["output_path"])


if __name__ == "__main__":
    main()
