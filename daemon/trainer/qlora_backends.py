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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import qlora_sft
import qlora_tokens
from qlora_gpu import prepare_4bit, run_precision, torch_dtype, trainer_flags
from qlora_init import load_init_adapter
from trainer_common import one_line, sayer

say = sayer("train_qlora")



@dataclass
class Built:
    trainer: Any
    model: Any
    tok: Any
    info: dict[str, Any]
    sets: dict[str, Any]
    args: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)  # model_load, tokenize (seconds)

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


def prepared(tok: Any, cfg: dict[str, Any], train: list[Any], evals: list[Any], extras: Extras
             ) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """Tokenize the sets once, in our code (``qlora_tokens``): (train, eval, extra sets by name, facts)."""
    tokenizer = qlora_tokens.Tokenizer(tok, qlora_tokens.training_template(tok, cfg["template"]),
                                       cfg["model"]["max_seq_length"], cfg["dataset"]["token_cache_dir"])
    paths = {"new": cfg["dataset"]["new_path"], "canary": cfg["dataset"]["canary_path"]}
    train_t = tokenizer.tokenize(train, cfg["dataset"]["train_path"])
    eval_t = tokenizer.tokenize(evals, cfg["dataset"]["eval_path"])
    extra_t = {k: tokenizer.tokenize(v, paths.get(k)) for k, v in extras.items()}
    if not train_t.input_ids:
        raise qlora_tokens.TokenizeError("no training example keeps an assistant token within "
                                         f"model.max_seq_length={cfg['model']['max_seq_length']}")
    facts = {"tokenize_seconds": round(tokenizer.seconds, 3), "token_cache_hits": tokenizer.hits,
             "train_tokens": train_t.tokens, "train_trained_tokens": train_t.trained_tokens,
             "dropped_examples": train_t.dropped}
    if train_t.dropped:
        say(f"{train_t.dropped} training example(s) dropped: no assistant token within max_seq_length")
    return train_t.dataset(), eval_t.dataset(), {k: v.dataset() for k, v in extra_t.items()}, facts


def model_facts(model: Any, prec: str, batch: Any) -> dict[str, Any]:
    """What was loaded and how it trains, read from the model itself (not from the request)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    four_bit = bool(getattr(base, "is_loaded_in_4bit", False))
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in base.parameters() if p.is_floating_point()})
    return {"load_in_4bit": four_bit, "param_dtypes": dtypes,
            "attn_implementation": getattr(base.config, "_attn_implementation", None),
            "gradient_checkpointing": bool(getattr(base, "is_gradient_checkpointing", False)),
            "padding": batch.padding, "padding_why": batch.why,
            "precision": prec}


def _transformers_model(cfg: dict[str, Any], cuda: bool) -> tuple[Any, Any, bool, dict[str, Any]]:
    """The base with its fresh PEFT LoRA and the tokenizer with the configured template text set as it is (no
    vocabulary edit): (model, tokenizer, 4-bit, from_pretrained keyword arguments)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = cfg["model"]
    tok = AutoTokenizer.from_pretrained(m["name"])
    tok.chat_template = cfg["template"]["jinja"]
    prec = run_precision(cfg, cuda)
    kwargs, four_bit = _load_kwargs(m, cuda, prec)
    model = AutoModelForCausalLM.from_pretrained(m["name"], **kwargs)
    if four_bit:
        model = prepare_4bit(model)  # embeddings and LM head stay 16-bit (peft's helper upcasts them to fp32)
    model = get_peft_model(model, LoraConfig(**lora_args(cfg), task_type="CAUSAL_LM"))
    return model, tok, four_bit, kwargs


def load_model(backend: str, cfg: dict[str, Any], cuda: bool) -> tuple[Any, Any]:
    """(model with its LoRA, tokenizer) exactly as the trainer of ``backend`` sets them up before training."""
    if backend == "unsloth":
        model, tok, _ = _unsloth_model(cfg, cuda)
        return model, tok
    model, tok, _, _ = _transformers_model(cfg, cuda)
    return model, tok


def transformers_trainer(
    cfg: dict[str, Any], train: list[Any], evals: list[Any], extras: Extras, cuda: bool, recorder: Any
) -> Built:
    """TRL SFTTrainer + PEFT LoRA over sets tokenized once (``qlora_tokens``), with the trained-tokens loss
    (``qlora_sft``)."""
    from trl import SFTConfig, SFTTrainer

    t = cfg["training"]
    timings: dict[str, float] = {}
    clock = time.monotonic()
    prec = run_precision(cfg, cuda)
    model, tok, four_bit, kwargs = _transformers_model(cfg, cuda)
    timings["model_load"] = time.monotonic() - clock
    clock = time.monotonic()
    train_ds, eval_ds, sets, facts = prepared(tok, cfg, train, evals, extras)
    timings["tokenize"] = time.monotonic() - clock
    batch = qlora_sft.batching(t["padding"], t["pad_to_multiple_of"], cuda,
                               getattr(model.config, "_attn_implementation", None))
    checkpointing = _checkpointing(SFTConfig, checkpointing_on(cfg, cuda, four_bit))
    shared = train_args(cfg, cuda, prec, **checkpointing)
    args = SFTConfig(**sft_args(cfg, cuda, prec, dataset_kwargs={"skip_prepare_dataset": True},
                                **batch.sft_kwargs(SFTConfig), **checkpointing))
    trainer = qlora_sft.sft_class(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[recorder] if recorder is not None else None,
    )
    dtype = "nf4+" + str(kwargs["dtype"]).removeprefix("torch.") if four_bit else str(kwargs["dtype"])
    info = {"device": device(cuda), "dtype": dtype.removeprefix("torch."), **model_facts(model, prec, batch),
            **facts}
    return Built(trainer, model, tok, info, sets, shared, timings)


def checkpointing_on(cfg: dict[str, Any], cuda: bool, four_bit: bool) -> bool:
    """``training.gradient_checkpointing``: on / off; auto (left so only when the VRAM preflight could not decide,
    ``qlora_gpu.preflight``) = never on a CPU (it only costs time there), on a GPU for the 4-bit path."""
    setting = cfg["training"]["gradient_checkpointing"]
    if setting != "auto":
        return bool(setting == "on")
    return cuda and four_bit


def _unsloth_model(cfg: dict[str, Any], cuda: bool) -> tuple[Any, Any, bool]:
    """Unsloth FastLanguageModel with its LoRA and the configured template text set on the tokenizer as it is (no
    ``get_chat_template``: its ``map_eos_token`` renames the base's tokens): (model, tokenizer, 4-bit)."""
    from unsloth import FastLanguageModel

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
        use_gradient_checkpointing="unsloth" if checkpointing_on(cfg, cuda, four_bit) else False,
        random_state=cfg["training"]["seed"],
    )
    tok.chat_template = tpl["jinja"]
    return model, tok, four_bit


def unsloth_trainer(
    cfg: dict[str, Any], train: list[Any], evals: list[Any], extras: Extras, cuda: bool, recorder: Any
) -> Built:
    """Unsloth FastLanguageModel + TRL SFTTrainer over the same sets, tokenized once (``qlora_tokens``)."""
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)
    from trl import SFTConfig, SFTTrainer

    timings: dict[str, float] = {}
    clock = time.monotonic()
    model, tok, four_bit = _unsloth_model(cfg, cuda)
    timings["model_load"] = time.monotonic() - clock
    clock = time.monotonic()
    train_ds, eval_ds, sets, facts = prepared(tok, cfg, train, evals, extras)
    timings["tokenize"] = time.monotonic() - clock
    batch = qlora_sft.batching(cfg["training"]["padding"], cfg["training"]["pad_to_multiple_of"], cuda,
                               getattr(model.config, "_attn_implementation", None))
    prec = run_precision(cfg, cuda)
    args = SFTConfig(**sft_args(cfg, cuda, prec, dataset_kwargs={"skip_prepare_dataset": True},
                                **batch.sft_kwargs(SFTConfig)))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[recorder] if recorder is not None else None,
    )
    dtype = ("nf4+" if four_bit else "") + str(getattr(model, "dtype", "")).removeprefix("torch.")
    info = {"device": device(cuda), "dtype": dtype, **model_facts(model, prec, batch), **facts}
    return Built(trainer, model, tok, info, sets, train_args(cfg, cuda, prec), timings)
