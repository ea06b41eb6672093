"""The capture cache: a compile loaded from it is the compile captured afresh (same graphs, same plan, PEFT's
numbers at run time), and it never serves a capture made for other inputs or from a damaged entry."""
import json
import logging
import os

import pytest
import torch

import flexc
from flexc.capture_cache import CaptureCache, capture_key
from flexc.cli import main as cli_main
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from tests.runtime.test_regions import LENS, _parity
from tests.utils import randomize_lora, rel_err, write_config

pytestmark = pytest.mark.xdist_group("capture_cache")     # one worker: each test starts from what the one before left


def _rounded(x):
    """A plan with floats at 9 significant digits (sums over sets of nodes may be added in another order)."""
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items() if k not in ("seconds", "compile_seconds")}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return float(f"{x:.9g}") if isinstance(x, float) else x


def _loaded(cm) -> list[str]:
    return [name for name, r in cm.graph.regions.items() if "load" in r.captured.seconds]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One capture cache for this file's tests (in their order: each starts from what the one before left)."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("capture-cache")
    mp.setenv("FLEXC_CACHE_DIR", str(path))
    mp.delenv("FLEXC_CAPTURE_CACHE", raising=False)
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("config"), "qwen2")


SPEC = LoraSpec(r=4, alpha=8)
CLI_ARGS = ["--lora-r", "4", "--lora-alpha", "8", "--seq-len", "16"]


def test_loaded_compile_equals_fresh_and_matches_peft(config, cache_dir, monkeypatch):
    """The second compile loads all four regions and the model's facts, and builds no model; graphs and plan
    equal the first; run with real weights the loaded graphs give PEFT's logits (1e-5) and LoRA gradients
    (1e-4)."""
    src = resolve_model(config)
    fresh = flexc.compile(src, lora=SPEC, seq_len=16)

    def no_model(*args, **kwargs):
        raise AssertionError("a compile served from the cache built a model")
    monkeypatch.setattr(flexc.compiler, "build_fake_templates", no_model)
    loaded = flexc.compile(src, lora=SPEC, seq_len=16)
    monkeypatch.undo()
    assert _loaded(fresh) == [] and _loaded(loaded) == ["embed", "layer.0", "head", "logits"]
    assert sorted(os.path.splitext(e)[1] for e in os.listdir(cache_dir / "captures")) == [".json"] + [".pkl"] * 4
    for name, r in fresh.graph.regions.items():
        other = loaded.graph.regions[name]
        assert r.fw.code == other.fw.code, name
        assert (r.bw is None) == (other.bw is None) and (r.bw is None or r.bw.code == other.bw.code), name
    assert _rounded(fresh.plan()) == _rounded(loaded.plan())
    model = load_model(src, SPEC, "fp32", seed=3)
    randomize_lora(model)
    logits, ref_logits, step, ref_grads, ref_loss = _parity(loaded, model, LENS, src.config.vocab_size)
    assert rel_err(logits, ref_logits) < 1e-5
    assert torch.allclose(step.loss_sum, ref_loss, rtol=1e-5)
    assert max(rel_err(step.grads[k], g) for k, g in ref_grads.items()) < 1e-4


def test_other_inputs_get_other_keys():
    """Each input of a capture is in its key: region, config, LoRA spec, dtype, training, example shapes."""
    base = {"region": "layer.0", "kind": "layer", "config": {"hidden_size": 64}, "lora": {"r": 4},
            "dtype": "fp32", "trainable": True, "args": [[[16, 64], "torch.float32", True]]}
    variants = [{"region": "layer.1"}, {"config": {"hidden_size": 128}}, {"lora": {"r": 8}}, {"lora": None},
                {"dtype": "bf16"}, {"trainable": False}, {"args": [[[32, 64], "torch.float32", True]]}]
    keys = {capture_key(base)} | {capture_key({**base, **v}) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert capture_key(dict(base)) == capture_key(base)


def test_cli_says_what_it_loaded_and_no_cache_keeps_out(config, cache_dir, tmp_path, monkeypatch, capsys):
    """``flexc compile`` of what the test above compiled loads every region and says so; ``--no-cache`` captures
    afresh and leaves the cache as it was; ``FLEXC_CAPTURE_CACHE=0`` and ``cache=False`` turn it off."""
    args = [config, *CLI_ARGS, "-o", str(tmp_path / "plan.json")]
    before = {e.name: e.stat().st_mtime_ns for e in (cache_dir / "captures").iterdir()}
    assert cli_main(["compile", *args]) == 0
    assert "(4 of 4 regions loaded from the capture cache)" in capsys.readouterr().out
    assert cli_main(["compile", *args, "--no-cache"]) == 0
    assert "capture cache" not in capsys.readouterr().out
    assert {e.name: e.stat().st_mtime_ns for e in (cache_dir / "captures").iterdir()} == before
    assert json.loads((tmp_path / "plan.json").read_text())["model"]["num_layers"] == 3
    assert CaptureCache.default().directory == str(cache_dir / "captures")
    assert CaptureCache.default(enabled=False).directory is None
    monkeypatch.setenv("FLEXC_CAPTURE_CACHE", "0")
    assert CaptureCache.default().directory is None


def test_every_seq_len_shares_one_capture(config, cache_dir, monkeypatch):
    """The token count is symbolic in the graphs: a compile for another ``seq_len`` loads what the tests above
    captured, and capturing with another example token count gives the same graphs and the same plan."""
    shared = flexc.compile(config, lora=SPEC, seq_len=40)
    assert _loaded(shared) == ["embed", "layer.0", "head", "logits"]
    monkeypatch.setattr(flexc.compiler, "CAPTURE_TOKENS", 16)
    other = flexc.compile(config, lora=SPEC, seq_len=40, cache=False)
    for name, r in shared.graph.regions.items():
        o = other.graph.regions[name]
        assert r.fw.code == o.fw.code and (r.bw is None or r.bw.code == o.bw.code), name
    assert _rounded(shared.plan()) == _rounded(other.plan())


def test_damaged_entry_is_captured_again(config, cache_dir, caplog):
    """An entry that does not load (a region's, the model facts') costs a capture (with a warning), never a compile,
    and is rewritten; the other entries still load."""
    src = resolve_model(config)
    model = {"config": src.config.to_dict(), "lora": SPEC.to_dict(), "dtype": "fp32"}
    ids = [[flexc.compiler.CAPTURE_TOKENS], "torch.int64", False]       # the embed region's (ids, positions)
    embed_key = capture_key({**model, "region": "embed", "kind": "embed", "trainable": False, "args": [ids, ids]})
    embed = cache_dir / "captures" / f"{embed_key}.pkl"
    facts = cache_dir / "captures" / f"{capture_key({**model, 'region': 'model facts'})}.json"
    assert embed.is_file() and facts.is_file()
    for e in (embed, facts):
        e.write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="flexc.capture_cache"):
        cm = flexc.compile(src, lora=SPEC, seq_len=16)
    assert _loaded(cm) == ["layer.0", "head", "logits"] and caplog.text.count("ignoring") == 2
    assert embed.read_bytes() != b"not a pickle" and json.loads(facts.read_text())["members"] == [[0, 1, 2]]
    assert _loaded(flexc.compile(src, lora=SPEC, seq_len=16)) == ["embed", "layer.0", "head", "logits"]
