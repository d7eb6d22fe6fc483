"""Chat templates by name (pure data): the one table that training and export both read (the template texts
themselves are in :mod:`daemon.train.template_text`).

Names are Unsloth's ``get_chat_template`` names, so the same configured name drives Unsloth, TRL and Ollama. Each
entry carries the Jinja template the model is trained with and the GGUF embeds, a training variant that TRL can mask
for assistant-only loss, the Ollama Go template rendering the same text, the stop strings, the instruction/response
markers for Unsloth's ``train_on_responses_only``, and the GGUF architectures it is meant for.

The trainer runs in another interpreter and cannot import this module: :func:`trainer_block` renders the part it needs
into the job config (the ``template:`` block, see ``configs/chatos_qlora.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daemon.train.template_text import (
    CHATML_GO,
    CHATML_JINJA,
    CHATML_TRAINING_JINJA,
    LLAMA31_GO,
    LLAMA31_JINJA,
    LLAMA31_TRAINING_JINJA,
    MISTRAL_GO,
    MISTRAL_JINJA,
    MISTRAL_TRAINING_JINJA,
    QWEN25_GO,
    QWEN25_JINJA,
    QWEN25_SYSTEM,
)


class UnknownTemplate(ValueError):
    """A chat template name that is not in the table; the message lists the known names."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown chat template {name!r}; known: {', '.join(known)}")


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """Everything that must agree between training, the GGUF and Ollama for one chat format."""

    name: str  # Unsloth's get_chat_template name (canonical)
    aliases: tuple[str, ...]  # other names accepted by get()
    jinja: str  # the template trained with and embedded in the GGUF (tokenizer.chat_template)
    training_jinja: str  # == jinja when TRL recognises it, else jinja plus {% generation %} markers
    ollama_template: str  # Go text/template for POST /api/create "template"; renders what jinja renders
    stop: tuple[str, ...]  # Ollama parameters.stop
    instruction_part: str  # train_on_responses_only(instruction_part=...)
    response_part: str  # train_on_responses_only(response_part=...): the text right before each answer
    gguf_architectures: tuple[str, ...]  # expected general.architecture values; empty = any
    default_system: str | None = None  # what jinja (and the Go template) inserts when there is no system message

    @property
    def trl_recognised(self) -> bool:
        """True when TRL 1.16 swaps in its own training variant for ``jinja`` (so no markers are needed here)."""
        return self.training_jinja == self.jinja


_TABLE: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="qwen-2.5",
            aliases=("qwen2.5", "qwen-25", "qwen25"),
            jinja=QWEN25_JINJA,
            training_jinja=QWEN25_JINJA,
            ollama_template=QWEN25_GO,
            stop=("<|im_end|>", "<|endoftext|>"),
            instruction_part="<|im_start|>user\n",
            response_part="<|im_start|>assistant\n",
            gguf_architectures=("qwen2",),
            default_system=QWEN25_SYSTEM,
        ),
        ChatTemplate(
            name="chatml",
            aliases=(),
            jinja=CHATML_JINJA,
            training_jinja=CHATML_TRAINING_JINJA,
            ollama_template=CHATML_GO,
            stop=("<|im_end|>", "<|endoftext|>"),
            instruction_part="<|im_start|>user\n",
            response_part="<|im_start|>assistant\n",
            gguf_architectures=(),
        ),
        ChatTemplate(
            name="llama-3.1",
            aliases=("llama-3", "llama3", "llama-31", "llama-3.2", "llama-3.3"),
            jinja=LLAMA31_JINJA,
            training_jinja=LLAMA31_TRAINING_JINJA,
            ollama_template=LLAMA31_GO,
            stop=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
            instruction_part="<|start_header_id|>user<|end_header_id|>\n\n",
            response_part="<|start_header_id|>assistant<|end_header_id|>\n\n",
            gguf_architectures=("llama",),
        ),
        ChatTemplate(
            name="mistral",
            aliases=(),
            jinja=MISTRAL_JINJA,
            training_jinja=MISTRAL_TRAINING_JINJA,
            ollama_template=MISTRAL_GO,
            stop=("[INST]", "[/INST]", "</s>"),
            instruction_part="[INST]",
            response_part="[/INST]",
            gguf_architectures=("llama",),
        ),
    )
}
_ALIASES: dict[str, str] = {alias: t.name for t in _TABLE.values() for alias in t.aliases}


def names() -> list[str]:
    """The canonical names, sorted (what error messages and ``doctor`` list)."""
    return sorted(_TABLE)


def get(name: str) -> ChatTemplate:
    """The entry for a canonical name or an alias; :class:`UnknownTemplate` (listing the names) otherwise."""
    key = name.strip().lower()
    entry = _TABLE.get(_ALIASES.get(key, key))
    if entry is None:
        raise UnknownTemplate(name, names())
    return entry


def trainer_block(name: str) -> dict[str, Any]:
    """The ``template:`` block of a job config: what the trainer (which cannot import us) needs of an entry.

    ``name`` is canonical (the runner should also write it as ``model.chat_template``); ``known_names`` lets the
    trainer list the valid names when the config asks for one the block does not carry.
    """
    t = get(name)
    return {
        "name": t.name,
        "jinja": t.jinja,
        "training_jinja": t.training_jinja,
        "instruction_part": t.instruction_part,
        "response_part": t.response_part,
        "stop": list(t.stop),
        "known_names": names(),
    }
