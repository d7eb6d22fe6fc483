"""The training path on a real GPU (issues 4, 14 and 18): the real runner's argv and the real trainer, TRL + PEFT bf16
LoRA, TRL QLoRA and Unsloth QLoRA on the same data, on a tiny model and on the Qwen2.5-0.5B and -1.5B shapes built from
a config; then the Unsloth 4-bit adapter merged, converted to GGUF and loaded in llama.cpp's engine: for a GPU
machine that reaches no network, within a time budget (default 8 minutes in all).

    .venv/bin/python bench/bench_gpu.py prepare DIR       # here: tokenizer files, a dataset, the converter, the plan
    python3 bench/bench_gpu.py run DIR [--out FILE] [--budget-s 480] [--unsloth-site DIR2] [--cpu]

``prepare`` writes ``DIR/tok-qwen2/`` (the real Qwen2 vocabulary and the Qwen2.5 chat template, as
``daemon/trainer/tinymodel.py`` makes them, without the weights), ``DIR/data/{train,eval}.jsonl`` (a dataset built
by the service from a generated store), ``DIR/llama.cpp/`` (the converter and its gguf-py, 2 MB, without the
vocabularies) and ``DIR/plan.json``. ``run`` builds each model with random weights from its config (no download),
renders each job's config with ``jobspec.render_job_config`` (every path absolute), runs ``jobspec.trainer_argv``
through ``proc.run_command`` and prints, per job, what the trainer's ``result.json`` says: backend, device, what was
loaded (4-bit, dtype, attention), tokens/s (whole loop and steady), seconds to the first step, peak GPU memory, eval
loss before and after. Unsloth jobs run with ``PYTHONPATH`` = ``--unsloth-site`` (its pins differ from TRL's: see
bench/README.md) and are skipped without it. Each job gets at most what is left of ``--budget-s`` (a job that
would not fit is skipped and listed), and the export of the Unsloth 4-bit 0.5B-shape adapter runs last. It exits 1
when a job fails or a check does not hold (the device is CUDA, 4-bit when asked and bitsandbytes is there, the
adapter is written, eval loss drops on the tiny model, the GGUF loads). ``--cpu`` runs the tiny jobs on a CPU, to
check the script itself where no GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> Qwen2 config overrides. "tiny" is the tests' shape; the others are Qwen2.5-0.5B and -1.5B's shapes.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128},
    "qwen2.5-0.5b-shape": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                           "num_key_value_heads": 2, "intermediate_size": 4864},
    "qwen2.5-1.5b-shape": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                           "num_key_value_heads": 2, "intermediate_size": 8960},
}
# (model, backend, load_in_4bit, steps): the same data and settings for each backend; enough steps for a steady rate.
PLAN: list[tuple[str, str, bool, int]] = [
    ("tiny", "transformers", False, 40), ("tiny", "transformers", True, 40), ("tiny", "unsloth", True, 40),
    ("qwen2.5-0.5b-shape", "transformers", False, 60), ("qwen2.5-0.5b-shape", "transformers", True, 60),
    ("qwen2.5-0.5b-shape", "unsloth", True, 60),
    ("qwen2.5-1.5b-shape", "transformers", False, 40), ("qwen2.5-1.5b-shape", "transformers", True, 40),
    ("qwen2.5-1.5b-shape", "unsloth", True, 40),
]
EXPORT_JOB = "qwen2.5-0.5b-shape-unsloth-4bit"  # merged, converted and loaded in llama.cpp after the jobs
JOB_CAP_S = 150  # no job may take more than this of the budget
RESERVE_S = 75  # kept for the export when EXPORT_JOB is planned



def prepare(out: Path) -> None:
    from daemon import api
    from daemon.demo.storegen import generate_store
    from daemon.publish import converter
    from daemon.settings import Settings
    from daemon.state import State
    from daemon.trainer import tinymodel

    out.mkdir(parents=True, exist_ok=True)
    conv = converter.setup_converter(converter.default_cache_dir(), llama_cpp_dir=None)
    tok_dir = out / "tok-qwen2"
    tinymodel.build("qwen2", tok_dir, conv.root)
    for f in tok_dir.glob("*.safetensors"):
        f.unlink()  # the weights are made there, from the config
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        generate_store(store, 1500, days=3, seed=11, assistant_words=(40, 120), feedback_fraction=0.6)
        s = Settings.model_validate({"store": {"root": str(store)}, "state": {"dir": str(Path(tmp) / "state")}})
        with State(s.state_dir()) as st:
            res = api.build_dataset(s, st)
        (out / "data").mkdir(exist_ok=True)
        for name in ("train.jsonl", "eval.jsonl"):
            shutil.copy(Path(str(res.path)) / name, out / "data" / name)
    conv_dir = out / "llama.cpp"  # the converter and its gguf-py; the vocabularies stay here (75 MB)
    shutil.rmtree(conv_dir, ignore_errors=True)
    shutil.copytree(conv.root, conv_dir, ignore=shutil.ignore_patterns("models"))
    (out / "plan.json").write_text(json.dumps({"shapes": SHAPES, "plan": PLAN, "export_job": EXPORT_JOB}, indent=1))
    print(json.dumps({"prepared": str(out), "train": res.train_count, "eval": res.eval_count}))


def build_model(tok_dir: Path, shape: dict[str, Any], out: Path) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = Qwen2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, max_position_embeddings=4096, tie_word_embeddings=True,
                         **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # type: ignore[no-untyped-call]
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def job_name(name: str, backend: str, four_bit: bool) -> str:
    return f"{name}-{backend}-{'4bit' if four_bit else 'bf16'}"


def run(src: Path, work: Path, only: str | None = None, steps_override: int | None = None, budget_s: float = 480.0,
        unsloth_site: Path | None = None, cpu: bool = False, unsloth_python: Path | None = None
        ) -> tuple[list[dict[str, Any]], list[str]]:
    import yaml

    from daemon import proc
    from daemon.train import jobspec, runner

    plan = json.loads((src / "plan.json").read_text())
    deadline = time.monotonic() + budget_s
    models: dict[str, tuple[Path, int]] = {}
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for name, backend, four_bit, plan_steps in plan["plan"]:
        job_id = job_name(name, backend, four_bit)
        if (only and only not in job_id) or (cpu and name != "tiny"):
            continue
        if backend == "unsloth" and unsloth_site is None and unsloth_python is None:
            skipped.append(f"{job_id}: no --unsloth-site nor --unsloth-python")
            continue
        reserve = RESERVE_S if plan.get("export_job") and job_id != plan["export_job"] else 0
        left = deadline - time.monotonic() - reserve
        if left < 40:
            skipped.append(f"{job_id}: {max(left, 0):.0f}s of the budget left")
            continue
        steps = steps_override or plan_steps
        if name not in models:
            t0 = time.perf_counter()
            models[name] = (work / "models" / name, build_model(src / "tok-qwen2", plan["shapes"][name],
                                                                work / "models" / name))
            print(f"built {name}: {models[name][1] / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        job_dir = work / "jobs" / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        cfg = jobspec.render_job_config(
            {"model": {"load_in_4bit": four_bit, "max_seq_length": 1024},
             # the tiny model's random weights need a large step to move in a few steps (as bench_cycle.py)
             "training": {"eval_steps": None, **({"learning_rate": 0.01} if name == "tiny" else {})}},
            job_id=job_id, job_dir=job_dir, base_model=str(models[name][0]), chat_template="qwen-2.5",
            backend=backend, train_path=src / "data" / "train.jsonl", eval_path=src / "data" / "eval.jsonl",
            max_steps=steps, champion_adapter=None, token_cache_dir=work / "token-cache",
        )
        cfg_path = job_dir / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        python = unsloth_python if backend == "unsloth" and unsloth_python else Path(sys.executable)
        argv = jobspec.trainer_argv(python, runner.TRAINER_SCRIPT, cfg_path)
        env = _env(backend, unsloth_site, cpu)
        t0 = time.perf_counter()
        try:
            done = proc.run_command(argv, timeout=min(left, JOB_CAP_S), cwd=job_dir, env=env)
        except proc.TimeoutExpired:
            done = subprocess.CompletedProcess(argv, 124, "", f"timed out after {min(left, JOB_CAP_S):.0f}s")
        wall = time.perf_counter() - t0
        res_path = job_dir / "result.json"
        res = json.loads(res_path.read_text()) if res_path.exists() else {}
        timings = res.get("timings") or {}
        row = {
            "job": job_id, "backend": backend, "parameters_m": round(models[name][1] / 1e6, 1),
            "exit": done.returncode, "status": res.get("status"), "device": res.get("device"),
            "dtype": res.get("dtype"), "load_in_4bit": res.get("load_in_4bit"), "precision": res.get("precision"),
            "attn": res.get("attn_implementation"), "padding": res.get("padding"), "steps": res.get("steps"),
            "wall_s": round(wall, 1), "train_s": res.get("train_runtime_seconds"),
            "tokens_per_s": res.get("tokens_per_s"), "steady_tokens_per_s": timings.get("steady_tokens_per_s"),
            "timings": timings, "peak_gpu_gib": round((res.get("peak_gpu_memory_bytes") or 0) / 2**30, 2),
            "eval_before": res.get("eval_loss_before"), "eval_after": res.get("eval_loss_after"),
            "adapter_dir": res.get("adapter_dir"),
            "adapter": bool(res.get("adapter_dir")) and (Path(res.get("adapter_dir", "")) / "adapter_config.json"
                                                         ).exists(),
            "versions": res.get("versions"), "base_model": str(models[name][0]), "python": str(python),
        }
        if done.returncode != 0:
            row["stderr_tail"] = done.stderr[-1500:]
            log = job_dir / "job.log"
            row["log_tail"] = log.read_text()[-1500:] if log.exists() else None
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("versions", "timings")}), flush=True)
    return rows, skipped


def _env(backend: str, unsloth_site: Path | None, cpu: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if backend == "unsloth" and unsloth_site is not None:
        env["PYTHONPATH"] = f"{unsloth_site}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") \
            else str(unsloth_site)
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def export_gguf(src: Path, work: Path, row: dict[str, Any], unsloth_site: Path | None, cpu: bool, left_s: float
                ) -> dict[str, Any]:
    """The trained adapter merged (the service's merge), converted to a q8_0 GGUF and loaded in llama.cpp's engine
    (``merge_export.py``'s own engine check, when xllamacpp is importable there)."""
    import yaml

    from daemon import proc
    from daemon.publish import export
    from daemon.publish.converter import ConverterPaths
    from daemon.train import templates

    out = work / "export" / row["job"]
    cfg = export.merge_config(
        job_id=row["job"], backend=row["backend"], base_model=row["base_model"], adapter_dir=Path(row["adapter_dir"]),
        out_dir=out, template=templates.get("qwen-2.5"), converter=ConverterPaths(src / "llama.cpp", "checkout"),
        python=Path(row["python"]), quantization="q8_0", gguf_name=f"{row['job']}.q8_0.gguf", model_name=row["job"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "export.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    t0 = time.perf_counter()
    done = proc.run_command(export.merge_export_argv(Path(row["python"]), path), timeout=max(left_s, 30),
                            cwd=out, env=_env(row["backend"], unsloth_site, cpu))
    res = export.read_result(Path(cfg["result_path"])) or {}
    engine = res.get("engine") or {}
    return {"job": row["job"], "exit": done.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "gguf": cfg["gguf_path"], "gguf_bytes": Path(cfg["gguf_path"]).stat().st_size
            if Path(cfg["gguf_path"]).exists() else None, "timings": res.get("timings"),
            "engine_loaded": engine.get("loaded"), "engine": {k: engine.get(k) for k in ("loaded", "load_s", "error")},
            "stderr_tail": done.stderr[-1500:] if done.returncode else None}


def problems(rows: list[dict[str, Any]], bnb: bool, exported: dict[str, Any] | None, cpu: bool) -> list[str]:
    out = []
    for r in rows:
        if r["exit"] != 0 or r["status"] != "completed":
            out.append(f"{r['job']}: exit {r['exit']}, status {r['status']}")
            continue
        if not cpu and not str(r["device"]).startswith("cuda"):
            out.append(f"{r['job']}: trained on {r['device']}, not the GPU")
        if not cpu and r["job"].endswith("4bit") and bnb and not r["load_in_4bit"]:
            out.append(f"{r['job']}: 4-bit asked, bitsandbytes there, but not loaded in 4-bit")
        if not r["adapter"]:
            out.append(f"{r['job']}: no adapter written")
        if r["job"].startswith("tiny") and not (r["eval_after"] is not None and r["eval_before"] is not None
                                                and r["eval_after"] < r["eval_before"]):
            out.append(f"{r['job']}: eval loss did not drop ({r['eval_before']} -> {r['eval_after']})")
    if exported is not None and (exported["exit"] != 0 or not exported["engine_loaded"]):
        out.append(f"export of {exported['job']}: exit {exported['exit']}, engine {exported['engine']}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("verb", choices=["prepare", "run"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/chatos-gpu-bench"))
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--only", default=None, help="run only the jobs whose name holds this (e.g. tiny)")
    ap.add_argument("--steps", type=int, default=None, help="steps per job instead of the plan's")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    ap.add_argument("--unsloth-site", type=Path, default=None,
                    help="folder of the Unsloth stack (pip install --target), put on PYTHONPATH for its jobs")
    ap.add_argument("--unsloth-python", type=Path, default=None,
                    help="or: an interpreter with the Unsloth stack for its jobs (its venv)")
    ap.add_argument("--cpu", action="store_true", help="the tiny jobs on the CPU: checks the script, not the card")
    args = ap.parse_args(argv)
    if args.verb == "prepare":
        prepare(args.dir.resolve())
        return 0
    import importlib.util

    import torch

    started = time.monotonic()
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", flush=True)
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    shutil.rmtree(args.work, ignore_errors=True)
    site = args.unsloth_site.resolve() if args.unsloth_site else None
    rows, skipped = run(args.dir.resolve(), args.work, args.only, args.steps, args.budget_s, site, args.cpu,
                        args.unsloth_python)
    plan = json.loads((args.dir / "plan.json").read_text())
    target = next((r for r in rows if r["job"] == plan.get("export_job") or (args.cpu and r["backend"] == "unsloth"
                                                                             and r["adapter"])), None)
    exported = None
    if target is not None and target["adapter"]:
        exported = export_gguf(args.dir.resolve(), args.work, target, site, args.cpu,
                               args.budget_s - (time.monotonic() - started))
        print(json.dumps(exported), flush=True)
    found = problems(rows, bnb, exported, args.cpu)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "skipped": skipped, "export": exported, "problems": found,
                                        "bitsandbytes": bnb, "wall_s": time.monotonic() - started}, indent=1))
    print(f"\n{'job':38} {'params':>8} {'loaded as':>12} {'attn':>6} {'train s':>8} {'tok/s':>8} {'steady':>8} "
          f"{'1st step':>8} {'GPU GiB':>8} {'eval before -> after':>22}")
    for r in rows:
        ev = f"{r['eval_before']:.3f} -> {r['eval_after']:.3f}" if r["eval_after"] is not None else "-"
        first = (r["timings"] or {}).get("first_step")
        print(f"{r['job']:38} {r['parameters_m']:>7}M {r['dtype']!s:>12} {r['attn']!s:>6} {r['train_s'] or 0:>8.1f} "
              f"{r['tokens_per_s'] or 0:>8.0f} {r['steady_tokens_per_s'] or 0:>8.0f} {first or 0:>7.1f}s "
              f"{r['peak_gpu_gib']:>8.2f} {ev:>22}")
    for a in ("transformers-bf16", "transformers-4bit"):
        for name in ("qwen2.5-0.5b-shape", "qwen2.5-1.5b-shape"):
            base = next((r for r in rows if r["job"] == f"{name}-{a}"), None)
            uns = next((r for r in rows if r["job"] == f"{name}-unsloth-4bit"), None)
            if base and uns and base["tokens_per_s"] and uns["tokens_per_s"]:
                print(f"{name}: unsloth 4-bit / TRL {a}: {uns['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s")
    if skipped:
        print("skipped:", "; ".join(skipped))
    print(f"wall: {time.monotonic() - started:.0f}s of a {args.budget_s:.0f}s budget")
    print("checks:", "all hold" if not found else "; ".join(found))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
