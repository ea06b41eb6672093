"""Finetuning datasets: JSONL files turned into token sequences with loss masks.

Each line is one example, in one of three forms:

* ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the
  model's chat template; the loss covers the assistant turns only;
* ``{"prompt": "...", "completion": "..."}``: loss on the completion;
* ``{"text": "..."}``: loss on every token.

A :class:`TrainingSequence` holds ``input_ids[L]`` and ``labels[L]`` where
``labels[t]`` is the token position t must predict (the next one) or -100:
the convention of the compiled head region, so a sequence split into chunks
needs no shifting across chunk boundaries.

Bad files are ``ValueError``s naming the file and line.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

__all__ = ["TrainingSequence", "load_jsonl", "encode_example"]

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class TrainingSequence:
    """One training example as tokens; ``labels[t]`` is the target of position t or -100."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    source: str = ""
    """``file:line`` the example came from (for messages and errors)."""

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


def _shifted(ids: list[int], trained: list[bool]) -> list[int]:
    # position t predicts ids[t+1]; it counts when token t+1 is trained
    return [ids[t + 1] if trained[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chat_ids(tokenizer: Any, messages: list, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def _messages(tokenizer: Any, messages: Any) -> tuple[list[int], list[bool]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError("each message needs string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("'messages' has no assistant turn to learn from")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the model's tokenizer has no chat template; use {'prompt','completion'} or {'text'}")
    ids: list[int] = []
    trained: list[bool] = []
    for i, m in enumerate(messages):
        full = _chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if m["role"] == "assistant":
            prefix = _chat_ids(tokenizer, messages[:i], add_generation_prompt=True) if i else []
            if full[: len(prefix)] != prefix or len(prefix) < len(ids):
                raise ValueError("the chat template does not render conversations as growing prefixes")
            trained += [False] * (len(prefix) - len(ids)) + [True] * (len(full) - len(prefix))
        else:
            if full[: len(ids)] != ids:
                raise ValueError("the chat template does not render conversations as growing prefixes")
            trained += [False] * (len(full) - len(ids))
        ids = full
    return ids, trained


def encode_example(tokenizer: Optional[Any], example: Any) -> tuple[list[int], list[int]]:
    """One parsed JSON example -> (input_ids, labels). Raises ValueError describing what is wrong."""
    if not isinstance(example, dict):
        raise ValueError(f"expected a JSON object, got {type(example).__name__}")
    if "input_ids" in example:                      # pre-tokenized: loss on every token
        ids = example["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(x, int) and x >= 0 for x in ids):
            raise ValueError("'input_ids' must be a list of non-negative integers")
        return list(ids), _shifted(list(ids), [True] * len(ids))
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; give pre-tokenized {'input_ids': [...]} examples")
    if "messages" in example:
        ids, trained = _messages(tokenizer, example["messages"])
    elif "prompt" in example or "completion" in example:
        p, c = example.get("prompt"), example.get("completion")
        if not isinstance(p, str) or not isinstance(c, str) or not c:
            raise ValueError("'prompt' and 'completion' must both be strings, completion non-empty")
        pi, ci = _encode(tokenizer, p), _encode(tokenizer, c)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids, trained = pi + ci + eos, [False] * len(pi) + [True] * (len(ci) + len(eos))
    elif "text" in example:
        if not isinstance(example["text"], str) or not example["text"]:
            raise ValueError("'text' must be a non-empty string")
        ids = _encode(tokenizer, example["text"])
        trained = [True] * len(ids)
    else:
        raise ValueError(f"unknown example format with keys {sorted(example)}; "
                         "expected 'messages', 'prompt'+'completion', 'text' or 'input_ids'")
    return ids, _shifted(ids, trained)


def load_jsonl(path: str, tokenizer: Optional[Any], max_len: int) -> list[TrainingSequence]:
    """Read and tokenize a JSONL dataset; every bad line is a ValueError naming ``path:line``."""
    if max_len <= 1:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read dataset {path}: {e.strerror}") from e
    out: list[TrainingSequence] = []
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            try:
                ids, labels = encode_example(tokenizer, example)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            if len(ids) > max_len:
                raise ValueError(f"{where}: sequence of {len(ids)} tokens is longer than the limit {max_len}")
            if not any(x != IGNORE for x in labels):
                raise ValueError(f"{where}: no token to learn from (the loss mask is empty)")
            out.append(TrainingSequence(tuple(ids), tuple(labels), where))
    if not out:
        raise ValueError(f"dataset {path} is empty")
    return out
