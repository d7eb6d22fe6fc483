"""The two training backends: each loads the model with its LoRA and builds a TRL SFTTrainer over the examples.

``build(backend)(cfg, train, evals, extras, cuda, recorder)`` returns a :class:`Built`: the SFTTrainer (it trains
when the objective is sft and evaluates the SFT loss for every objective), the model, the tokenizer, ``info``
(``device``, ``dtype`` and ``load_in_4bit`` for ``result.json``), ``sets`` (each named extra evaluation set of
``extras``: the new examples ``"new"``, the canary set ``"canary"``; prepared exactly as the eval split, for
``trainer.evaluate(eval_dataset=built.sets[name])``) and ``args``, the trainer arguments a preference trainer shares
(``qlora_pref``). ``recorder`` (the step-line callback) is None when another trainer trains. The LoRA is fresh: the
caller warm-starts it (:func:`warm_start`) once every trainer is built. The heavy imports live inside the functions.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_gpu import prepare_4bit, run_precision, torch_dtype, trainer_flags
from qlora_init import load_init_adapter
from trainer_common import one_line, sayer

say = sayer("train_qlora")

EVAL = "eval"  # the eval split's key in the eval datasets handed to SFTTrainer beside the extra sets


@dataclass
class Built:
    trainer: Any
    model: Any
    tok: Any
    info: dict[str, Any]
    sets: dict[str, Any]
    args: dict[str, Any]

    @property
    def new_ds(self) -> Any:
        """The prepared new examples, or None."""
        return self.sets.get("new")


Extras = dict[str, list[Any]]  # name -> examples: the extra evaluation sets ("new", "canary")


def build(backend: str) -> Callable[[dict[str, Any], list[Any], list[Any], Extras, bool, Any], Built]:
    """The trainer builder of ``backend`` ("unsloth" or "transformers")."""
    return unsloth_trainer if backend == "unsloth" else transformers_trainer


def sft_args(cfg: dict[str, Any], cuda: bool, prec: str, **extra: Any) -> dict[str, Any]:
    """SFTConfig keyword arguments shared by both backends."""
    return {**train_args(cfg, cuda, prec), "packing": False, **extra}


def train_args(cfg: dict[str, Any], cuda: bool, prec: str, **extra: Any) -> dict[str, Any]:
    """The trainer keyword arguments SFTConfig, KTOConfig and DPOConfig share (TRL 1.15 and 1.16 spell them the
    same); ``prec`` is the precision rule's answer (``qlora_gpu.run_precision``)."""
    t = cfg["training"]
    evals_every = t["eval_steps"]
    return {
        "output_dir": str(Path(t["output_dir"], "checkpoints")),
        "learning_rate": t["learning_rate"],
        "per_device_train_batch_size": t["per_device_train_batch_size"],
        "per_device_eval_batch_size": t["per_device_train_batch_size"],
        "gradient_accumulation_steps": t["gradient_accumulation_steps"],
        "warmup_steps": t["warmup_ratio"],  # transformers 5: a float in [0, 1) is a ratio of the total steps
        "weight_decay": t["weight_decay"],
        "num_train_epochs": t["num_train_epochs"],
        "max_steps": t["max_steps"],
        "logging_steps": t["logging_steps"],
        "eval_strategy": "steps" if evals_every else "no",
        "eval_steps": evals_every,
        "save_strategy": "steps" if t["save_steps"] else "no",  # 0: no intermediate checkpoints
        "save_steps": t["save_steps"] or 500,
        "save_total_limit": 2,
        "seed": t["seed"],
        "max_length": cfg["model"]["max_seq_length"],
        **trainer_flags(prec),
        "use_cpu": not cuda,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **extra,
    }


def lora_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """The LoRA's keyword arguments, spelt the same by PEFT's LoraConfig and Unsloth's get_peft_model."""
    lora = cfg["lora"]
    return {
        "r": lora["r"],
        "lora_alpha": lora["lora_alpha"],
        "lora_dropout": lora["lora_dropout"],
        "target_modules": lora["target_modules"],
        "bias": "none",
    }


def warm_start(cfg: dict[str, Any], model: Any) -> None:
    """``init.adapter``'s weights into the freshly built LoRA (same shape, checked by the config)."""
    if cfg["init"]["adapter"] is not None:
        load_init_adapter(model, cfg["init"]["adapter"])


def eval_sets(evals: Any, extras: dict[str, Any]) -> Any:
    """SFTTrainer's ``eval_dataset``: the eval split alone, or a dict with the extra sets beside it, so that the
    trainer prepares them all the same way (and Unsloth's ``train_on_responses_only`` masks them all)."""
    return {EVAL: evals, **extras} if extras else evals


def split_eval_sets(trainer: Any) -> dict[str, Any]:
    """Undo :func:`eval_sets` once the trainer prepared them: the eval split stays the trainer's (the evaluations
    during training see it alone, logged as ``eval_loss``); the prepared extra sets are returned by name."""
    sets = trainer.eval_dataset
    if not isinstance(sets, dict):
        return {}
    trainer.eval_dataset = sets[EVAL]
    return {k: v for k, v in sets.items() if k != EVAL}


def _checkpointing(config_cls: Any, on: bool) -> dict[str, bool]:
    """Activation checkpointing on a GPU only (it only costs time on a CPU); transformers 5.24 renamed the field."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def device(cuda: bool) -> str:
    if not cuda:
        return "cpu"
    import torch

    return f"cuda:{torch.cuda.get_device_name(0)}"


def _load_kwargs(m: dict[str, Any], cuda: bool, prec: str) -> tuple[dict[str, Any], bool]:
    """``from_pretrained`` keyword arguments and whether they quantize to 4 bits (only on a GPU, with bitsandbytes)."""
    kwargs: dict[str, Any] = {"dtype": torch_dtype(prec)}
    if m["load_in_4bit"] and cuda and importlib.util.find_spec("bitsandbytes") is None:
        say("load_in_4bit ignored: bitsandbytes is not installed in this interpreter")
    elif m["load_in_4bit"] and cuda:
        try:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"],
            )
            kwargs["device_map"] = {"": 0}
            return kwargs, True
        except Exception as e:
            say(f"load_in_4bit ignored: {one_line(e)}")
    elif m["load_in_4bit"]:
        say("load_in_4bit ignored: no GPU (training the full-precision base)")
    return kwargs, False


def transformers_trainer(
    cfg: dict[str, Any], train: list[Any], evals: list[Any], extras: Extras, cuda: bool, recorder: Any
) -> Built:
    """TRL SFTTrainer + PEFT LoRA; loss on assistant tokens via the template (TRL-recognised or with markers)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    m = cfg["model"]
    tok = AutoTokenizer.from_pretrained(m["name"])
    tok.chat_template = cfg["template"]["training_jinja"] or cfg["template"]["jinja"]
    prec = run_precision(cfg, cuda)
    kwargs, four_bit = _load_kwargs(m, cuda, prec)
    model = AutoModelForCausalLM.from_pretrained(m["name"], **kwargs)
    if four_bit:
        model = prepare_4bit(model)  # embeddings and LM head stay 16-bit (peft's helper upcasts them to fp32)
    model = get_peft_model(model, LoraConfig(**lora_args(cfg), task_type="CAUSAL_LM"))
    shared = train_args(cfg, cuda, prec, **_checkpointing(SFTConfig, cuda))
    args = SFTConfig(**sft_args(cfg, cuda, prec, assistant_only_loss=True, **_checkpointing(SFTConfig, cuda)))

    def messages(xs: list[Any] | None) -> Any:
        return None if xs is None else Dataset.from_list([{"messages": x} for x in xs])

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=messages(train),
        eval_dataset=eval_sets(messages(evals), {k: messages(v) for k, v in extras.items()}),
        processing_class=tok,
        callbacks=[recorder] if recorder is not None else None,
    )
    sets = split_eval_sets(trainer)
    dtype = "nf4+" + str(kwargs["dtype"]).removeprefix("torch.") if four_bit else str(kwargs["dtype"])
    info = {"device": device(cuda), "dtype": dtype.removeprefix("torch."), "load_in_4bit": four_bit}
    return Built(trainer, model, tok, info, sets, shared)


def _unsloth_model(cfg: dict[str, Any], cuda: bool) -> tuple[Any, Any, bool]:
    """Unsloth FastLanguageModel with its LoRA and the configured template text: (model, tokenizer, 4-bit)."""
    from unsloth import FastLanguageModel
    from unsloth.chat_templates import get_chat_template

    m, tpl = cfg["model"], cfg["template"]
    four_bit = bool(m["load_in_4bit"] and cuda)
    if m["load_in_4bit"] and not cuda:
        say("load_in_4bit ignored: no GPU (Unsloth's CPU fallback trains the full-precision base)")
    model, tok = FastLanguageModel.from_pretrained(  # use_exact_model_name: the configured base, no bnb-4bit mirror
        model_name=m["name"], max_seq_length=m["max_seq_length"], load_in_4bit=four_bit, use_exact_model_name=True,
        dtype=torch_dtype(run_precision(cfg, cuda)) if cuda else None,  # CPU: Unsloth's fallback picks its own
    )
    model = FastLanguageModel.get_peft_model(
        model,
        **lora_args(cfg),
        use_gradient_checkpointing="unsloth" if cuda else False,
        random_state=cfg["training"]["seed"],
    )
    tok = get_chat_template(tok, chat_template=m["chat_template"])
    if tok.chat_template != tpl["jinja"]:
        # Same format family, but the table's text is what the GGUF will embed: train on exactly that.
        say(f"using the configured {m['chat_template']!r} template text instead of Unsloth's variant")
        tok.chat_template = tpl["jinja"]
    return model, tok, four_bit


def unsloth_trainer(
    cfg: dict[str, Any], train: list[Any], evals: list[Any], extras: Extras, cuda: bool, recorder: Any
) -> Built:
    """Unsloth FastLanguageModel + its chat template + ``train_on_responses_only`` + TRL SFTTrainer."""
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth.chat_templates import train_on_responses_only

    tpl = cfg["template"]
    model, tok, four_bit = _unsloth_model(cfg, cuda)

    def to_text(ex: dict[str, Any]) -> dict[str, str]:
        return {"text": tok.apply_chat_template(ex["messages"], tokenize=False)}

    def texts(xs: list[Any] | None) -> Any:
        if xs is None:
            return None
        return Dataset.from_list([{"messages": x} for x in xs]).map(to_text, remove_columns=["messages"])

    prec = run_precision(cfg, cuda)
    args = SFTConfig(**sft_args(cfg, cuda, prec, dataset_text_field="text"))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=texts(train),
        eval_dataset=eval_sets(texts(evals), {k: texts(v) for k, v in extras.items()}),
        processing_class=tok,
        callbacks=[recorder] if recorder is not None else None,
    )
    trainer = train_on_responses_only(  # masks every eval set of the dict too
        trainer, instruction_part=tpl["instruction_part"], response_part=tpl["response_part"]
    )
    sets = split_eval_sets(trainer)
    dtype = ("nf4+" if four_bit else "") + str(getattr(model, "dtype", "")).removeprefix("torch.")
    info = {"device": device(cuda), "dtype": dtype, "load_in_4bit": four_bit}
    return Built(trainer, model, tok, info, sets, train_args(cfg, cuda, prec))
