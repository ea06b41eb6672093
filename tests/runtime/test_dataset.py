"""Finetuning datasets: the three JSONL formats, loss masks, and errors naming file and line."""
import json

import pytest

from flexc.models import load_tokenizer, resolve_model
from flexc.runtime.dataset import IGNORE, check_example, check_jsonl, load_jsonl


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
    ([], "has no examples"),
    (['{"text": "all is fine here"}', "{broken"], "d.jsonl:2: not valid JSON"),
    ([{"foo": 1}], "d.jsonl:1: unknown example format"),
    ([{"messages": [{"role": "user", "content": "x"}]}], "d.jsonl:1: 'messages' has no assistant turn"),
    ([{"text": "word " * 100}], "d.jsonl:1: sequence of"),
])
def test_bad_datasets_name_file_and_line(tok, tmp_path, rows, needle):
    """Empty files, malformed lines, unknown formats and over-long sequences are ValueErrors naming file:line."""
    with pytest.raises(ValueError, match=needle):
        load_jsonl(_write(tmp_path, rows), tok, 32)


def test_missing_file(tmp_path):
    """A dataset path that does not exist, or is a directory, is a ValueError naming what it is and the path."""
    with pytest.raises(ValueError, match="^dataset: no such file: .*nope.jsonl$"):
        load_jsonl(str(tmp_path / "nope.jsonl"), None, 32)
    with pytest.raises(ValueError, match="^--data: no such file: .*nope.jsonl$"):
        check_jsonl(str(tmp_path / "nope.jsonl"), "--data")
    with pytest.raises(ValueError, match="^--data: .* is a directory, not a file$"):
        check_jsonl(str(tmp_path), "--data")


def test_check_jsonl_without_tokenizer(tmp_path):
    """check_jsonl counts the examples of all four formats (blank lines and a BOM skipped) with no tokenizer."""
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"prompt": "p", "completion": "c"}, {"text": "t"}, "", {"input_ids": [1, 2, 3]}]
    p = tmp_path / "ok.jsonl"
    p.write_text("\ufeff" + "\n".join(json.dumps(r) if r else "  " for r in rows) + "\n", encoding="utf-8")
    assert check_jsonl(str(p)) == 4


@pytest.mark.parametrize("rows,needle", [
    (['{"text": "fine"}', '{"text": "a" "b"}'], "d.jsonl:2: not valid JSON at character 14, '\"b\"}': "
                                                "Expecting ',' delimiter"),
    (["{", '  "text": "spread over lines"', "}"], "d.jsonl:1: not valid JSON at character 2, the end of the line: .*JSON spread over several lines"),
    (['[{"text": "a"}]'], "d.jsonl:1: expected a JSON object, got a JSON array"),
    ([{"prompt": "p"}], "d.jsonl:1: 'prompt' and 'completion' must both be strings"),
    ([{"messages": [{"role": "user"}]}], r"d.jsonl:1: messages\[0\] must be an object with string 'role' and"),
    ([{"input_ids": [5, -1]}], "d.jsonl:1: 'input_ids' must be a list of non-negative integers"),
    ([{"input_ids": [5]}], "d.jsonl:1: 'input_ids' needs at least 2 tokens"),
    (["", "   "], r"^dataset: .*d.jsonl has no examples \(the file is empty\)"),
])
def test_check_jsonl_names_line_and_expected_format(tmp_path, rows, needle):
    """A bad line is a ValueError naming file:line, where the JSON broke (with the text there) or what is wrong
    with the example; unknown formats and bad JSON also list the accepted formats."""
    with pytest.raises(ValueError, match=needle) as e:
        check_jsonl(_write(tmp_path, rows))
    if "not valid JSON" in needle or "array" in needle:
        for fmt in ('"messages"', '"prompt"', '"completion"', '"text"', '"input_ids"'):
            assert fmt in str(e.value)


def test_readme_examples_are_accepted(tok, tmp_path):
    """The README's 'Dataset formats' examples (its jsonl block) are one example per format, each accepted by
    check_jsonl and tokenized by load_jsonl with at least one target."""
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## Dataset formats"):]
    block = re.search(r"^```jsonl\n(.*?)^```", section, re.S | re.M).group(1)
    path = tmp_path / "readme.jsonl"
    path.write_text(block)
    assert check_jsonl(str(path)) == 4
    seqs = load_jsonl(str(path), tok, 512)
    assert sorted(check_example(json.loads(line)) for line in block.splitlines()) == \
        ["input_ids", "messages", "prompt", "text"]
    assert all(s.num_loss_tokens > 0 for s in seqs)
