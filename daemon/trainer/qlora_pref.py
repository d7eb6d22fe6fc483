"""Preference objectives (``objective: kto`` or ``dpo``): TRL's KTOTrainer / DPOTrainer over the preference files,
and the preference accuracy of the implicit reward, scored from real log-probabilities.

The reference model is the base with the adapter disabled (``ref_model=None`` on a PEFT model, no second copy): TRL
copies a PEFT model's starting adapter into a "ref" adapter when it builds the trainer; the trainer is built before
the warm start (the adapter is still the fresh LoRA, equal to the base, when TRL precomputes the reference
log-probs) and the "ref" adapter is then deleted, so that TRL disables the adapter for every later reference pass.

kto: sequential sampling (TRL's KTOConfig default, required for its KL estimate); the training examples are shuffled
once with ``training.seed`` so that batches mix desirable and undesirable examples. The KL estimate pairs the
neighbours of a batch, so ``per_device_train_batch_size`` 1 is raised to 2 (said on stderr). ``desirable_weight``
null: 1.0 when (1.0·n_desirable)/(undesirable_weight·n_undesirable) already lies in [1, 4/3] (the KTO paper's
Eq. 8), else the weight that puts the ratio in the middle of that range, 7/6.

Preference accuracy: the implicit reward r = log π(y|x) − log π_ref(y|x), the log-probabilities summed over the
completion's tokens (the prompt rendered with the trainer's chat template and the generation prompt, the completion
being what the rendered prompt + completion adds, as TRL tokenizes them), π the model with its active adapter,
π_ref the base with adapters disabled. A kto example is classified correctly when r > 0 (desirable) or r < 0
(undesirable); a dpo pair when r(chosen) > r(rejected). A tie (r = 0, as for a fresh LoRA, which equals the base) is
not correct. TRL's ``rewards/*`` metrics are β·r.
"""

from __future__ import annotations

import random
from typing import Any

from trainer_common import sayer

say = sayer("train_qlora")

MIDPOINT = 7 / 6


def kto_weights(pref: dict[str, Any], examples: list[dict[str, Any]]) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) for the kto train split (both labels present, checked on reading)."""
    undesirable = float(pref["undesirable_weight"])
    if pref["desirable_weight"] is not None:
        return float(pref["desirable_weight"]), undesirable
    n_good = sum(1 for ex in examples if ex["label"])
    n_bad = len(examples) - n_good
    ratio = n_good / (undesirable * n_bad)
    if 1.0 <= ratio <= 4 / 3:
        return 1.0, undesirable
    return round(MIDPOINT * undesirable * n_bad / n_good, 6), undesirable


def pref_args(cfg: dict[str, Any], base: dict[str, Any], weights: tuple[float, float] | None) -> dict[str, Any]:
    """KTOConfig / DPOConfig keyword arguments: the shared trainer arguments ``base`` plus the ``preference:`` ones."""
    pref = cfg["preference"]
    args = {**base, "beta": pref["beta"], "precompute_ref_log_probs": pref["precompute_ref_log_probs"]}
    if cfg["objective"] == "kto":
        assert weights is not None
        args["desirable_weight"], args["undesirable_weight"] = weights
        if args["per_device_train_batch_size"] < 2:
            say("kto: per_device_train_batch_size 1 raised to 2 (the KL estimate pairs the examples of a batch)")
            args["per_device_train_batch_size"] = 2
        args["per_device_eval_batch_size"] = args["per_device_train_batch_size"]
    return args


def build_trainer(
    cfg: dict[str, Any], model: Any, tok: Any, train: list[dict[str, Any]], evals: list[dict[str, Any]],
    base_args: dict[str, Any], recorder: Any,
) -> tuple[Any, dict[str, Any]]:
    """The KTO or DPO trainer on ``model`` (a PEFT model with a fresh LoRA; warm-start it afterwards) and what the
    result reports of its set-up (``pref_desirable_weight``, ``pref_undesirable_weight``)."""
    from datasets import Dataset

    objective = cfg["objective"]
    weights = None
    if objective == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Trainer

        weights = kto_weights(cfg["preference"], train)
        train = list(train)
        random.Random(cfg["training"]["seed"]).shuffle(train)
        say(f"kto: desirable_weight {weights[0]}, undesirable_weight {weights[1]} "
            f"({sum(1 for ex in train if ex['label'])} desirable / {sum(1 for ex in train if not ex['label'])} "
            "undesirable)")
    else:
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer

    trainer = Trainer(
        model=model,
        ref_model=None,
        args=Config(**pref_args(cfg, base_args, weights)),
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evals),
        processing_class=tok,
        callbacks=[recorder],
    )
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # the reference is the base: TRL disables the adapter when there is no "ref"
    _fused_head_for_both(model)
    info = {"pref_desirable_weight": weights[0] if weights else None,
            "pref_undesirable_weight": weights[1] if weights else None}
    return trainer, info


def _fused_head_for_both(model: Any) -> None:
    """SFTTrainer and KTO/DPOTrainer each patch the base model's forward with TRL's fused LM head, each computing
    only the per-token fields it reads (SFT: ``is_top1``; KTO: ``mean_logits``): the later patch would starve the
    SFT evaluation. A last patch computing every field serves both trainers."""
    try:
        from trl.trainer.utils import add_fused_lm_head
    except ImportError:  # a TRL without the fused head: nothing was patched
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    add_fused_lm_head(base, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))


def _encode(tok: Any, prompt: list[dict[str, str]], completion: list[dict[str, str]], max_length: int
            ) -> tuple[list[int], int]:
    """(prompt + completion token ids, index of the first completion token), tokenized as TRL does."""
    def ids(messages: list[dict[str, str]], **kw: Any) -> list[int]:
        return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])

    prompt_ids = ids(prompt, add_generation_prompt=True)
    full = ids(prompt + completion)
    start = 0
    while start < min(len(prompt_ids), len(full)) and prompt_ids[start] == full[start]:
        start += 1
    return full[:max_length], start


class PreferenceScorer:
    """The preference accuracy and mean implicit rewards of a model on one preference split (see the module doc).

    The reference log-probabilities (adapters disabled) are computed once, on the first :meth:`score`.
    """

    def __init__(self, tok: Any, examples: list[dict[str, Any]], objective: str, max_length: int) -> None:
        self.objective = objective
        self.seqs: list[tuple[list[int], int]] = []
        self.labels: list[bool] = []
        for ex in examples:
            if objective == "kto":
                self.seqs.append(_encode(tok, ex["prompt"], ex["completion"], max_length))
                self.labels.append(bool(ex["label"]))
            else:  # chosen, rejected: even and odd positions
                self.seqs.append(_encode(tok, ex["prompt"], ex["chosen"], max_length))
                self.seqs.append(_encode(tok, ex["prompt"], ex["rejected"], max_length))
        self.examples = len(examples)
        self.ref: list[float] | None = None

    def score(self, model: Any) -> dict[str, float | None]:
        """``{"accuracy", "reward_desirable", "reward_undesirable"}`` of ``model`` as it is (its active adapter);
        the rewards are means of r over the desirable (kto label true, dpo chosen) and undesirable completions."""
        if self.ref is None:
            with model.disable_adapter():
                self.ref = self.logps(model)
        r = [p - q for p, q in zip(self.logps(model), self.ref, strict=True)]
        if self.objective == "kto":
            good = [x for x, label in zip(r, self.labels, strict=True) if label]
            bad = [x for x, label in zip(r, self.labels, strict=True) if not label]
            correct = sum(1 for x in good if x > 0) + sum(1 for x in bad if x < 0)
        else:
            good, bad = r[0::2], r[1::2]
            correct = sum(1 for c, w in zip(good, bad, strict=True) if c > w)
        return {
            "accuracy": correct / self.examples,
            "reward_desirable": _mean(good),
            "reward_undesirable": _mean(bad),
        }

    def logps(self, model: Any) -> list[float]:
        """Each sequence's completion log-probability under ``model`` (eval mode, no gradients), one at a time."""
        import torch

        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = []
        try:
            with torch.no_grad():
                for ids, start in self.seqs:
                    n = len(ids) - start
                    if n <= 0:  # truncated away: no completion token left
                        out.append(0.0)
                        continue
                    x = torch.tensor([ids], device=device)
                    logits = _last_logits(model, x, n + 1)[0, -(n + 1):-1].float()
                    picked = torch.log_softmax(logits, dim=-1).gather(-1, x[0, start:].unsqueeze(-1))
                    out.append(float(picked.sum()))
        finally:
            model.train(was_training)
        return out


def _last_logits(model: Any, x: Any, keep: int) -> Any:
    """The logits of the last ``keep`` positions (at least): ``logits_to_keep`` where the forward takes it."""
    try:
        return model(input_ids=x, logits_to_keep=keep).logits
    except TypeError:
        return model(input_ids=x).logits


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
