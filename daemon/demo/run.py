"""The embedded default behind ``chatos-retrain demo``: a generated demo ChatOS store with its own config and state,
a tiny local base model (real Qwen2 vocabulary, random weights) when the training stack is installed, then one
cycle or the service on it. The CLI only parses its arguments and prints; this is the Python API it calls."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from daemon import proc
from daemon.demo import storegen
from daemon.publish import converter, export
from daemon.train import runner

Say = Callable[[str], None]

# A tiny random model needs a large learning rate to learn anything in 20 steps.
JOB_OVERRIDES = "training:\n  learning_rate: 0.01\n  eval_steps: null\nlora:\n  r: 8\n"


def prepare(base: Path, records: int, say: Say) -> Path:
    """The demo folder ready to run (store, base model, config; what exists already is kept); its config file."""
    store = base / "ChatOS-Memory"
    cfg = base / "retrain.yaml"
    if not store.exists():
        truth = storegen.generate_store(store, records, days=7, seed=42, feedback_fraction=0.5,
                                        assistant_words=(8, 40))
        say(f"generated a demo ChatOS store: {store} ({len(truth.conversations)} conversations, "
            f"{truth.feedback_events} feedback events)")
    if not cfg.exists():
        model = build_model(base, say)
        (base / "job-overrides.yaml").write_text(JOB_OVERRIDES, encoding="utf-8")
        cfg.write_text(demo_config(model), encoding="utf-8")
    return cfg


def build_model(base: Path, say: Say) -> Path | None:
    """Build the demo's tiny base model with the trainer's interpreter (this one), or None without torch."""
    probe = proc.run_command([sys.executable, "-c", "import torch, transformers, trl, peft, gguf"], timeout=300)
    if probe.returncode != 0:
        say("training stack not installed (pip install torch==2.13.0 -e '.[train]'): the demo stops at datasets")
        return None
    try:
        conv = converter.setup_converter(converter.default_cache_dir(), llama_cpp_dir=None)
    except export.ExportError as exc:
        say(f"no demo model: {exc}")
        return None
    say("building a tiny local base model (real Qwen2 vocabulary, random weights)...")
    out = proc.run_command([sys.executable, str(runner.TRAINER_SCRIPT.parent / "tinymodel.py"), str(base / "models"),
                            "--family", "qwen2", "--llama-cpp-dir", str(conv.root)], timeout=900)
    if out.returncode != 0:
        say(f"no demo model: {(out.stderr.strip().splitlines() or ['tinymodel failed'])[-1]}")
        return None
    return Path(json.loads(out.stdout.strip().splitlines()[-1])["path"])


def demo_config(model: Path | None) -> str:
    """The demo's retrain.yaml (paths relative to it): low thresholds, a 20-step CPU job, an f16 export."""
    text = (
        "# Demo configuration written by `chatos-retrain demo`; paths are relative to this file.\n"
        "store:\n  root: ChatOS-Memory\nstate:\n  dir: state\n"
        "watch:\n  settle_s: 2s\n"
        "policy:\n  min_new_examples: 10\n  min_total_examples: 20\n  cooldown: 0s\n  max_runs_per_day: 50\n"
        "training:\n  backend: transformers\n  max_steps: 20\n  timeout: 30m\n"
        "  env: {OMP_NUM_THREADS: '1'}\n"
    )
    if model is not None:
        text += f"  base_model: {model}\n  config_template: job-overrides.yaml\n"
        text += "gate:\n  tolerance: 0.05\nexport:\n  quantization: f16\n  smoke:\n    require_stop: false\n"
    return text
