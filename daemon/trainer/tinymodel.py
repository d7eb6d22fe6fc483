"""Build tiny causal LMs with real tokenizers and real chat templates, offline (tests, demo, benchmarks).

A Qwen2 or Llama model of a few million parameters is built from a config (random weights), with the real Qwen2 /
Llama-3 vocabulary loaded from llama.cpp's vocab-only GGUFs and the real Qwen2.5 / Llama-3.1 chat templates, all taken
from the ``llama-cpp-python`` sdist that ``.ci/train-setup.sh`` extracts into a cache dir. Real vocabularies matter:
transformers 5 rebuilds a qwen2 pre-tokenizer from its own rules, and the GGUF converter rejects unknown BPE
tokenizers. Runs under the trainer's interpreter and imports nothing from the service package:

    python daemon/trainer/tinymodel.py OUT_DIR [--family qwen2] [--family llama] [--llama-cpp-dir DIR]

writes ``OUT_DIR/tiny-<family>/`` for each family and prints one JSON line per model built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

_HERE = os.path.dirname(os.path.realpath(__file__))
if sys.path[:1] != [_HERE]:  # imported as daemon.trainer.tinymodel (bench, demo) or by file path
    sys.path.insert(0, _HERE)  # first: trainer_common is this folder's file, whatever else is installed

from trainer_common import unparsable_sentencepiece  # noqa: E402

LLAMA_CPP_VERSION = "0.3.36"

# family -> (vocab GGUF, chat template file, config class name, eos token of the instruct model)
FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "qwen2": ("ggml-vocab-qwen2.gguf", "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen2Config", "<|im_end|>"),
    "llama": ("ggml-vocab-llama-bpe.gguf", "meta-llama-Llama-3.1-8B-Instruct.jinja", "LlamaConfig", "<|eot_id|>"),
}
SHAPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


class MissingLlamaCpp(FileNotFoundError):
    """The extracted llama.cpp files are not where we looked; the message says how to get them."""


def default_llama_cpp_dir() -> Path:
    """``$CHATOS_RETRAIN_LLAMA_CPP_DIR``, else ``${CHATOS_RETRAIN_CACHE:-~/.cache/chatos-retrain}/llama.cpp-<ver>``."""
    explicit = os.environ.get("CHATOS_RETRAIN_LLAMA_CPP_DIR")
    if explicit:
        return Path(explicit).expanduser()
    cache = Path(os.environ.get("CHATOS_RETRAIN_CACHE") or Path.home() / ".cache" / "chatos-retrain").expanduser()
    return cache / f"llama.cpp-{LLAMA_CPP_VERSION}"


def source_files(family: str, llama_cpp_dir: Path) -> tuple[Path, Path]:
    """The (vocab GGUF, chat template) paths for ``family``; :class:`MissingLlamaCpp` when either is absent."""
    vocab, template, _, _ = FAMILIES[family]
    paths = (llama_cpp_dir / "models" / vocab, llama_cpp_dir / "models" / "templates" / template)
    for p in paths:
        if not p.is_file():
            raise MissingLlamaCpp(f"{p} not found: run .ci/train-setup.sh (or set CHATOS_RETRAIN_LLAMA_CPP_DIR)")
    return paths


def build(family: str, out: Path, llama_cpp_dir: Path | None = None, seed: int = 0, convention: str = "instruct"
          ) -> dict[str, Any]:
    """Build ``family``'s tiny model into ``out`` (created or overwritten); returns a summary dict.

    ``convention`` "instruct": the EOS is the chat's end of turn (``<|im_end|>``, ``<|eot_id|>``), as instruct
    checkpoints ship; "base": the EOS stays the vocabulary's end of text (``<|endoftext|>``, ``<|end_of_text|>``), as
    base checkpoints ship (a template's stop word then differs from the EOS)."""
    vocab_path, template_path = source_files(family, llama_cpp_dir or default_llama_cpp_dir())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    _, _, config_cls, eos = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(vocab_path.parent), gguf_file=vocab_path.name)
    tok.chat_template = template_path.read_text(encoding="utf-8")
    if tok.pad_token is None or tok.pad_token == eos:
        tok.pad_token = tok.eos_token  # the vocab's end-of-text, distinct from the chat end-of-turn below
    if convention == "instruct":
        tok.eos_token = eos  # like the instruct models: generation stops at the end of the assistant turn

    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SHAPE,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if unparsable_sentencepiece(out / "tokenizer.model", has_json=True):
        (out / "tokenizer.model").unlink()  # a GGUF-loaded BPE tokenizer may write one; the GGUF converter dies on it
    return {
        "family": family,
        "convention": convention,
        "path": str(out),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
    }


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build tiny Qwen2/Llama models with real vocabularies and chat templates.")
    p.add_argument("out", type=Path, help="folder that receives tiny-<family>/ for each family")
    p.add_argument("--family", action="append", choices=sorted(FAMILIES), help="repeatable; default: qwen2")
    p.add_argument("--llama-cpp-dir", type=Path, default=None, help="extracted llama.cpp files (default: the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--convention", choices=("instruct", "base"), default="instruct",
                   help="whose EOS: the chat's end of turn (instruct) or the vocabulary's end of text (base; "
                        "written as tiny-<family>-base/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        for family in args.family or ["qwen2"]:
            name = f"tiny-{family}" + ("-base" if args.convention == "base" else "")
            summary = build(family, args.out / name, args.llama_cpp_dir, args.seed, args.convention)
            print(json.dumps(summary), flush=True)
    except MissingLlamaCpp as e:
        print(f"tinymodel: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
