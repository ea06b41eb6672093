"""AdapterRegistry: PEFT directories load as PEFT loads them, scaling folded into B gives PEFT's outputs, what does
not fit is refused by name, the stacks are the adapters' storage; adapters of any rank up to the compiled one and
any subset of its targets give PEFT's logits in one batch and train as PEFT trains them."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.adapters import AdapterRegistry, AdapterShape
from flexc.runtime.finetune import FinetuneConfig
from tests.runtime.test_finetune import _data, _peft_reference
from tests.runtime.utils import save_tiny_adapter, save_tiny_model
from tests.utils import rel_err

SPEC = LoraSpec(r=4, alpha=16)
"""The compiled adapter structure: rank 4, all seven projections, scaling 4."""


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny Llama directory and two PEFT adapters of rank 4 on three projections (scalings 2 and rsLoRA 4)."""
    root = tmp_path_factory.mktemp("adapters")
    model_dir = save_tiny_model(root, "llama", num_hidden_layers=2)
    plain = save_tiny_adapter(model_dir, str(root / "plain"), seed=1, alpha=8)
    rs = save_tiny_adapter(model_dir, str(root / "rs"), seed=2, alpha=8, targets=("k_proj", "o_proj", "up_proj"))
    cfg_path = root / "rs" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_rslora"] = True                                 # scaling alpha / sqrt(r) = 4, PEFT reads it on load
    cfg_path.write_text(json.dumps(cfg))
    return {"model": model_dir, "plain": plain, "rs": rs}


def _peft(model_dir, adapter_dir, trainable=False):
    """HF model with the PEFT adapter from ``adapter_dir`` (the base model alone for None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable).eval()


def _flexc_model(dirs, spec=SPEC):
    model = load_model(resolve_model(dirs["model"]), spec, "fp32")
    model.get_base_model().set_attn_implementation("sdpa")
    return model


def test_peft_dir_loads_peft_tensors_and_zeros_elsewhere(dirs):
    """Loaded lora_A equal the tensors PEFT loads from the directory, lora_B equal PEFT's times the scaling ratio
    (2 / 4 here), and the projections the adapter does not target hold zeros."""
    reg = AdapterRegistry(SPEC, _flexc_model(dirs), max_adapters=2)
    ad = reg.load_peft_dir("plain", dirs["plain"])
    ref = {n: p.detach() for n, p in _peft(dirs["model"], dirs["plain"]).named_parameters() if ".lora_" in n}
    assert len(ad.weights) == 2 * 7 * 2 and len(ref) == 2 * 3 * 2
    for name, w in ad.weights.items():
        if name not in ref:
            assert not w.any(), name
        elif ".lora_A." in name:
            assert torch.equal(w, ref[name]), name
        else:
            assert torch.allclose(w, ref[name] * (2 / 4), rtol=1e-6), name


@pytest.mark.parametrize("which", ["plain", "rs"])
def test_folded_scaling_gives_peft_logits(dirs, which):
    """The registry's tensors in a model compiled with another scaling (alpha 16, r 4) and all seven targets give
    PEFT's logits for the adapter as saved (alpha 8, three targets; plain and rsLoRA), within 1e-5."""
    reg = AdapterRegistry(SPEC, _flexc_model(dirs), max_adapters=2)
    ad = reg.load_peft_dir(which, dirs[which])
    model = _flexc_model(dirs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ad.weights:
                p.copy_(ad.weights[name])
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    peft = _peft(dirs["model"], dirs[which])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        ref = peft(input_ids=ids).logits
        with peft.disable_adapter():
            base = peft(input_ids=ids).logits
    assert rel_err(ours, ref) < 1e-5
    assert rel_err(base, ref) > 1e-3                         # the adapter matters


@pytest.mark.parametrize("edit,needle", [
    ({"r": 8}, "adapter rank r=8 is not served: this engine serves ranks 1 to 4"),
    ({"target_modules": ["q_proj", "lm_head"]}, "adapter targets ['lm_head'] are not in the compiled targets"),
    ({"target_modules": ".*proj"}, "target_modules as a regex ('.*proj') is not supported"),
    ({"use_dora": True}, "DoRA adapters (use_dora=true) are not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"rank_pattern": {"q_proj": 2}}, "per-module rank_pattern is not supported"),
])
def test_what_does_not_fit_is_refused_by_name(dirs, tmp_path, edit, needle):
    """An adapter config the compiled template cannot run is a ValueError naming what differs; nothing is loaded."""
    bad = tmp_path / "bad"
    shutil.copytree(dirs["plain"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg.update(edit)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    reg = AdapterRegistry(SPEC, _flexc_model(dirs), max_adapters=2)
    with pytest.raises(ValueError) as err:
        reg.load_peft_dir("bad", str(bad))
    assert needle in str(err.value) and str(bad) in str(err.value)
    assert reg.names() == []


def test_subset_of_compiled_targets_is_refused_when_compiled_narrower(dirs):
    """Compiled for q/v only, an adapter on q/v/down is refused naming down_proj; one on fewer targets fits."""
    narrow = LoraSpec(r=4, alpha=16, targets=("q_proj", "v_proj"))
    reg = AdapterRegistry(narrow, _flexc_model(dirs, narrow), max_adapters=1)
    with pytest.raises(ValueError, match=r"adapter targets \['down_proj'\] are not in the compiled targets"):
        reg.load_peft_dir("plain", dirs["plain"])
    state = {n: torch.ones(p.shape) for n, p in _flexc_model(dirs, narrow).named_parameters() if ".q_proj.lora_" in n}
    ad = reg.load_tensors("q-only", state)
    assert all(w.any() == (".q_proj." in n) for n, w in ad.weights.items())


def test_slots_are_views_of_the_stacks_updated_in_place(dirs):
    """Each adapter's tensors are views of its slot in the stacks: an in-place update (an optimizer step) is what
    the stack holds; re-registering a name keeps its slot; a full registry refuses a new name."""
    reg = AdapterRegistry(SPEC, _flexc_model(dirs), max_adapters=2)
    a = reg.load_peft_dir("a", dirs["plain"])
    b = reg.create_fresh("b", seed=1, init="random")
    assert (reg.slot("a"), reg.slot("b")) == (0, 1)
    name = next(n for n in a.weights if ".lora_B." in n and ".q_proj." in n)
    stack = reg.stack(name)
    assert stack.shape == (2, *a.weights[name].shape)
    assert a.weights[name].data_ptr() == stack[0].data_ptr() and b.weights[name].data_ptr() == stack[1].data_ptr()
    with torch.no_grad():
        a.weights[name].add_(1.0)
    assert torch.equal(stack[0], a.weights[name])
    with pytest.raises(ValueError, match="max_adapters=2; remove one first"):
        reg.create_fresh("c")
    again = reg.load_peft_dir("a", dirs["rs"])
    assert again.slot == 0 and again.version > b.version
    assert torch.equal(stack[0], again.weights[name])


def test_removed_adapter_keeps_private_copies(dirs):
    """Removing an adapter gives the tensors a job may still hold private copies: the values stay, and a new
    adapter taking the slot does not write into them."""
    reg = AdapterRegistry(SPEC, _flexc_model(dirs), max_adapters=1)
    held = reg.load_peft_dir("a", dirs["plain"]).weights             # what a finetuning job keeps a reference to
    before = {n: w.clone() for n, w in held.items()}
    reg.remove("a")
    reg.create_fresh("b", seed=5, init="random")
    for n, w in held.items():
        assert w.data_ptr() != reg.stack(n)[0].data_ptr()
        assert torch.equal(w, before[n]), n
    with pytest.raises(ValueError, match=r"unknown adapter 'a'; loaded adapters: \['b'\]"):
        reg.get("a")


# ---------------------------------------------------------------- ranks up to the compiled one, one batch, training
# two ranks below the compiled 8 and the compiled rank itself, three target sets, three scalings
ADAPTERS = {"low": dict(seed=1, r=2, alpha=16, targets=("q_proj", "v_proj", "down_proj")),
            "mid": dict(seed=2, r=4, alpha=2, targets=("o_proj", "gate_proj", "up_proj")),
            "full": dict(seed=3, r=8, alpha=8, targets=("k_proj",))}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny llama served by an engine built with max_lora_rank=8 (no lora=), and PEFT adapter directories."""
    root = tmp_path_factory.mktemp("ranks")
    d = save_tiny_model(root, "llama", num_hidden_layers=2)
    dirs = {n: save_tiny_adapter(d, str(root / n), **kw) for n, kw in ADAPTERS.items()}
    engine = flexc.Engine.from_pretrained(d, max_lora_rank=8, max_adapters=4, kv_cache_tokens=1024,
                                          policy="temporal")
    for n, path in dirs.items():
        engine.load_adapter(n, path)
    return d, dirs, engine


def test_ranks_and_target_sets_in_one_batch_match_peft(served):
    """Requests for adapters of ranks 2, 4 and 8 on three different target sets, and for none, run in ONE batch
    and each gets PEFT's logits for its adapter (1e-5, fp32)."""
    d, dirs, engine = served
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


def test_own_coordinates_and_refusals(served, tmp_path):
    """The stack holds an adapter padded and folded; own_weights gives back PEFT's tensors; save_adapter writes
    the adapter's own rank and alpha; a rank above the compiled one, another PEFT type or a bad tensor dtype is a
    ValueError naming it."""
    d, dirs, engine = served
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
def test_finetuning_a_padded_folded_adapter_equals_peft(served, optimizer):
    """Finetuning the rank-2 adapter whose scaling (alpha 16 / r 2 = 8) differs from the compiled one (1), zero-
    padded to rank 8: the engine's steps (trained in the adapter's own coordinates) equal PEFT training that
    adapter with loss.backward(); the padding and the untargeted projections stay exactly zero."""
    d, dirs, engine = served
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
