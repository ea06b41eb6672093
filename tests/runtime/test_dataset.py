"""Finetuning datasets: the three JSONL formats, loss masks, and errors naming file and line."""
import json

import pytest

from flexc.models import load_tokenizer, resolve_model
from flexc.runtime.dataset import IGNORE, load_jsonl


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("smollm2-135m"))


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


def test_messages_loss_on_assistant_only(tok, tmp_path):
    """With the chat template, exactly the assistant turn's tokens are targets, and they decode to its text."""
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello there"}]
    (seq,) = load_jsonl(_write(tmp_path, [{"messages": msgs}]), tok, 512)
    full = tok.apply_chat_template(msgs, tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert list(seq.input_ids) == full
    targets = [t for t in seq.labels if t != IGNORE]
    assert "Hello there" in tok.decode(targets)
    assert "Say hi" not in tok.decode(targets)


def test_prompt_completion_and_text(tok, tmp_path):
    """prompt/completion trains the completion (+EOS); text trains every next token."""
    seqs = load_jsonl(_write(tmp_path, [{"prompt": "2+2=", "completion": " 4"}, {"text": "one two three"}]), tok, 64)
    pc, tx = seqs
    assert tok.decode([t for t in pc.labels if t != IGNORE]).startswith(" 4")
    assert pc.labels[-1] == IGNORE and pc.labels[-2] == tok.eos_token_id
    assert list(tx.labels[:-1]) == list(tx.input_ids[1:])


@pytest.mark.parametrize("rows,needle", [
    ([], "is empty"),
    (['{"text": "all is fine here"}', "{broken"], "d.jsonl:2: malformed JSON"),
    ([{"foo": 1}], "d.jsonl:1: unknown example format"),
    ([{"messages": [{"role": "user", "content": "x"}]}], "d.jsonl:1: 'messages' has no assistant turn"),
    ([{"text": "word " * 100}], "d.jsonl:1: sequence of"),
])
def test_bad_datasets_name_file_and_line(tok, tmp_path, rows, needle):
    """Empty files, malformed lines, unknown formats and over-long sequences are ValueErrors naming file:line."""
    with pytest.raises(ValueError, match=needle):
        load_jsonl(_write(tmp_path, rows), tok, 32)


def test_missing_file(tmp_path):
    """A dataset path that does not exist is a ValueError naming it."""
    with pytest.raises(ValueError, match="cannot read dataset .*nope.jsonl"):
        load_jsonl(str(tmp_path / "nope.jsonl"), None, 32)
