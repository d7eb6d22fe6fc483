"""Run under a trainer interpreter (the service venv or the Unsloth venv): set each (model, template) up exactly as the
trainer does before training (``qlora_backends.load_model``), save the adapter as the trainer does
(``qlora_run.save_adapter``), and print, as one JSON line per case, the ids the tokenizer gives the template's
special tokens and a rendered chat: after setup, and read back from the saved adapter.

    python token_probe.py BACKEND OUT_DIR CASES_JSON

CASES_JSON: a list of {"model": abs path, "template": trainer_block(...)}. The test compares with the base
tokenizer, loaded in the test's own process.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

TRAINER = Path(__file__).resolve().parents[2] / "daemon" / "trainer"
sys.path.insert(0, str(TRAINER))

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: b a"},
        {"role": "assistant", "content": "Sorted: a b."}, {"role": "user", "content": "Again: d c"},
        {"role": "assistant", "content": "Sorted: c d."}]


def ids_of(tok: Any, template: dict[str, Any]) -> dict[str, Any]:
    """What must not move: the special tokens' ids (stop words, EOS, pad, BOS) and a rendered chat's ids."""
    names = sorted({*template["stop"], tok.eos_token, tok.pad_token, tok.bos_token} - {None})
    return {"special": {n: tok.convert_tokens_to_ids(n) for n in names},
            "chat": list(tok.apply_chat_template(CHAT, tokenize=True, return_dict=True,
                                                 chat_template=template["jinja"])["input_ids"]),
            "vocab_size": len(tok)}


def main() -> int:
    backend, out, cases = sys.argv[1], Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    os.environ["HF_HUB_OFFLINE"] = "1"
    if backend == "unsloth":
        import unsloth  # noqa: F401  (first, as the trainer imports it)
    import qlora_backends
    import qlora_run
    from transformers import AutoTokenizer

    for i, case in enumerate(cases):
        cfg = {"model": {"name": case["model"], "max_seq_length": 256, "load_in_4bit": False},
               "template": case["template"],
               "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
               "training": {"seed": 1, "gradient_checkpointing": "auto", "output_dir": str(out / f"case-{i}")}}
        model, tok = qlora_backends.load_model(backend, cfg, cuda=False)
        after_setup = ids_of(tok, case["template"])
        adapter = qlora_run.save_adapter(cfg, model, tok)
        saved = ids_of(AutoTokenizer.from_pretrained(str(adapter)), case["template"])
        config = json.loads((adapter / "adapter_config.json").read_text())
        print(json.dumps({"case": i, "setup": after_setup, "saved": saved,
                          "base_model_name_or_path": config.get("base_model_name_or_path")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
