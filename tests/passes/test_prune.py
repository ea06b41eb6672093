"""The prune pass: every strategy's graphs give PEFT's gradients; decisions, budgets and the head's saved set."""
import pytest
import torch

from flexc.ir.graph import DECISION, Decision
from flexc.passes.manager import PassContext
from flexc.runtime.measure import measure_saved_bytes
from flexc.ir.vocab import evaluate_at
from flexc.passes.joint import JointAnalysis
from flexc.passes.prune import (STRATEGIES, parse_budget, parse_recompute_budget, partition_region, prune)
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


# ---------------------------------------------------------------------------------------------- the sweep
def _at(e, seq_len=16):
    return evaluate_at(e, seq_len)


def test_sweep_is_monotone_between_fewest_bytes_and_pruned(tiny_llama):
    """Along the sweep (ascending price, contiguous price intervals from 0 to inf) recompute falls and saved bytes
    rise strictly: more recompute never keeps more bytes. The no-recompute end is the 'pruned' plan; the other end
    keeps checkpoint's bytes for at most checkpoint's recompute."""
    rep = tiny_llama.cm.passes[0].report
    assert set(rep.sweeps) == {"layer.0", "head"}
    for name, points in rep.sweeps.items():
        plans = rep.regions[name]
        assert len(points) >= 3 and points[0].price_low == 0 and points[-1].price_high == float("inf")
        for a, b in zip(points, points[1:]):
            assert a.price_low < a.price_high == b.price_low
            assert _at(a.plan.recompute_flops) > _at(b.plan.recompute_flops)
            assert _at(a.plan.saved_bytes) < _at(b.plan.saved_bytes)
        assert points[-1].plan.recomputed == plans["pruned"].recomputed
        assert _at(points[-1].plan.saved_bytes) == _at(plans["pruned"].saved_bytes)
        assert _at(points[0].plan.saved_bytes) == _at(plans["checkpoint"].saved_bytes)
        assert _at(points[0].plan.recompute_flops) <= _at(plans["checkpoint"].recompute_flops)


def test_sweep_holds_the_min_cut_of_every_price(tiny_llama):
    """An independent min cut at each of 40 prices from 1e-9 to 1e3 bytes/FLOP recomputes exactly what the sweep
    point whose price interval holds that price recomputes (the breakpoint search misses no saved set)."""
    rep = tiny_llama.cm.passes[0].report
    for name, points in rep.sweeps.items():
        an = JointAnalysis(tiny_llama.cm.graph.regions[name], 16, merge=True)
        need = an.needed()
        for k in range(40):
            price = 10 ** (-9 + 12 * k / 39)
            (pt,) = [p for p in points if p.price_low < price < p.price_high]
            if min(price / pt.price_low if pt.price_low else 2, pt.price_high / price) < 1 + 1e-6:
                continue                                     # on a breakpoint: both neighbours are min cuts
            plan = an.plan("check", an.min_cut(need, price), need)[0]
            assert plan.recomputed == pt.plan.recomputed, (name, price)


@pytest.mark.parametrize("fraction", [0.0, 0.35])
def test_recompute_budget_choice_is_the_curves_best(tiny_llama, fraction):
    """For a recompute budget the installed plan is a point of the sweep: the one with the fewest saved bytes whose
    recompute stays within the budget's share of the region's training FLOPs (on top of the LoRA branches' own
    recompute, which every point has: they are never saved)."""
    rep = tiny_llama.cm.passes[0].report
    for name, points in rep.sweeps.items():
        _, _, plan = partition_region(tiny_llama.cm.graph.regions[name], "pruned_remat", 16,
                                      recompute_fraction=fraction)
        limit = fraction * _at(plan.train_flops) + _at(points[-1].plan.recompute_flops)
        within = [p for p in points if _at(p.plan.recompute_flops) <= limit]
        best = min(within, key=lambda p: _at(p.plan.saved_bytes))
        assert plan.recomputed == best.plan.recomputed and _at(plan.recompute_flops) <= limit
        assert plan.price is not None and best.price_low <= plan.price <= best.price_high
    chosen = rep.regions["layer.0"]["pruned_remat"]          # what the compile installed (default budget)
    assert any(p.plan.recomputed == chosen.recomputed for p in rep.sweeps["layer.0"])


def test_byte_budget_choice_is_the_least_recompute_that_fits(tiny_llama):
    """For a byte budget the plan is the sweep point with the least recompute among those within the budget."""
    rep = tiny_llama.cm.passes[0].report
    for name, points in rep.sweeps.items():
        _, _, plan = partition_region(tiny_llama.cm.graph.regions[name], "pruned_remat", 16, budget="1KiB")
        fits = [p for p in points if _at(p.plan.saved_bytes) / 16 <= 1024]
        assert fits and plan.recomputed == min(fits, key=lambda p: _at(p.plan.recompute_flops)).plan.recomputed


@pytest.mark.parametrize("value,expected", [(0.3, 0.3), ("0.3", 0.3), ("30%", 0.3), (0, 0.0), ("1", 1.0)])
def test_recompute_budget_forms(value, expected):
    """A recompute budget is a fraction of training FLOPs in [0, 1], as a number, a numeric string or a percent."""
    assert parse_recompute_budget(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", [1.5, -0.1, "lots", "nan", "120%", True, None])
def test_bad_recompute_budget_is_a_value_error(value):
    """Anything else is refused, naming the value and the allowed range."""
    with pytest.raises(ValueError, match=r"recompute_budget .*expected a fraction of training FLOPs in \[0, 1\]"):
        parse_recompute_budget(value)
