"""Tokenize once, in our code: ``input_ids`` and response-only ``labels`` from the chat template, for both backends.

TRL's SFTTrainer would tokenize through ``datasets.map``, which fingerprints each call by dill-pickling its arguments
(the whole tokenizer: ~13 s for a 151k vocabulary before the first step, CPU or GPU). Here each conversation is
rendered by the configured template with ``{% generation %}`` markers and tokenized by ``apply_chat_template`` with
``return_assistant_tokens_mask`` (what TRL does with ``assistant_only_loss``, so the labels are the same), labels are
the input ids on the assistant's tokens and -100 elsewhere, sequences are cut to ``max_seq_length`` (keep the start)
and any left without a trained token are dropped (as TRL does). The trainer gets the result with
``skip_prepare_dataset``: no ``map``, no hashing.

The tokenized sets are cached in ``dataset.token_cache_dir`` (when set) under a key of the file's bytes, the
tokenizer's files, the template text and the length, so a canary set or an eval split that did not change is not
tokenized again; the folder keeps the newest :data:`CACHE_KEEP` entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer_common import Failure, sayer

say = sayer("train_qlora")

IGNORE = -100
CACHE_KEEP = 16
CACHE_VERSION = 1
_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt")


class TokenizeError(Failure):
    """A conversation the template gives no assistant token to (exit 3, like any data problem)."""

    exit_code = 3


@dataclass
class Tokenized:
    """One set: parallel lists, and how many conversations were dropped (no trained token left after the cut)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    dropped: int = 0
    cached: bool = False

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for row in self.labels for t in row if t != IGNORE)

    def dataset(self) -> Any:
        """A ``datasets.Dataset`` of the two columns (``from_dict``: no map, no fingerprint of a function)."""
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})


def has_markers(template: str | None) -> bool:
    return bool(template) and _MARKER.search(template or "") is not None


def training_template(tok: Any, template: dict[str, Any]) -> str:
    """The template text with ``{% generation %}`` markers: the config's ``training_jinja`` when it has them, else
    TRL's own patch of the configured text (what SFTTrainer does with ``assistant_only_loss``)."""
    text = template.get("training_jinja") or template["jinja"]
    if has_markers(text):
        return str(text)
    from trl.chat_template_utils import get_training_chat_template

    saved = tok.chat_template
    tok.chat_template = text
    try:
        patched = get_training_chat_template(tok)
    finally:
        tok.chat_template = saved
    if not has_markers(patched):
        raise TokenizeError(f"template {template.get('name')!r} has no {{% generation %}} markers and TRL cannot "
                            "add them: the assistant's tokens cannot be found")
    return str(patched)


def tokenize_one(tok: Any, messages: Sequence[dict[str, str]], template: str, max_len: int
                 ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation; labels are -100 off the assistant's tokens. Cut to ``max_len``."""
    out = tok.apply_chat_template(list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  chat_template=template)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if 1 not in mask:
        raise TokenizeError("a conversation has no assistant token under the template (check its "
                            "{% generation %} markers)")
    labels = [t if m else IGNORE for t, m in zip(ids, mask, strict=True)]
    return ids[:max_len], labels[:max_len]


def tokenize(tok: Any, conversations: Iterable[Sequence[dict[str, str]]], template: str, max_len: int) -> Tokenized:
    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
    dropped = 0
    for msgs in conversations:
        ids, labels = tokenize_one(tok, msgs, template, max_len)
        if all(t == IGNORE for t in labels):
            dropped += 1
            continue
        ids_out.append(ids)
        labels_out.append(labels)
    return Tokenized(ids_out, labels_out, dropped)


def tokenizer_digest(tok: Any) -> str:
    """What identifies the tokenizer: its files' bytes when it came from a folder, else its serialized vocabulary."""
    h = hashlib.sha256()
    folder = getattr(tok, "name_or_path", "") or ""
    files = [Path(folder, n) for n in _TOKENIZER_FILES] if os.path.isdir(folder) else []
    present = [f for f in files if f.is_file()]
    if present:
        for f in present:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    else:
        backend = getattr(tok, "backend_tokenizer", None)
        h.update(backend.to_str().encode() if backend is not None else repr(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tok, "all_special_tokens", []), sort_keys=True).encode())
    return h.hexdigest()


def cache_key(source: bytes, tok_digest: str, template: str, max_len: int) -> str:
    h = hashlib.sha256()
    for part in (str(CACHE_VERSION).encode(), hashlib.sha256(source).digest(), tok_digest.encode(),
                 template.encode(), str(max_len).encode()):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()[:32]


class TokenCache:
    """``<dir>/<key>.json``: a tokenized set, written atomically; the newest :data:`CACHE_KEEP` are kept."""

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder else None

    def get(self, key: str) -> Tokenized | None:
        if self.folder is None:
            return None
        path = self.folder / f"{key}.json"
        try:
            data = json.loads(path.read_text())
            hit = Tokenized(data["input_ids"], data["labels"], int(data["dropped"]), cached=True)
            os.utime(path)  # recently used: kept by the pruning
            return hit
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, value: Tokenized) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"input_ids": value.input_ids, "labels": value.labels,
                                       "dropped": value.dropped}, separators=(",", ":")))
            os.replace(tmp, self.folder / f"{key}.json")
            self._prune()
        except OSError as e:  # a cache that cannot be written costs time, never the job
            say(f"token cache not written ({e})")

    def _prune(self) -> None:
        assert self.folder is not None
        entries = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[CACHE_KEEP:]:
            old.unlink(missing_ok=True)


class Tokenizer:
    """Tokenizes a job's sets once each (cached across jobs), timing what it does."""

    def __init__(self, tok: Any, template: str, max_len: int, cache_dir: str | None) -> None:
        self.tok, self.template, self.max_len = tok, template, max_len
        self.cache = TokenCache(cache_dir)
        self.seconds = 0.0
        self.hits = 0
        self._digest: str | None = None

    def digest(self) -> str:
        if self._digest is None:
            self._digest = tokenizer_digest(self.tok)
        return self._digest

    def tokenize(self, conversations: Sequence[Sequence[dict[str, str]]], source: str | None = None) -> Tokenized:
        """The set's tokens; ``source`` (its file) makes it cacheable."""
        t = time.monotonic()
        key = None
        if source is not None and self.cache.folder is not None:
            try:
                key = cache_key(Path(source).read_bytes(), self.digest(), self.template, self.max_len)
            except OSError:
                key = None
        hit = self.cache.get(key) if key is not None else None
        if hit is not None:
            self.hits += 1
            out = hit
        else:
            out = tokenize(self.tok, conversations, self.template, self.max_len)
            if key is not None:
                self.cache.put(key, out)
        self.seconds += time.monotonic() - t
        return out
