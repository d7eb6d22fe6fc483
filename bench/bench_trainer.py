"""The trainer's speed on the CPU before and after issue 14, in one run: the same job, the same seed, the same data.

    .venv/bin/python bench/bench_trainer.py [--before REV] [--steps 30] [--skip-unsloth] [--json FILE]

"before" is the trainer folder of git revision REV (default 2c4723b, the last commit before the speed work),
extracted with ``git archive`` into a scratch folder and run by path; "after" is this checkout's. Each runs the
bench_cycle job (the tiny Qwen2 model, 80 conversations of a generated store, batch 2 x accumulation 4, one
thread: ``OMP_NUM_THREADS=1``) for ``--steps`` steps, logging every step, with the TRL+PEFT backend and, unless
``--skip-unsloth``, the Unsloth backend (its venv, CPU). Printed per run: tokens/s over the training loop, the steady
rate after the first step, seconds from the trainer's start to its first step (and the imports' share where the
trainer reports it), the whole job's wall time, the eval loss before and after; then the two train-loss curves side
by side (the optimisation must change the speed, not what is learned).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from trainjobs import LLAMA_CPP_DIR, TINYMODEL, UNSLOTH_PYTHON, make_job  # noqa: E402

from daemon.demo.storegen import generate_store  # noqa: E402

NEW_KEYS = {"dataset": ("token_cache_dir",),
            "training": ("padding", "pad_to_multiple_of", "gradient_checkpointing", "gpu_fp32")}


def tiny_model(work: Path) -> Path:
    out = subprocess.run([sys.executable, str(TINYMODEL), str(work), "--family", "qwen2", "--llama-cpp-dir",
                          str(LLAMA_CPP_DIR)], capture_output=True, text=True, timeout=900, check=True)
    return Path(json.loads(out.stdout.strip().splitlines()[-1])["path"])


def dataset(work: Path) -> tuple[Path, Path]:
    """The service's own dataset of a generated store (answers of 10-30 words), as bench_cycle trains on."""
    from daemon import api, settings
    from daemon.state import State

    store = work / "store"
    generate_store(store, 200, days=2, seed=7, assistant_words=(10, 30), feedback_fraction=0.7)
    s = settings.Settings(store={"root": str(store)}, state={"dir": str(work / "state")},
                          dataset={"min_train_examples": 4, "min_eval_examples": 4})
    with State(s.state_dir()) as st:
        built = api.build_dataset(s, st)
    assert built.path is not None, built.message
    folder = Path(built.path)
    return folder / "train.jsonl", folder / "eval.jsonl"


def old_trainer(rev: str, work: Path) -> Path:
    dest = work / f"trainer-{rev}"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "daemon/trainer"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "daemon" / "trainer" / "train_qlora.py"


def job_config(folder: Path, model: Path, train: Path, evals: Path, backend: str, steps: int, new: bool
               ) -> dict[str, Any]:
    job = make_job(folder, model, template="qwen-2.5", backend=backend,
                   dataset={"train_path": str(train), "eval_path": str(evals),
                            "canary_path": str(ROOT / "daemon" / "train" / "canary.jsonl")},
                   training={"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "max_steps": steps,
                             "logging_steps": 1, "eval_steps": None, "learning_rate": 0.01, "seed": 3407,
                             "warmup_ratio": 0.05})
    cfg = job.config
    cfg["model"]["max_seq_length"] = 1024
    if new:
        cfg["dataset"]["token_cache_dir"] = str(folder / "token-cache")
    else:
        for section, keys in NEW_KEYS.items():
            for k in keys:
                cfg[section].pop(k, None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def run(label: str, python: Path, script: Path, folder: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), str(script), "--config", str(folder / "config.yaml")], cwd=folder,
                          capture_output=True, text=True, timeout=1800, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{label}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((folder / "result.json").read_text())
    steps = [x for x in lines if "step" in x and "event" not in x]
    started = _ts(next(x for x in lines if x.get("event") == "job_started"))
    first_step_at = _ts(steps[0]) if steps else None
    timings = result.get("timings") or {}
    tokens = result.get("tokens_per_s")
    steady = timings.get("steady_tokens_per_s")
    if steady is None and len(steps) > 1:  # the old trainer: from its per-step tokens/s, the first step left out
        rates = [s["tokens_per_s"] for s in steps[1:] if s.get("tokens_per_s")]
        steady = sum(rates) / len(rates) if rates else None
    return {"label": label, "wall_s": wall, "tokens_per_s": tokens, "steady_tokens_per_s": steady,
            "to_first_step_s": (first_step_at - started) if first_step_at else None,
            "imports_s": timings.get("imports"), "timings": timings, "steps": len(steps),
            "train_runtime_s": result.get("train_runtime_seconds"), "eval_before": result["eval_loss_before"],
            "eval_after": result["eval_loss_after"], "losses": [s["train_loss"] for s in steps],
            "padding": result.get("padding")}


def _ts(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="2c4723b")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip-unsloth", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    model = tiny_model(work / "model")
    train, evals = dataset(work)
    old = old_trainer(args.before, work)
    new = ROOT / "daemon" / "trainer" / "train_qlora.py"
    backends = [("transformers", Path(sys.executable))]
    if not args.skip_unsloth and UNSLOTH_PYTHON.exists():
        backends.append(("unsloth", UNSLOTH_PYTHON))
    rows = []
    for backend, python in backends:
        for label, script, is_new in ((f"{backend} before ({args.before})", old, False),
                                      (f"{backend} after", new, True)):
            folder = work / label.replace(" ", "-").replace("(", "").replace(")", "")
            job_config(folder, model, train, evals, backend, args.steps, is_new)
            rows.append({"backend": backend, **run(label, python, script, folder)})
            print(f"  done: {label}", file=sys.stderr, flush=True)
    print(f"\ntrainer on the CPU, 1 thread: tiny Qwen2 (151,936-token vocabulary), {args.steps} steps of batch 2 x "
          "accumulation 4, the service's dataset of a generated store")
    print(f"{'run':<34} {'tokens/s':>9} {'steady':>8} {'to 1st step':>12} {'imports':>8} {'job wall':>9} "
          f"{'eval before':>12} {'eval after':>11}")
    for r in rows:
        print(f"{r['label']:<34} {r['tokens_per_s'] or 0:>9.0f} {r['steady_tokens_per_s'] or 0:>8.0f} "
              f"{r['to_first_step_s'] or 0:>11.1f}s {(r['imports_s'] or 0):>7.1f}s {r['wall_s']:>8.1f}s "
              f"{r['eval_before']:>12.4f} {r['eval_after']:>11.4f}")
    for backend, _ in backends:
        before, after = [r for r in rows if r["backend"] == backend]
        ratio = (after["tokens_per_s"] or 0) / (before["tokens_per_s"] or 1)
        print(f"{backend}: {ratio:.1f}x tokens/s; job {before['wall_s']:.0f}s -> {after['wall_s']:.0f}s; time to the "
              f"first step after imports {after['to_first_step_s'] - (after['imports_s'] or 0):.1f}s")
        print("  train loss by step (before | after): " + "  ".join(
            f"{i + 1}:{a:.3f}|{b:.3f}" for i, (a, b) in enumerate(zip(before["losses"], after["losses"], strict=False))
            if i % 3 == 0 or i == len(before["losses"]) - 1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
