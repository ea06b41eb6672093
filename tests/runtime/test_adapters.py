"""Adapters of any rank up to the compiled one and any subset of its targets: PEFT's logits and PEFT's training."""
import json

import pytest
import torch
from safetensors.torch import load_file

import flexc
from flexc.runtime.adapters import AdapterShape
from flexc.runtime.finetune import FinetuneConfig
from tests.runtime.test_finetune import _data, _peft_reference
from tests.runtime.utils import save_tiny_adapter, save_tiny_model
from tests.utils import rel_err

# two ranks below the compiled 8 and the compiled rank itself, three target sets, three scalings (one rsLoRA)
ADAPTERS = {"low": dict(seed=1, r=2, alpha=16, targets=("q_proj", "v_proj", "down_proj")),
            "mid": dict(seed=2, r=4, alpha=2, targets=("o_proj", "gate_proj", "up_proj")),
            "full": dict(seed=3, r=8, alpha=8, targets=("k_proj",))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny llama served by an engine built with max_lora_rank=8 (no lora=), and PEFT adapter directories."""
    root = tmp_path_factory.mktemp("ranks")
    d = save_tiny_model(root, "llama", num_hidden_layers=2)
    dirs = {n: save_tiny_adapter(d, str(root / n), **kw) for n, kw in ADAPTERS.items()}
    engine = flexc.Engine.from_pretrained(d, max_lora_rank=8, max_adapters=4, kv_cache_tokens=1024,
                                          policy="temporal")
    for n, path in dirs.items():
        engine.load_adapter(n, path)
    return d, dirs, engine


def _peft(model_dir, adapter_dir, trainable=False):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return m if adapter_dir is None else PeftModel.from_pretrained(m, adapter_dir, is_trainable=trainable).eval()


def test_ranks_and_target_sets_in_one_batch_match_peft(setup):
    """Requests for adapters of ranks 2, 4 and 8 on three different target sets, and for none, run in ONE batch
    and each gets PEFT's logits for its adapter (1e-5, fp32)."""
    d, dirs, engine = setup
    ex = engine.executor
    got, batches = {}, []
    sample, execute = ex._sample, ex.execute
    ex._sample = lambda logits, ss: got.update(zip((s.req_id for s in ss), logits)) or sample(logits, ss)
    ex.execute = lambda b, ft=None: batches.append({s.adapter_id for s in b.seqs}) or execute(b, ft)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (6, 11, 4, 9, 7)]
    names = ["low", "mid", None, "full", "low"]
    try:
        rids = [engine.submit(p, adapter=a, max_new_tokens=1) for p, a in zip(prompts, names)]
        engine.step()
    finally:
        del ex._sample, ex.execute
    assert batches == [{"low", "mid", None, "full"}]
    for rid, p, a in zip(rids, prompts, names):
        with torch.no_grad():
            want = _peft(d, dirs.get(a))(input_ids=torch.tensor([p])).logits[0, -1]
        assert rel_err(got[rid], want) < 1e-5, a
        engine.result(rid)
    assert rel_err(got[rids[0]], got[rids[2]]) > 1e-3 and rel_err(got[rids[1]], got[rids[2]]) > 1e-3


def test_own_coordinates_and_refusals(setup, tmp_path):
    """The stack holds an adapter padded and folded; own_weights gives back PEFT's tensors; save_adapter writes
    the adapter's own rank and alpha; a rank above the compiled one, another PEFT type or a bad tensor dtype is a
    ValueError naming it."""
    d, dirs, engine = setup
    reg = engine.adapters
    ad = reg.get("low")
    assert ad.shape == AdapterShape(r=2, alpha=16, targets=("q_proj", "v_proj", "down_proj"))
    peft_state = load_file(f"{dirs['low']}/adapter_model.safetensors")
    own = reg.own_weights("low")
    assert len(own) == len(peft_state)
    for n, w in own.items():
        ref = peft_state[n.replace(".default.", ".")]
        assert rel_err(w, ref) < 1e-6, n
        full = ad.weights[n]
        pad = full[2:] if ".lora_A." in n else full[:, 2:]
        assert not pad.any()
    assert not ad.weights[next(n for n in ad.weights if ".k_proj.lora_A." in n)].any()   # untargeted: zero
    engine.save_adapter("low", str(tmp_path / "saved"))
    cfg = json.load(open(tmp_path / "saved" / "adapter_config.json"))
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["down_proj", "q_proj",
                                                                                           "v_proj"]
    with pytest.raises(ValueError, match="rank r=16 is not served: this engine serves ranks 1 to 8"):
        engine.load_adapter("big", save_tiny_adapter(d, str(tmp_path / "big"), seed=5, r=16))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        engine.load_adapter("bad", str(bad))
    ints = {n: torch.ones_like(w, dtype=torch.int32) for n, w in own.items()}
    with pytest.raises(ValueError, match="dtype torch.int32"):
        reg.load_tensors("ints", ints)
    assert "big" not in reg and "bad" not in reg and "ints" not in reg


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_finetuning_a_padded_folded_adapter_equals_peft(setup, optimizer):
    """Finetuning the rank-2 adapter whose scaling (alpha 16 / r 2 = 8) differs from the compiled one (1), zero-
    padded to rank 8: the engine's steps (trained in the adapter's own coordinates) equal PEFT training that
    adapter with loss.backward(); the padding and the untargeted projections stay exactly zero."""
    d, dirs, engine = setup
    data = _data(3, seed=7)
    cfg = FinetuneConfig(optimizer=optimizer, lr=0.01 if optimizer == "adamw" else 0.5, weight_decay=0.0)
    name = f"ft-{optimizer}"
    job = engine.finetune(data, adapter=name, init_adapter=dirs["low"], optimizer=cfg.optimizer, lr=cfg.lr)
    engine.run_until_idle()
    assert job.status == "completed" and job.step == 3
    ref, _ = _peft_reference(_peft(d, dirs["low"], trainable=True), data, cfg)
    own = engine.adapters.own_weights(name)
    start = load_file(f"{dirs['low']}/adapter_model.safetensors")
    for n, w in own.items():
        assert rel_err(w, ref[n]) < 1e-4, n
        assert rel_err(w, start[n.replace(".default.", ".")]) > 1e-4, n        # it did train
    ad = engine.adapters.get(name)
    for n, w in ad.weights.items():
        targeted = any(f".{t}." in n for t in ad.shape.targets)
        rest = (w[2:] if ".lora_A." in n else w[:, 2:]) if targeted else w
        assert not rest.any(), n
    engine.unload_adapter(name)
