"""Does a vote reach the model? (issue 19) The tiny model, real cycles, real CPU training.

    .venv/bin/python bench/bench_learning.py [--records 8000] [--new 40] [--lr 0.01]
                                             [--replay-ratio R] [--warm-lr-scale S] [--new-epochs E] [--skip-baseline]

A store of ``--records`` ChatOS records (short answers) trains v1 through a real cycle (a full retrain from the base:
no champion yet). Then ``--new`` new chats arrive, each with the same distinctive answer and a thumbs-up, and v2
trains through a second cycle (the plan: a warm start from v1 on the new chats plus replay). Printed, for v1 and v2:
the loss on those new chats and on as many unseen chats of the old kind; v2's training time; and the training time of
a full retrain of the same data (v2's dataset, from the base, one epoch).

The baseline is today's code, measured in the same run on the same datasets: each version a fresh LoRA from the base,
``max_steps`` 60 over the whole training split (the job config the service wrote before the plan existed).
Targets: the new chats' loss drops from v1 to v2 by >= 3x the baseline's drop; the old kind's loss of v2 <= 1.01 x
v1's; v2's training time <= 1/3 of the full retrain while the new data is <= 5% of the whole.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_cycle import tiny_model  # noqa: E402

from daemon import proc, settings  # noqa: E402
from daemon.cycle.pipeline import CycleRequest, run_cycle  # noqa: E402
from daemon.demo import storegen  # noqa: E402
from daemon.state import State  # noqa: E402
from daemon.train import jobspec, templates  # noqa: E402

DISTINCTIVE = "Purple giraffes hum seventeen quiet lullabies under the copper moon."
TRAINER = ROOT / "daemon" / "trainer" / "train_qlora.py"
LEGACY_STEPS = 60


def new_chats(store: Path, n: int, when: datetime) -> list[list[dict[str, str]]]:
    """``n`` new ChatOS records whose answer is always :data:`DISTINCTIVE`, each with a thumbs-up event."""
    rng = random.Random(4242)
    logs = store / "logs" / f"conversations_{when:%Y-%m-%d}.jsonl"
    fb = store / "feedback" / f"feedback_{when:%Y-%m-%d}.jsonl"
    out = []
    with logs.open("a", encoding="ascii") as f, fb.open("a", encoding="ascii") as g:
        for i in range(n):
            cid = f"new{rng.getrandbits(40):010x}"
            rec = storegen.full_record(rng, cid, when + timedelta(seconds=i), assistant_words=(10, 30))
            rec["messages"][1]["content"] = DISTINCTIVE
            f.write(storegen.line(rec))
            g.write(json.dumps({"conversation_id": cid, "thumbs_up": True, "feedback": None,
                                "timestamp": (when + timedelta(seconds=i, minutes=1)).isoformat()}) + "\n")
            out.append([{"role": m["role"], "content": m["content"]} for m in rec["messages"]])
    return out


def old_kind(n: int) -> list[list[dict[str, str]]]:
    """``n`` chats like the store's, never in it."""
    rng = random.Random(99991)
    when = datetime(2026, 10, 15, 12, 0, 0)
    return [[{"role": m["role"], "content": m["content"]}
             for m in storegen.full_record(rng, f"u{i}", when, assistant_words=(10, 30))["messages"]]
            for i in range(n)]


def evaluate(model_dir: Path, adapters: dict[str, Path | None], sets: dict[str, list[Any]]
             ) -> dict[str, dict[str, float]]:
    """Mean loss per assistant token of each adapter (None: the base) on each set of chats."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = templates.get("qwen-2.5").jinja
    encoded: dict[str, list[tuple[list[int], int]]] = {}
    for name, chats in sets.items():
        encoded[name] = []
        for msgs in chats:
            prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(msgs, tokenize=False)
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            f_ids = tok(full, add_special_tokens=False)["input_ids"]
            encoded[name].append((f_ids, len(p_ids)))
    out: dict[str, dict[str, float]] = {}
    for label, adapter in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter))
        model.eval()
        out[label] = {}
        for name, items in encoded.items():
            total, count = 0.0, 0
            with torch.no_grad():
                for ids, n_prompt in items:
                    x = torch.tensor([ids])
                    labels = x.clone()
                    labels[0, :n_prompt] = -100
                    loss = model(input_ids=x, labels=labels).loss
                    n = int((labels[0, 1:] != -100).sum())
                    total += float(loss) * n
                    count += n
            out[label][name] = total / max(1, count)
    return out


def legacy_job(work: Path, name: str, model: Path, overrides: dict[str, Any], dataset: Path, steps: int
               ) -> dict[str, Any]:
    """Today's job config (before the plan): the whole split, ``steps`` steps, a fresh LoRA from the base."""
    job_dir = work / "legacy" / name
    cfg = jobspec.render_job_config(
        overrides, job_id=name, job_dir=job_dir, base_model=str(model), chat_template="qwen-2.5",
        backend="transformers", train_path=dataset / "train.jsonl", eval_path=dataset / "eval.jsonl",
        max_steps=steps, champion_adapter=None,
    )
    for key in ("init",):
        cfg.pop(key, None)
    cfg["dataset"].pop("new_path", None)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "config.json").write_text(json.dumps(cfg))
    import yaml

    (job_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    res = proc.run_command([sys.executable, str(TRAINER), "--config", str(job_dir / "config.yaml")], timeout=3600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode != 0:
        raise SystemExit(f"legacy job {name} failed: {res.stderr[-2000:]}")
    result: dict[str, Any] = json.loads((job_dir / "result.json").read_text())
    result["wall_s"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=8000)
    ap.add_argument("--new", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--replay-ratio", type=float, default=None, help="default: the service's")
    ap.add_argument("--warm-lr-scale", type=float, default=None, help="default: the service's")
    ap.add_argument("--new-epochs", type=int, default=None, help="default: the service's")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work)
    store = work / "store"
    storegen.generate_store(store, args.records, days=30, seed=7, assistant_words=(10, 30), feedback_fraction=0.3)
    overrides_d = {"training": {"learning_rate": args.lr, "eval_steps": None}}
    overrides = work / "overrides.yaml"
    overrides.write_text(json.dumps(overrides_d))
    training: dict[str, Any] = {"python": sys.executable, "base_model": str(model), "backend": "transformers",
                                "timeout": "2h", "config_template": str(overrides), "env": {"OMP_NUM_THREADS": "1"}}
    for key, value in (("replay_ratio", args.replay_ratio), ("warm_lr_scale", args.warm_lr_scale),
                       ("new_epochs", args.new_epochs)):
        if value is not None:
            training[key] = value
    s = settings.Settings(
        store={"root": str(store)}, state={"dir": str(work / "state")}, training=training,
        policy={"min_new_examples": 1, "min_total_examples": 1, "cooldown": 0},
        gate={"tolerance": 0.05}, export={"enabled": False},
    )
    t = s.training
    print(f"settings: new_epochs {t.new_epochs}, replay_ratio {t.replay_ratio:g}, warm_lr_scale {t.warm_lr_scale:g}, "
          f"lr {args.lr:g}; store {args.records} records; work {work}", flush=True)
    with State(s.state_dir()) as st:
        r1 = run_cycle(s, st, CycleRequest(None, forced=True, origins=["bench"]))
        assert r1.job_id, r1.as_json()
        j1 = st.jobs.get(r1.job_id)
        print(f"v1: {r1.outcome} {r1.counts.get('plan', {}).get('line')}", flush=True)
        new = new_chats(store, args.new, datetime(2026, 11, 20, 9, 0, 0))
        r2 = run_cycle(s, st, CycleRequest(None, forced=True, origins=["bench"]))
        assert r2.job_id, r2.as_json()
        j2 = st.jobs.get(r2.job_id)
        print(f"v2: {r2.outcome} {r2.counts.get('plan', {}).get('line')}; {r2.counts.get('learned')}", flush=True)
        d1, d2 = (Path(st.datasets.get(v, manifest=False).path)  # type: ignore[union-attr]
                  for v in (j1.dataset_version, j2.dataset_version))  # type: ignore[union-attr]
        split2 = st.datasets.get(j2.dataset_version, manifest=False).train_count  # type: ignore[union-attr]
    res1, res2 = j1.result or {}, j2.result or {}  # type: ignore[union-attr]
    full_steps = math.ceil(split2 / 8)
    full = legacy_job(work, "full-retrain", model, overrides_d, d2, full_steps)
    adapters: dict[str, Path | None] = {"base": None, "v1": Path(res1["adapter_dir"]), "v2": Path(res2["adapter_dir"])}
    if not args.skip_baseline:
        l1 = legacy_job(work, "legacy-v1", model, overrides_d, d1, LEGACY_STEPS)
        l2 = legacy_job(work, "legacy-v2", model, overrides_d, d2, LEGACY_STEPS)
        adapters.update({"today v1": Path(l1["adapter_dir"]), "today v2": Path(l2["adapter_dir"])})
    losses = evaluate(model, adapters, {"new": new, "old": old_kind(args.new)})
    print()
    print(f"| model | loss on the {args.new} new chats | loss on {args.new} unseen chats of the old kind |")
    print("|---|---|---|")
    for label, row in losses.items():
        print(f"| {label} | {row['new']:.3f} | {row['old']:.3f} |")
    drop = losses["v1"]["new"] - losses["v2"]["new"]
    drift = losses["v2"]["old"] / losses["v1"]["old"]
    print()
    print(f"new chats, v1 -> v2: drop {drop:.3f} nats", end="")
    if "today v1" in losses:
        base_drop = losses["today v1"]["new"] - losses["today v2"]["new"]
        ratio = drop / base_drop if base_drop > 0 else float("inf")
        print(f" (today's code: {base_drop:.3f}; {ratio:.1f}x, target >= 3x)", end="")
    print()
    print(f"old kind, v2 / v1: {drift:.4f} (target <= 1.01)"
          + (f"; today's code: {losses['today v2']['old'] / losses['today v1']['old']:.4f}" if "today v1" in losses
             else ""))
    share = args.new / split2
    t2, tf = res2.get("train_runtime_seconds"), full.get("train_runtime_seconds")
    print(f"training time: v2 {t2:.1f} s ({res2.get('steps')} steps) vs a full retrain of the same data {tf:.1f} s "
          f"({full.get('steps')} steps): {t2 / tf:.2f} (target <= 0.33; new data {share:.1%} of {split2} examples)")
    print(f"v1 {res1.get('steps')} steps {res1.get('train_runtime_seconds'):.1f} s; gate v2: {r2.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
