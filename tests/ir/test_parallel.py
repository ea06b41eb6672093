"""Parallel states: placements, propagation rules and the redistributions they imply (no processes)."""
import dataclasses

import pytest
import sympy
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from flexc.ir.parallel import propagate
from flexc.ir.placements import NoRuleError, Partial, Replicate, Shard
from flexc.ir.sharded import collective_nodes, make_sharded_graph


def _graph(fn, *shapes):
    return make_fx(fn)(*[torch.randn(s) for s in shapes])


def _names(gm):
    return [n.name for n in gm.graph.find_nodes(op="placeholder")]


def _mlp(x, w1, w2):
    return torch.relu(x @ w1.t()) @ w2.t() + x


def test_placements_are_frozen_and_serializable():
    """Replicate/Shard/Partial are frozen values with a JSON-friendly to_dict."""
    assert Shard(1) == Shard(1) and Shard(0) != Shard(1)
    assert Shard(1).to_dict() == {"type": "shard", "dim": 1}
    assert Replicate().to_dict() == {"type": "replicate"} and Partial().to_dict()["type"] == "partial"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Shard(0).dim = 1


def test_megatron_mlp_needs_one_all_reduce():
    """Column- then row-parallel matmuls give a Partial that one all-reduce turns Replicate at the residual add."""
    gm = _graph(lambda x, w1, w2: (torch.ops.aten.silu(x @ w1.t()) @ w2.t() + x,), (8, 4), (6, 4), (4, 6))
    x, w1, w2 = _names(gm)
    prop = propagate(gm, {x: Replicate(), w1: Shard(0), w2: Shard(1)}, 2,
                     outputs=lambda i, a: Replicate())
    assert [(r.kind, str(r.src), str(r.dst)) for r in prop.redistributions] == [("all_reduce", "P", "R")]
    assert prop.comm_bytes() == sympy.Integer(8 * 4 * 4)          # 2*(tp-1)/tp * 8*4 fp32
    sharded = make_sharded_graph(gm, prop, 2)
    assert len(collective_nodes(sharded)) == 1


def test_replicated_weights_need_no_communication():
    """With every input replicated nothing is redistributed and the sharded copy has no collective."""
    gm = _graph(lambda x, w1, w2: (_mlp(x, w1, w2),), (8, 4), (6, 4), (4, 6))
    prop = propagate(gm, {}, 2, outputs=lambda i, a: Replicate())
    assert prop.redistributions == []
    assert collective_nodes(make_sharded_graph(gm, prop, 2)) == []


def test_view_carries_shard_across_split_dims():
    """A view that splits a sharded hidden dim into (heads, head_dim) shards the heads dim."""
    gm = _graph(lambda x: (x.view(8, 4, 16).sum(-1),), (8, 64))
    (x,) = _names(gm)
    prop = propagate(gm, {x: Shard(1)}, 2)
    view = next(n for n in gm.graph.nodes if n.op == "call_function" and "view" in str(n.target))
    assert prop.placements[view.name] == Shard(1)
    assert prop.redistributions == []


def test_op_without_rule_is_an_error_naming_it():
    """An op no rule covers raises NoRuleError with the op's name, not a silent guess."""
    gm = _graph(lambda x: (torch.cumsum(x, 0),), (4, 4))
    with pytest.raises(NoRuleError, match="aten.cumsum"):
        propagate(gm, {}, 2)


def test_flops_count_split_work_once_per_rank():
    """A propagation's FLOPs are each node's FLOPs, divided by tp where the node's work is split over the ranks,
    whether a count is a polynomial in T (summed as exact coefficients) or not (summed with sympy)."""
    from types import SimpleNamespace

    from flexc.ir.graph import NODE_INFO
    from flexc.ir.vocab import TOKEN_SYMBOL as T
    gm = _graph(lambda x, w1, w2: (torch.ops.aten.silu(x @ w1.t()) @ w2.t() + x,), (8, 4), (6, 4), (4, 6))
    x, w1, w2 = _names(gm)
    s = sympy.Symbol("S", positive=True)
    mm1, mm2 = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == "aten.mm.default"]
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == "aten.add.Tensor")
    mm1.meta[NODE_INFO] = SimpleNamespace(flops=48 * T + sympy.Rational(1, 3) * T ** 2, shape=None)
    mm2.meta[NODE_INFO] = SimpleNamespace(flops=48 * T + s, shape=None)
    add.meta[NODE_INFO] = SimpleNamespace(flops=4 * T, shape=None)
    split = propagate(gm, {x: Replicate(), w1: Shard(0), w2: Shard(1)}, 2, outputs=lambda i, a: Replicate())
    assert sympy.expand(split.flops - ((96 * T + sympy.Rational(1, 3) * T ** 2 + s) / 2 + 4 * T)) == 0
    whole = propagate(gm, {}, 2, outputs=lambda i, a: Replicate())
    assert sympy.expand(whole.flops - (100 * T + sympy.Rational(1, 3) * T ** 2 + s)) == 0
