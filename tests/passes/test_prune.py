"""The prune pass: every strategy's graphs give PEFT's gradients; decisions, budgets and the head's saved set."""
import pytest
import torch

from flexc.ir.graph import DECISION, Decision
from flexc.passes.manager import PassContext
from flexc.runtime.measure import measure_saved_bytes
from flexc.ir.vocab import evaluate_at
from flexc.passes.prune import STRATEGIES, parse_budget, partition_region, prune
from tests.utils import rel_err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_strategy_gives_peft_gradients(tiny, arch):
    """Loss and all 42 LoRA gradients of every strategy's graphs equal PEFT's loss.backward() (1e-4, fp32)."""
    t = tiny(arch)
    for strategy in STRATEGIES:
        m = t.measured(strategy)
        assert torch.allclose(m.loss_sum, t.ref_loss, rtol=1e-5), strategy
        assert set(m.grads) == set(t.ref_grads) and len(m.grads) == 3 * 7 * 2
        worst = max(rel_err(m.grads[k], g) for k, g in t.ref_grads.items())
        assert worst < 1e-4, (strategy, worst)


def test_installed_graphs_carry_one_decision_per_forward_node(tiny):
    """Forward nodes are tagged save/recompute/drop; recomputed copies in the backward are tagged recompute."""
    r = tiny("llama").cm.graph.regions["layer.0"]
    fw_tags = {n.name: n.meta.get(DECISION) for n in r.fw.graph.nodes if n.op == "call_function"}
    assert fw_tags and all(isinstance(v, Decision) for v in fw_tags.values())
    saved = {p.name for p in r.bw.graph.find_nodes(op="placeholder") if p.meta["flexc_ref"].kind == "saved"}
    assert all(fw_tags[n] is Decision.SAVE for n in saved if n in fw_tags)
    recomputed = [n for n in r.bw.graph.nodes if n.meta.get(DECISION) is Decision.RECOMPUTE]
    assert recomputed and all(fw_tags.get(n.name, Decision.RECOMPUTE) is Decision.RECOMPUTE for n in recomputed)


def test_backward_computes_no_frozen_weight_gradient(tiny):
    """The installed backward graphs return gradients only for LoRA weights and region inputs."""
    for name in ("layer.0", "head"):
        bw = tiny("llama").cm.graph.regions[name].bw
        refs = [r for r in bw.graph.find_nodes(op="output")[0].meta["flexc_ref"] if r.kind == "grad"]
        assert refs and all(r.of.kind == "user" or ".lora_" in r.of.target for r in refs)


def test_head_saves_no_logits(tiny):
    """No strategy's head graph keeps a tensor with a vocabulary dimension for the backward."""
    t = tiny("llama")
    vocab = t.cm.graph.model["vocab_size"]
    for strategy in ("checkpoint", "pruned", "pruned_remat"):
        fw, bw, plan = partition_region(t.cm.graph.regions["head"], strategy, 16)
        saved = {p.name for p in bw.graph.find_nodes(op="placeholder")}
        kept = [s for s in plan.saved if s.kind != "param"]             # weights are not activations
        assert kept and {s.name for s in kept} <= saved
        assert all(vocab not in s.shape for s in kept), strategy


def test_pruned_merges_peft_fp32_copies(tiny):
    """bf16 base: autograd keeps one fp32 copy of the normed input per q/k/v adapter, pruned keeps one."""
    plans = tiny("llama", "bf16").cm.passes[0].report.regions["layer.0"]
    hidden = tiny("llama", "bf16").cm.graph.model["hidden_size"]
    def copies(plan):
        return sum(1 for s in plan.saved if s.kind == "activation" and s.dtype == "float32"
                   and len(s.shape) >= 2 and s.shape[-1] == hidden and s.nbytes != 0)
    assert copies(plans["autograd"]) - copies(plans["pruned"]) >= 2
    assert evaluate_at(plans["pruned"].saved_bytes, 16) < evaluate_at(plans["autograd"].saved_bytes, 16)


@pytest.mark.parametrize("budget,installed", [("max", "pruned"), ("min", "checkpoint"), ("3KiB", "pruned_remat"),
                                              (8, "pruned_remat")])
def test_budget_selects_partition(tiny, budget, installed):
    """'max' installs pruned, 'min' checkpoint, a byte budget the least recompute that fits it (or, when
    nothing fits, the fewest bytes with budget_met False)."""
    t = tiny("qwen2")             # NOTE: changes qwen2's installed graphs; other tests partition for themselves
    graph = t.cm.graph
    rep = prune(graph, PassContext(options={"seq_len": 16, "activation_budget": budget}))
    assert rep.installed == installed and rep.budget_met == (budget != 8)
    for name, plans in rep.regions.items():
        per_token = evaluate_at(plans[installed].saved_bytes, 16) / 16
        if budget == 8:
            assert per_token <= evaluate_at(plans["checkpoint"].saved_bytes, 16) / 16
        elif isinstance(budget, int) or budget.endswith("KiB"):
            assert per_token <= parse_budget(budget)[1]
        if budget == "min":
            assert all(s.kind in ("input", "shared", "param") for s in plans[installed].saved)
    m = measure_saved_bytes(t.cm, t.model, t.batch)       # the installed graphs
    assert max(rel_err(m.grads[k], g) for k, g in t.ref_grads.items()) < 1e-4


@pytest.mark.parametrize("budget", ["lots", -5, "12XB", True])
def test_bad_budget_is_a_value_error(budget):
    """A budget that is not max/min/auto or positive bytes per token is refused, naming the value."""
    with pytest.raises(ValueError, match="activation_budget"):
        parse_budget(budget)
