"""The memory plan: predicted saved bytes equal what real tensors hold; the 8B target read from plan.json."""
import json

import pytest

import flexc
from flexc.ir.spec import LoraSpec
from flexc.passes.manager import PassContext
from flexc.passes.memory import memory, model_saved_bytes
from flexc.runtime.measure import measure_autograd_bytes
from flexc.ir.vocab import evaluate_at
from flexc.passes.prune import STRATEGIES
from tests.utils import rel_err, write_config


def _predicted(t, strategy):
    plans = t.cm.passes[0].report.regions
    return evaluate_at(model_saved_bytes(t.cm.graph, plans, strategy), len(t.batch[0]))


@pytest.mark.parametrize("arch,dtype", [("llama", "fp32"), ("qwen2", "fp32"), ("llama", "bf16")])
def test_predicted_bytes_equal_measured(tiny, arch, dtype):
    """For every strategy, the predicted bytes held for the backward are within 2% of the measured storages."""
    t = tiny(arch, dtype)
    for strategy in STRATEGIES:
        if strategy == "autograd":
            measured = measure_autograd_bytes(t.model, t.batch).saved_bytes    # PyTorch's own autograd
        else:
            measured = t.measured(strategy).saved_bytes             # the strategy's graphs on real tensors
        predicted = _predicted(t, strategy)
        assert abs(measured - predicted) <= 0.02 * measured, (strategy, predicted, measured)


def test_autograd_measurement_is_peft_backward(tiny):
    """The hooked eager run is an ordinary PEFT backward: its gradients equal the reference's."""
    t = tiny("llama")
    m = measure_autograd_bytes(t.model, t.batch)
    assert max(rel_err(m.grads[k], g) for k, g in t.ref_grads.items()) < 1e-5


def test_plan_has_memory_sections(tiny):
    """plan.json's memory has every strategy, per-region peaks and, with device memory, KV tokens left."""
    t = tiny("llama")
    plan = json.loads(json.dumps(t.cm.plan()))
    mem = plan["memory"]
    assert set(mem["strategies"]) == set(STRATEGIES)
    for s in mem["strategies"].values():
        assert s["activation_bytes"] > 0 and s["recompute_flops"] >= 0
    assert mem["strategies"]["autograd"]["recompute_flops"] == 0
    assert mem["regions"]["layer.0"]["num_layers"] == 3 and mem["regions"]["layer.0"]["backward_peak_bytes"] > 0
    ctx = PassContext(options={"seq_len": 16, "device_memory": 2**30}, results={"prune": t.cm.passes[0].report})
    rep = memory(t.cm.graph, ctx)
    assert rep.kv_tokens_for_inference == (2**30 - sum(v for k, v in rep.breakdown.items()
                                                       if k not in ("kv_cache", "free"))) // rep.kv_cache_bytes_per_token
    with pytest.raises(ValueError, match="device_memory"):
        memory(t.cm.graph, PassContext(options={"device_memory": -1}, results={"prune": t.cm.passes[0].report}))


def test_llama_8b_target_from_plan_json(tmp_path):
    """llama-3.1-8b, bf16, r=16 on all linears, 8192 tokens: pruned_remat <= 20% of autograd bytes and
    recomputes <= 20% of the training FLOPs, both read from plan.json."""
    cm = flexc.compile("llama-3.1-8b", lora=LoraSpec(r=16, alpha=16), seq_len=8192)
    cm.save_plan(str(tmp_path / "plan.json"))
    s = json.loads((tmp_path / "plan.json").read_text())["memory"]["strategies"]
    assert s["pruned_remat"]["activation_bytes"] <= 0.2 * s["autograd"]["activation_bytes"]
    assert s["pruned_remat"]["recompute_flops"] <= 0.2 * s["pruned_remat"]["train_flops"]
    assert s["autograd"]["activation_bytes"] > 70 * 2**30     # the honest baseline: fp32 log-probs, 3 fp32 copies


def test_inference_only_plan(tmp_path):
    """Without adapters the plan has no strategies, and the whole device memory past the weights is KV cache."""
    cm = flexc.compile(write_config(tmp_path, "llama"), lora=None, seq_len=16, device_memory=2**24)
    mem = cm.plan()["memory"]
    assert mem["strategies"] == {} and mem["breakdown"]["activations"] == 0
    assert mem["kv_tokens_for_inference"] == (2**24 - mem["base_weight_bytes"]) // mem["kv_cache_bytes_per_token"]


def test_whole_model_curve_runs_from_checkpoint_bytes_to_pruned(tiny_llama):
    """plan.json's memory.pareto: ascending in price, recompute falls and bytes rise strictly; its ends are the
    memory plan's 'pruned' (bytes and FLOPs) and checkpoint's bytes (for at most checkpoint's recompute); the
    installed plan lies on or above the curve (its regions may choose at different prices)."""
    mem = tiny_llama.cm.plan()["memory"]
    curve, strategies = mem["pareto"], mem["strategies"]
    for a, b in zip(curve, curve[1:]):
        assert a["price_high"] == b["price_low"]
        assert a["recompute_flops"] > b["recompute_flops"] and a["activation_bytes"] < b["activation_bytes"]
    pruned, ckpt = strategies["pruned"], strategies["checkpoint"]
    assert (curve[-1]["activation_bytes"], curve[-1]["recompute_flops"]) == \
        (pruned["activation_bytes"], pruned["recompute_flops"])
    assert curve[0]["activation_bytes"] == ckpt["activation_bytes"]
    assert curve[0]["recompute_flops"] <= ckpt["recompute_flops"]
    # the no-recompute end still recomputes what only a LoRA branch computes (x @ A.T ...: never saved)
    assert 0 < curve[-1]["recompute_fraction"] < 0.05
    assert curve[-1]["recompute_fraction"] < curve[0]["recompute_fraction"] <= ckpt["recompute_fraction"]
    chosen = strategies["pruned_remat"]
    x, y = chosen["recompute_flops"], chosen["activation_bytes"]
    right = next(p for p in curve if p["recompute_flops"] <= x)            # the curve, descending in FLOPs
    left = curve[curve.index(right) - 1] if curve.index(right) else right
    if left is right:
        below = right["activation_bytes"]
    else:                                                                  # linear between the two vertices
        w = (x - right["recompute_flops"]) / (left["recompute_flops"] - right["recompute_flops"])
        below = right["activation_bytes"] + w * (left["activation_bytes"] - right["activation_bytes"])
    assert below <= y * (1 + 1e-9)
