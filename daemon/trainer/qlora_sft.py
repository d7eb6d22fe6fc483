"""The SFT step at the hardware's speed: a loss that scores only the trained tokens, and batches without padding waste.

TRL 1.16's SFTTrainer computes the loss through a chunked LM-head kernel that, without Triton (any CPU), scores every
position of the padded batch against the whole vocabulary and also computes the entropy and the top-1 flags: ~10
passes over ``[batch x length, vocab]`` each way (on a 152k vocabulary that was ~90% of a tiny model's step).
:func:`sft_class` subclasses it (TRL's documented way to change the loss): the backbone runs as usual, then only the
hidden states of positions whose label is trained go through the LM head, and the loss is the same token-mean
negative log-likelihood (summed over the trained tokens, divided by ``num_items_in_batch`` under gradient
accumulation, as TRL divides). ``mean_token_accuracy`` and ``num_tokens`` are logged as TRL logs them; the entropy,
a diagnostic nobody here reads, is not computed. Models whose head is not a plain linear layer (logit soft-capping,
a logit scale) keep TRL's loss.

:func:`batching` picks how batches are formed (``training.padding``): ``free`` flattens a batch into one row with
position ids (no pad token at all; transformers builds the block-diagonal mask from the position ids, and flash
attention uses them directly), ``bucket`` groups examples of similar length and pads to a multiple of
``training.pad_to_multiple_of`` (fixed shapes: on CUDA sm90+ the cuDNN attention builds a plan per new shape), and
``longest`` pads each batch to its longest example (TRL's default). ``auto``: ``free`` on a CPU and with flash
attention, else ``bucket``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qlora_metrics import count_tokens

PADDINGS = ("auto", "free", "bucket", "longest")


@dataclasses.dataclass(frozen=True)
class Batching:
    padding: str  # free | bucket | longest
    pad_to_multiple_of: int | None
    why: str

    def sft_kwargs(self, config_cls: Any) -> dict[str, Any]:
        """SFTConfig keyword arguments for this batching (the field names of the installed TRL/transformers)."""
        names = {f.name for f in dataclasses.fields(config_cls)}
        out: dict[str, Any] = {"padding_free": self.padding == "free", "pad_to_multiple_of": self.pad_to_multiple_of}
        if self.padding == "free":
            out["max_length"] = None  # already cut by qlora_tokens; TRL refuses a max_length it would not enforce
        if self.padding == "bucket":
            if "train_sampling_strategy" in names:
                out["train_sampling_strategy"] = "group_by_length"
            elif "group_by_length" in names:
                out["group_by_length"] = True
        return {k: v for k, v in out.items() if k in names}


def batching(setting: str, multiple: int, cuda: bool, attn: str | None) -> Batching:
    """The batching for ``training.padding`` = ``setting`` on this device and attention implementation."""
    if setting == "auto":
        if not cuda:
            return Batching("free", None, "auto: padding-free on a CPU (no pad token is computed)")
        if attn and attn.startswith("flash_attention"):
            return Batching("free", None, f"auto: padding-free ({attn} takes position ids)")
        return Batching("bucket", multiple, f"auto: length-bucketed, padded to a multiple of {multiple} ({attn})")
    if setting == "bucket":
        return Batching("bucket", multiple, f"length-bucketed, padded to a multiple of {multiple}")
    if setting == "free":
        return Batching("free", None, "padding-free")
    return Batching("longest", None, "padded to each batch's longest example")


def plain_head(model: Any) -> bool:
    """Whether the model's logits are its LM head's plain output (no soft-capping, no logit scale)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return not getattr(cfg, "final_logit_softcapping", None) and getattr(cfg, "logit_scale", None) in (None, 1.0)


def sft_class(base: Any) -> Any:
    """A subclass of TRL's ``SFTTrainer`` (``base``) whose loss scores only the trained tokens (module docstring)."""
    import torch
    import torch.nn.functional as F

    class TrainedTokensSFT(base):  # type: ignore[misc, valid-type]
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            unwrapped = self.accelerator.unwrap_model(model)
            causal = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            if return_outputs or not plain_head(causal):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            mode = "train" if model.training else "eval"
            labels = inputs["labels"]
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            forward["use_cache"] = False
            hidden = causal.base_model(**forward).last_hidden_state[:, :-1]
            targets = labels[:, 1:]
            mask = targets != -100
            head = causal.get_output_embeddings()
            picked = hidden[mask].to(head.weight.device)
            logits = head(picked).float()
            goal = targets[mask].to(logits.device)
            total = F.cross_entropy(logits, goal, reduction="sum")
            count = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = total / torch.as_tensor(count, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            with torch.no_grad():
                valid = int(goal.numel())
                right = int((logits.argmax(-1) == goal).sum()) if valid else 0
            self._metrics[mode]["mean_token_accuracy"].append(right / valid if valid else 0.0)
            if mode == "train":
                self._total_train_tokens += count_tokens(inputs)
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return loss

    return TrainedTokensSFT
