"""The per-job overhead ``training.executor: ray`` adds (issue 15), next to the local runner's.

    .venv/bin/python bench/bench_ray.py [--repeat 3] [--steps 5] [--step-s 0.2]

Starts a real local Ray head (``ray start --head``, stopped at the end), then runs the same cycle with each executor
on a small generated store, with the fake trainer interpreter (tests/fakes/fake_trainer.py, ``slow_ok``: one
metrics line per ``--step-s``) so that only the executor's own time differs. From the cycle's progress, on the
service's clock: **start -> first step** (the job submitted or spawned until its first metrics line reached the
service: Ray's scheduling and runtime-env setup, storage staging, the metrics mirror's poll) and **last step ->
adapter back** (the last metrics line seen until the outcome is recorded and the gate starts: the job's end seen,
the adapter and result copied back from storage, Ray's log fetched). Median of ``--repeat`` runs each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from helpers import fb, feedback_file, logs_file, rec, write_lines  # noqa: E402
from ray_head import new_head, remove  # noqa: E402

from daemon import settings  # noqa: E402
from daemon.cycle.pipeline import CycleRequest, run_cycle  # noqa: E402
from daemon.state import State  # noqa: E402

FAKE = ROOT / "tests" / "fakes" / "fake_trainer.py"


def one_run(work: Path, executor: str, address: str, steps: int, step_s: float) -> tuple[float, float]:
    store = work / "store"
    for sub in ("logs", "training_data", "feedback"):
        (store / sub).mkdir(parents=True)
    write_lines(logs_file(store), [rec(f"a{i:015d}", answer=f"answer {i}") for i in range(12)])
    write_lines(feedback_file(store), [fb(f"a{i:015d}", True) for i in range(12)])
    python = work / "fake-python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    python.chmod(0o755)
    model = work / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    s = settings.Settings(
        store={"root": str(store)}, state={"dir": str(work / "state")},
        training={"python": str(python), "base_model": str(model), "backend": "transformers", "max_steps": steps,
                  "executor": executor, "env": {"FAKE_TRAINER_MODE": "slow_ok", "FAKE_STEP_S": str(step_s)}},
        ray={"address": address, "storage": str(work / "ray-storage"), "entrypoint_num_gpus": 0,
             "poll_interval_s": 0.2},
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0},
        dataset={"min_train_examples": 1, "min_eval_examples": 1}, export={"enabled": False},
    )
    marks: dict[str, float] = {}

    def progress(phase: str, detail: str) -> None:
        now = time.monotonic()
        if phase == "training" and " step " not in detail:
            marks.setdefault("start", now)
        elif phase == "training":
            marks.setdefault("first", now)
            marks["last"] = now
        elif phase == "gating":
            marks.setdefault("back", now)

    with State(s.state_dir()) as st:
        r = run_cycle(s, st, CycleRequest(None), progress=progress)
    if r.outcome != "promoted":
        raise SystemExit(f"{executor}: the cycle ended {r.outcome}: {r.reason}")
    return marks["first"] - marks["start"], marks["back"] - marks["last"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--step-s", type=float, default=0.2)
    args = ap.parse_args()
    t0 = time.monotonic()
    head = new_head().start()
    print(f"ray head up in {time.monotonic() - t0:.1f}s at {head.address}")
    figures: dict[str, list[tuple[float, float]]] = {"local": [], "ray": []}
    try:
        for _ in range(args.repeat):
            for executor in figures:
                with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
                    figures[executor].append(one_run(Path(tmp), executor, head.address, args.steps, args.step_s))
    finally:
        head.stop()
        remove(head)
    print(f"{'executor':<8} {'start -> first step':>20} {'last step -> adapter back':>26}   (median of {args.repeat})")
    for executor, runs in figures.items():
        first = statistics.median(a for a, _ in runs)
        back = statistics.median(b for _, b in runs)
        print(f"{executor:<8} {first:>19.2f}s {back:>25.2f}s")


if __name__ == "__main__":
    main()
