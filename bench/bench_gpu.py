"""The training path on a real GPU (issue 4): the real runner's argv and the real trainer, QLoRA (4-bit) and bf16 LoRA,
on a tiny model and on realistic-size models built from a config, for a GPU machine that reaches no network.

    .venv/bin/python bench/bench_gpu.py prepare DIR       # here: tokenizer files, a dataset, the plan
    python3 bench/bench_gpu.py run DIR [--out FILE]       # on the GPU machine, from the repository root

``prepare`` writes ``DIR/tok-qwen2/`` (the real Qwen2 vocabulary and the Qwen2.5 chat template, as
``daemon/trainer/tinymodel.py`` makes them, without the weights), ``DIR/data/{train,eval}.jsonl`` (a dataset built
by the service from a generated store) and ``DIR/plan.json``. ``run`` builds each model with random weights from
its config (no download), renders each job's config with ``jobspec.render_job_config`` (every path absolute), runs
``jobspec.trainer_argv`` through ``proc.run_command`` and prints, per job, what the trainer's ``result.json``
says: device, dtype, 4-bit or not, tokens/s, peak GPU memory, eval loss before and after. It exits 1 when a job
fails or a check does not hold (the device is CUDA, 4-bit when asked and bitsandbytes is there, the adapter is
written, eval loss drops on the tiny model). The trainer's Python packages must be importable there (trl, peft,
datasets, bitsandbytes for 4-bit; see bench/README.md for carrying them as wheels).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
PLAN = [  # (model, load_in_4bit, steps)
    ("tiny", True, 30), ("tiny", False, 30),
    ("qwen2.5-0.5b-shape", True, 30), ("qwen2.5-0.5b-shape", False, 30),
    ("qwen2.5-1.5b-shape", True, 30), ("qwen2.5-1.5b-shape", False, 30),
]


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
    (out / "plan.json").write_text(json.dumps({"shapes": SHAPES, "plan": PLAN}, indent=1))
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


def run(src: Path, work: Path, only: str | None = None, steps_override: int | None = None) -> list[dict[str, Any]]:
    import yaml

    from daemon import proc
    from daemon.train import jobspec, runner

    plan = json.loads((src / "plan.json").read_text())
    models: dict[str, tuple[Path, int]] = {}
    rows: list[dict[str, Any]] = []
    for name, four_bit, plan_steps in plan["plan"]:
        if only and only not in f"{name}-{'4bit' if four_bit else 'bf16'}":
            continue
        steps = steps_override or plan_steps
        if name not in models:
            t0 = time.perf_counter()
            models[name] = (work / "models" / name, build_model(src / "tok-qwen2", plan["shapes"][name],
                                                                work / "models" / name))
            print(f"built {name}: {models[name][1] / 1e6:.1f}M parameters in {time.perf_counter() - t0:.1f} s",
                  flush=True)
        job_id = f"{name}-{'4bit' if four_bit else 'bf16'}"
        job_dir = work / "jobs" / job_id
        job_dir.mkdir(parents=True, exist_ok=True)
        cfg = jobspec.render_job_config(
            {"model": {"load_in_4bit": four_bit, "max_seq_length": 1024},
             # the tiny model's random weights need a large step to move in 30 steps (as bench_cycle.py)
             "training": {"eval_steps": None, **({"learning_rate": 0.01} if name == "tiny" else {})}},
            job_id=job_id, job_dir=job_dir, base_model=str(models[name][0]), chat_template="qwen-2.5",
            backend="transformers", train_path=src / "data" / "train.jsonl", eval_path=src / "data" / "eval.jsonl",
            max_steps=steps, champion_adapter=None,
        )
        cfg_path = job_dir / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = jobspec.trainer_argv(Path(sys.executable), runner.TRAINER_SCRIPT, cfg_path)
        t0 = time.perf_counter()
        done = proc.run_command(argv, timeout=900, cwd=job_dir)
        wall = time.perf_counter() - t0
        res_path = job_dir / "result.json"
        res = json.loads(res_path.read_text()) if res_path.exists() else {}
        row = {
            "job": job_id, "parameters_m": round(models[name][1] / 1e6, 1), "exit": done.returncode,
            "status": res.get("status"), "device": res.get("device"), "dtype": res.get("dtype"),
            "load_in_4bit": res.get("load_in_4bit"), "steps": res.get("steps"), "wall_s": round(wall, 1),
            "train_s": res.get("train_runtime_seconds"), "tokens_per_s": res.get("tokens_per_s"),
            "peak_gpu_gib": round((res.get("peak_gpu_memory_bytes") or 0) / 2**30, 2),
            "eval_before": res.get("eval_loss_before"), "eval_after": res.get("eval_loss_after"),
            "adapter": bool(res.get("adapter_dir")) and (Path(res.get("adapter_dir", "")) / "adapter_config.json"
                                                         ).exists(),
            "versions": res.get("versions"),
        }
        if done.returncode != 0:
            row["stderr_tail"] = done.stderr[-1500:]
            log = job_dir / "job.log"
            row["log_tail"] = log.read_text()[-1500:] if log.exists() else None
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "versions"}), flush=True)
    return rows


def problems(rows: list[dict[str, Any]], bnb: bool) -> list[str]:
    out = []
    for r in rows:
        if r["exit"] != 0 or r["status"] != "completed":
            out.append(f"{r['job']}: exit {r['exit']}, status {r['status']}")
            continue
        if not str(r["device"]).startswith("cuda"):
            out.append(f"{r['job']}: trained on {r['device']}, not the GPU")
        if r["job"].endswith("4bit") and bnb and not r["load_in_4bit"]:
            out.append(f"{r['job']}: 4-bit asked, bitsandbytes there, but not loaded in 4-bit")
        if not r["adapter"]:
            out.append(f"{r['job']}: no adapter written")
        if r["job"].startswith("tiny") and not (r["eval_after"] is not None and r["eval_before"] is not None
                                                and r["eval_after"] < r["eval_before"]):
            out.append(f"{r['job']}: eval loss did not drop ({r['eval_before']} -> {r['eval_after']})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("verb", choices=["prepare", "run"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/chatos-gpu-bench"))
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--only", default=None, help="run only the jobs whose name holds this (e.g. tiny)")
    ap.add_argument("--steps", type=int, default=None, help="steps per job instead of the plan's")
    args = ap.parse_args(argv)
    if args.verb == "prepare":
        prepare(args.dir.resolve())
        return 0
    import importlib.util

    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}", flush=True)
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    shutil.rmtree(args.work, ignore_errors=True)
    rows = run(args.dir.resolve(), args.work, args.only, args.steps)
    found = problems(rows, bnb)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "problems": found, "bitsandbytes": bnb}, indent=1))
    print(f"\n{'job':28} {'params':>8} {'device':>7} {'4-bit':>5} {'train s':>8} {'tok/s':>9} {'GPU GiB':>8} "
          f"{'eval before -> after':>22}")
    for r in rows:
        ev = f"{r['eval_before']:.3f} -> {r['eval_after']:.3f}" if r["eval_after"] is not None else "-"
        print(f"{r['job']:28} {r['parameters_m']:>7}M {r['device']!s:>7} {r['load_in_4bit']!s:>5} "
              f"{r['train_s'] or 0:>8.1f} {r['tokens_per_s'] or 0:>9.0f} {r['peak_gpu_gib']:>8.2f} {ev:>22}")
    print("checks:", "all hold" if not found else "; ".join(found))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
