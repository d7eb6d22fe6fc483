"""Training and export benchmarks (issues 4, 5 and 12) on the CPU, with the real trainer and the real converter.

    .venv/bin/python bench/bench_cycle.py [--steps 30] [--upload-gib 1.0] [--skip-unsloth] [--objectives-only]
                                          [--skip-objectives]

Prints, per backend: the tiny-model cycle (dataset -> trained adapter -> gate) wall time, the trainer's peak RSS and
tokens/s, with Unsloth vs TRL+PEFT as a ratio; then the export of the promoted adapter (merge + convert, register
against the Ollama stand-in) and a streamed blob upload of a large file to the stand-in with both sides' peak RSS.
Then the objectives (issue 12): SFT vs KTO vs DPO cycles on one store whose thumbs-down chats carry corrections,
TRL+PEFT, one epoch each (at most --steps): seconds per step, tokens/s, peak RSS, and the preference accuracy on the
preference eval split before and after training (SFT trains no preference data, so it has none).
Needs `.ci/train-setup.sh` (training stack, converter files, the Unsloth venv). The trainer's own speed before and
after issue 14 (the same job run by an older commit's trainer and this one's, in one run) is `bench_trainer.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from ollama_standin import StandinProcess, StandinServer  # noqa: E402

from daemon import proc, settings  # noqa: E402
from daemon.cycle.pipeline import CycleRequest, run_cycle  # noqa: E402
from daemon.demo.storegen import generate_store  # noqa: E402
from daemon.publish import converter, ollama_client  # noqa: E402
from daemon.state import State  # noqa: E402


def tiny_model(work: Path) -> Path:
    conv = converter.setup_converter(converter.default_cache_dir(), llama_cpp_dir=None)
    out = proc.run_command([sys.executable, str(ROOT / "daemon" / "trainer" / "tinymodel.py"), str(work),
                              "--family", "qwen2", "--llama-cpp-dir", str(conv.root)], timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return Path(json.loads(out.stdout.strip().splitlines()[-1])["path"])


def add_corrections(store: Path) -> int:
    """A correction (``better``) for every down-voted chat, as ChatOS writes it: the DPO pairs."""
    down = sorted({e["conversation_id"] for f in sorted((store / "feedback").glob("*.jsonl"))
                   for e in map(json.loads, f.read_text().splitlines()) if e.get("thumbs_up") is False})
    with (store / "feedback" / "feedback_corrections.jsonl").open("w") as f:
        for i, cid in enumerate(down):
            f.write(json.dumps({"conversation_id": cid, "thumbs_up": False, "timestamp": "2026-12-01T10:00:00",
                                "better": f"Here is a clear, correct answer ({i}): check the config, then run it."})
                    + "\n")
    return len(down)


def cycle(work: Path, model: Path, python: Path, backend: str, steps: int, ollama_url: str | None,
          objective: str = "sft") -> dict[str, Any]:
    store = work / f"store-{backend}-{objective}"
    generate_store(store, 200, days=2, seed=7, assistant_words=(10, 30), feedback_fraction=0.7)
    if objective != "sft":
        add_corrections(store)
    overrides = work / "overrides.yaml"
    overrides.write_text("training:\n  learning_rate: 0.01\n  eval_steps: null\nlora:\n  r: 8\n")
    cases = work / "regressions.yaml"  # three prompts the tiny model can meet: the gate's cost, not its verdict
    cases.write_text("".join(f"- id: r{i}\n  prompt: {q}\n  max_tokens: 16\n  expect: {{max_words: 500}}\n"
                             for i, q in enumerate(["Say hi.", "What is 2 + 2?", "Name a colour."])))
    s = settings.Settings(
        store={"root": str(store)}, state={"dir": str(work / f"state-{backend}-{objective}")},
        training={"python": str(python), "base_model": str(model), "backend": backend, "max_steps": steps,
                  "timeout": "30m", "config_template": str(overrides), "env": {"OMP_NUM_THREADS": "1"},
                  "objective": objective},
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0},
        dataset={"min_train_examples": 4, "min_eval_examples": 4},
        gate={"tolerance": 10.0, "min_new_gain": 0.0, "required": ["loss", "regressions"],
              "regressions_file": str(cases)},
        export={"enabled": ollama_url is not None, "quantization": "q8_0", "smoke": {"require_stop": False}},
        ollama={"host": ollama_url or "http://127.0.0.1:9", "model_name": "bench"},
    )
    with State(s.state_dir()) as st:
        t0 = time.perf_counter()
        r = run_cycle(s, st, CycleRequest(None))
        wall = time.perf_counter() - t0
        job = st.jobs.get(r.job_id) if r.job_id else None
    res = (job.result if job else None) or {}
    state_dir = work / f"state-{backend}-{objective}"
    metrics = state_dir / "jobs" / str(r.job_id) / "metrics.jsonl"
    evals = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []
    exported = state_dir / "exports" / str(r.job_id) / "export_result.json"
    ex = json.loads(exported.read_text()) if exported.is_file() else {}
    engine = ex.get("engine") or {}
    canary = [e for e in evals if e.get("event") == "evaluated" and "canary" in e.get("phase", "")]
    answers = engine.get("answers") or []
    asked = [a for a in answers if a.get("id") != "smoke"]
    return {"canary_s": sum(e.get("seconds") or 0 for e in canary), "canary_evals": len(canary),
            "engine_s": (ex.get("timings") or {}).get("engine_s"), "engine_load_s": engine.get("load_s"),
            "regressions_s": sum(a.get("elapsed_s") or 0 for a in asked), "regression_cases": len(asked),
            "smoke_s": sum(a.get("elapsed_s") or 0 for a in answers if a.get("id") == "smoke"),
            "backend": backend, "outcome": r.outcome, "reason": r.reason, "wall_s": wall, "timings": r.timings,
            "train_s": r.timings.get("train"), "peak_rss_mb": (res.get("peak_rss_bytes") or 0) / 2**20,
            "tokens_per_s": res.get("tokens_per_s"), "steps": res.get("steps"),
            "eval_before": res.get("eval_loss_before"), "eval_after": res.get("eval_loss_after"),
            "objective": res.get("objective"), "plan": (r.counts.get("plan") or {}).get("line"),
            "train_runtime_s": res.get("train_runtime_seconds"), "pref_examples": res.get("pref_train_examples"),
            "pref_eval": res.get("pref_eval_examples"), "acc_before": res.get("pref_accuracy_before"),
            "acc_after": res.get("pref_accuracy_after"),
            "r_good_before": res.get("pref_reward_desirable_before"),
            "r_good_after": res.get("pref_reward_desirable_after"),
            "r_bad_before": res.get("pref_reward_undesirable_before"),
            "r_bad_after": res.get("pref_reward_undesirable_after")}


def upload(work: Path, gib: float) -> dict[str, Any]:
    big = work / "big.bin"
    with big.open("wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(int(gib * 1024)):
            f.write(block)
    proc = StandinProcess(work / "standin-upload").start()
    try:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with ollama_client.OllamaClient(proc.url, timeout_s=60) as client:
            t0 = time.perf_counter()
            digest = ollama_client.file_sha256(big)
            t_hash = time.perf_counter() - t0
            t1 = time.perf_counter()
            client.push_blob(big, digest)
            t_up = time.perf_counter() - t1
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        server = proc.status()
    finally:
        proc.stop()
    size_mb = big.stat().st_size / 2**20
    return {"size_mb": size_mb, "hash_s": t_hash, "upload_s": t_up, "mb_per_s": size_mb / t_up,
            "client_peak_rss_mb": after, "client_rss_growth_mb": after - before, "server": server}


def objectives(work: Path, model: Path, steps: int) -> list[dict[str, Any]]:
    """SFT vs KTO vs DPO on the same store (thumbs-down chats with corrections), TRL+PEFT, ``steps`` steps each."""
    return [cycle(work, model, Path(sys.executable), "transformers", steps, None, objective)
            for objective in ("sft", "kto", "dpo")]


def print_objectives(rows: list[dict[str, Any]], steps: int) -> None:
    print(f"\nobjectives (issue 12): TRL+PEFT, one epoch (at most {steps} steps), batch 8, CPU, 1 thread; the same "
          "store, every thumbs-down with a correction")
    print(f"{'objective':<10} {'steps':>5} {'s/step':>7} {'tokens/s':>9} {'peak RSS MB':>12} {'pref eval':>10} "
          f"{'acc before':>11} {'acc after':>10} {'r(desirable)':>16} {'r(undesirable)':>16}  trained")
    for r in rows:
        step_s = (r["train_runtime_s"] or 0) / r["steps"] if r["steps"] else 0.0
        acc = ("n/a", "n/a") if r["acc_before"] is None else (f"{r['acc_before']:.3f}", f"{r['acc_after']:.3f}")
        good = "n/a" if r["r_good_before"] is None else f"{r['r_good_before']:+.2f} -> {r['r_good_after']:+.2f}"
        bad = "n/a" if r["r_bad_before"] is None else f"{r['r_bad_before']:+.2f} -> {r['r_bad_after']:+.2f}"
        print(f"{r['objective'] or '?':<10} {r['steps'] or 0:>5} {step_s:>7.2f} {r['tokens_per_s'] or 0:>9.0f} "
              f"{r['peak_rss_mb']:>12.0f} "
              f"{r['pref_eval'] or 0:>10} {acc[0]:>11} {acc[1]:>10} {good:>16} {bad:>16}  {r['plan']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--upload-gib", type=float, default=1.0)
    ap.add_argument("--skip-unsloth", action="store_true")
    ap.add_argument("--objectives-only", action="store_true", help="only the SFT vs KTO vs DPO comparison")
    ap.add_argument("--skip-objectives", action="store_true", help="without the SFT vs KTO vs DPO comparison")
    args = ap.parse_args()
    unsloth_py = ROOT / ".venv-unsloth" / "bin" / "python"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = tiny_model(work)
        if args.objectives_only:
            print_objectives(objectives(work, model, args.steps), args.steps)
            return
        # canned chat replies, as in the e2e cycles: the tiny random model's greedy answer through the engine is
        # often empty, which the registration's smoke check rightly refuses (the export's engine check is timed)
        standin = StandinServer(work / "standin", use_llama=False).start()
        try:
            rows = [cycle(work, model, Path(sys.executable), "transformers", args.steps, standin.url)]
            if not args.skip_unsloth and unsloth_py.exists():
                rows.append(cycle(work, model, unsloth_py, "unsloth", args.steps, None))
        finally:
            standin.stop()
        up = upload(work, args.upload_gib) if args.upload_gib > 0 else None
        by_objective = [] if args.skip_objectives else objectives(work, model, args.steps)
    print(f"tiny model (Qwen2 shape hidden 64, 2 layers, real vocab), {args.steps} LoRA steps, CPU, 1 thread")
    print(f"{'backend':<13} {'cycle s':>8} {'train s':>8} {'peak RSS MB':>12} {'tokens/s':>9} {'eval before':>12} "
          f"{'eval after':>11}  outcome")
    for r in rows:
        print(f"{r['backend']:<13} {r['wall_s']:>8.1f} {r['train_s'] or 0:>8.1f} {r['peak_rss_mb']:>12.0f} "
              f"{r['tokens_per_s'] or 0:>9.0f} {r['eval_before'] or 0:>12.4f} {r['eval_after'] or 0:>11.4f}  "
              f"{r['outcome']}")
    if len(rows) == 2 and rows[0]["tokens_per_s"] and rows[1]["tokens_per_s"]:
        print(f"unsloth / transformers tokens/s ratio: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f} "
              "(CPU fallback; the GPU comparison needs a lent device)")
    t, g = rows[0]["timings"], rows[0]
    print(f"export (transformers adapter, q8_0): merge+convert+check {t.get('export', 0):.1f} s, "
          f"register (upload, create, show, smoke, copy) {t.get('register', 0):.2f} s")
    print(f"the gate's added time (transformers cycle): canary {g['canary_s']:.1f} s ({g['canary_evals']} evaluations "
          f"of the 40-item set, in the trainer); llama.cpp engine check {g['engine_s'] or 0:.1f} s in the export "
          f"(load {g['engine_load_s'] or 0:.2f} s, smoke answer {g['smoke_s']:.2f} s, {g['regression_cases']} "
          f"regression prompts {g['regressions_s']:.2f} s); outcome {g['outcome']}")
    if up:
        print(f"blob upload {up['size_mb']:.0f} MiB to the stand-in: {up['upload_s']:.1f} s "
              f"({up['mb_per_s']:.0f} MiB/s), "
              f"sha256 {up['hash_s']:.1f} s; client peak RSS {up['client_peak_rss_mb']:.0f} MB "
              f"(+{up['client_rss_growth_mb']:.1f} MB during the upload); server {json.dumps(up['server'])}")
    if by_objective:
        print_objectives(by_objective, args.steps)


if __name__ == "__main__":
    main()
