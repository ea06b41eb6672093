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

Bad files are ``ValueError``s naming the file and line and what was expected.
:func:`check_jsonl` checks the structure of every line without a tokenizer (fast:
what a front door runs before it builds a model); :func:`load_jsonl` checks the
same and then tokenizes (chat template, lengths, loss masks).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

__all__ = ["TrainingSequence", "load_jsonl", "check_jsonl", "check_example", "encode_example", "read_text",
           "parse_jsonl_line", "check_line", "FORMATS"]

IGNORE = -100

FORMATS = ('{"messages": [{"role": ..., "content": ...}, ...]} (with an assistant turn), '
           '{"prompt": str, "completion": str}, {"text": str} or {"input_ids": [int, ...]}')
"""The accepted example formats, as error messages name them."""


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


def _messages(tokenizer: Any, messages: list) -> tuple[list[int], list[bool]]:
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


def check_example(example: Any) -> str:
    """The format of one parsed JSON example ('messages', 'prompt', 'text' or 'input_ids'), its structure
    checked without a tokenizer; ValueError saying what is wrong and what is accepted."""
    if not isinstance(example, dict):
        raise ValueError(f"expected a JSON object, got a JSON {_json_type(example)}; each line is one example: "
                         f"{FORMATS}")
    if "input_ids" in example:                      # pre-tokenized: loss on every token
        ids = example["input_ids"]
        if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                for x in ids):
            raise ValueError("'input_ids' must be a list of non-negative integers")
        if len(ids) < 2:
            raise ValueError("'input_ids' needs at least 2 tokens (the first is never a target)")
        return "input_ids"
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {'role': str, 'content': str}")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{k}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("'messages' has no assistant turn to learn from")
        return "messages"
    if "prompt" in example or "completion" in example:
        p, c = example.get("prompt"), example.get("completion")
        if not isinstance(p, str) or not isinstance(c, str) or not c:
            raise ValueError("'prompt' and 'completion' must both be strings, completion non-empty")
        return "prompt"
    if "text" in example:
        if not isinstance(example["text"], str) or not example["text"]:
            raise ValueError("'text' must be a non-empty string")
        return "text"
    raise ValueError(f"unknown example format with keys {sorted(example)}; expected {FORMATS}")


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def encode_example(tokenizer: Optional[Any], example: Any) -> tuple[list[int], list[int]]:
    """One parsed JSON example -> (input_ids, labels). Raises ValueError describing what is wrong."""
    kind = check_example(example)
    if kind == "input_ids":
        ids = list(example["input_ids"])
        return ids, _shifted(ids, [True] * len(ids))
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; give pre-tokenized {'input_ids': [...]} examples")
    if kind == "messages":
        ids, trained = _messages(tokenizer, example["messages"])
    elif kind == "prompt":
        pi, ci = _encode(tokenizer, example["prompt"]), _encode(tokenizer, example["completion"])
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids, trained = pi + ci + eos, [False] * len(pi) + [True] * (len(ci) + len(eos))
    else:
        ids = _encode(tokenizer, example["text"])
        trained = [True] * len(ids)
    return ids, _shifted(ids, trained)


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of file ``path`` (a BOM is dropped); a missing, unreadable or binary file is a ValueError
    naming ``what`` (the option or argument it came from, e.g. ``--data``) and the path."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"{what}: no such file: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what}: {path} is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from None


def parse_jsonl_line(line: str, where: str, expected: str = FORMATS) -> Any:
    """One JSONL line parsed; a ValueError naming ``where`` (``file:line``), the character where the JSON
    breaks and the text from there on, and ``expected``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        rest = repr(line[e.pos: e.pos + 20]) if line[e.pos:].strip() else "the end of the line"
        hint = ""
        if line.strip() in ("{", "[") or line.rstrip().endswith(("{", "[", ",")):
            hint = " (this looks like JSON spread over several lines; JSONL needs each example on one line)"
        raise ValueError(f"{where}: not valid JSON at character {e.colno}, {rest}: {e.msg}{hint}; "
                         f"expected one JSON object per line: {expected}") from None


def check_line(line: str, where: str) -> Any:
    """One JSONL line parsed and its structure checked (:func:`check_example`); a ValueError starting with
    ``where`` says what is wrong and what is accepted."""
    example = parse_jsonl_line(line, where)
    try:
        check_example(example)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return example


def _examples(path: str, what: str):
    """(``file:line``, parsed and checked example) for each non-blank line; ValueErrors start with ``what``."""
    n = 0
    for lineno, line in enumerate(read_text(path, what).splitlines(), 1):
        if not line.strip():
            continue
        example = check_line(line, f"{what}: {path}:{lineno}")
        n += 1
        yield f"{path}:{lineno}", example
    if n == 0:
        raise ValueError(f"{what}: {path} has no examples (the file is empty); expected one JSON object per line: "
                         f"{FORMATS}")


def check_jsonl(path: str, what: str = "dataset") -> int:
    """Check a JSONL dataset's structure without a tokenizer (no model needed, fast); the number of examples.
    Errors are ValueErrors that start with ``what`` and name the path (a missing, unreadable or empty file) or
    ``file:line`` and what was expected (a bad line). Lengths and the chat template are checked by :func:`load_jsonl`."""
    return sum(1 for _ in _examples(path, what))


def load_jsonl(path: str, tokenizer: Optional[Any], max_len: int, what: str = "dataset") -> list[TrainingSequence]:
    """Read and tokenize a JSONL dataset; every error is a ValueError that starts with ``what`` and names
    ``path:line`` (a bad line) or the path (a missing, unreadable or empty file), as :func:`check_jsonl`."""
    if max_len <= 1:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    out: list[TrainingSequence] = []
    for source, example in _examples(path, what):
        where = f"{what}: {source}"
        try:
            ids, labels = encode_example(tokenizer, example)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if len(ids) > max_len:
            raise ValueError(f"{where}: sequence of {len(ids)} tokens is longer than the limit {max_len}")
        if not any(x != IGNORE for x in labels):
            raise ValueError(f"{where}: no token to learn from (the loss mask is empty)")
        out.append(TrainingSequence(tuple(ids), tuple(labels), source))
    return out
