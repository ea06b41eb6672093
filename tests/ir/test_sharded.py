"""Sharded graph copies: local shapes, collectives on a named group, and parity with the unsharded graph when two
ranks are simulated in one process (collectives computed by hand: sum, concatenation)."""
import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from flexc.ir.vocab import InputKind, InputRef, OutputKind, OutputRef
from flexc.ir.parallel import propagate
from flexc.ir.placements import Replicate, Shard
from flexc.ir.sharded import (COLLECTIVE_OPS, GROUP_PLACEHOLDER, bind_group, collective_nodes, local_chunk,
                              make_sharded_graph)
from tests.utils import rel_err

TP = 2
C10D = torch.ops._c10d_functional
SHAPES = [(8, 64), (64, 64), (64,), (64, 64), (128, 64), (64, 128)]
PLACEMENTS = [Replicate(), Shard(0), Replicate(), Shard(1), Shard(0), Shard(1)]
"""x, q-projection (column), a per-feature scale, o-projection (row), MLP up (column), MLP down (row)."""


def _block(x, wq, s, wo, w1, w2):
    q = ((x @ wq.t()) * s).view(8, 4, 16)                    # heads split over the ranks
    a = torch.relu(q).view(8, 64) @ wo.t() + x               # row-parallel: all-reduce before the residual add
    col = a @ w1.t()
    return torch.nn.functional.silu(col) @ w2.t() + a, col   # col returned whole: all-gathered


@pytest.fixture()
def graphs():
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(s, generator=g) / s[-1] ** 0.5 for s in SHAPES]        # O(1) activations
    gm = make_fx(_block)(*inputs)
    phs = gm.graph.find_nodes(op="placeholder")
    for i, p in enumerate(phs):
        p.meta["flexc_ref"] = InputRef(kind=InputKind.USER, index=i)
    gm.graph.find_nodes(op="output")[0].meta["flexc_ref"] = [OutputRef(kind=OutputKind.USER, index=0),
                                                             OutputRef(kind=OutputKind.USER, index=1)]
    prop = propagate(gm, {p.name: pl for p, pl in zip(phs, PLACEMENTS)}, TP, outputs=lambda i, a: Replicate())
    return gm, prop, make_sharded_graph(gm, prop, TP), inputs


def _run_ranks(gm: fx.GraphModule, rank_inputs: list[list[torch.Tensor]]) -> list:
    """Run ``gm`` on every rank in lockstep; a collective sees all ranks' inputs (no process group)."""
    envs = [{} for _ in rank_inputs]
    phs = iter(range(len(rank_inputs[0])))
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            i = next(phs)
            for env, ins in zip(envs, rank_inputs):
                env[n] = ins[i]
            continue
        vals = [fx.node.map_arg((n.args, n.kwargs), lambda a, env=env: env[a]) for env in envs]
        if n.op == "output":
            return [v[0][0] for v in vals]
        if n.target is C10D.all_reduce.default:
            outs = [sum(v[0][0] for v in vals)] * len(envs)
        elif n.target is C10D.all_gather_into_tensor.default:
            outs = [torch.cat([v[0][0] for v in vals])] * len(envs)
        elif n.target is C10D.wait_tensor.default:
            outs = [v[0][0] for v in vals]
        elif n.target is local_chunk:
            outs = [args[0].chunk(args[2], args[1])[rank].contiguous() for rank, (args, _) in enumerate(vals)]
        else:
            outs = [n.target(*args, **kwargs) for args, kwargs in vals]
        for env, out in zip(envs, outs):
            env[n] = out
    raise AssertionError("graph has no output")


def _shard(t: torch.Tensor, placement, rank: int) -> torch.Tensor:
    return t.chunk(TP, placement.dim)[rank] if isinstance(placement, Shard) else t


def test_two_simulated_ranks_equal_the_unsharded_graph(graphs):
    """Each rank runs the sharded graph on its shards; with the collectives done by hand both ranks return the
    unsharded graph's outputs (the residual stream and the gathered column-parallel activation)."""
    gm, _, sharded, inputs = graphs
    ref = gm(*inputs)
    ranks = _run_ranks(sharded, [[_shard(t, p, r) for t, p in zip(inputs, PLACEMENTS)] for r in range(TP)])
    for outs in ranks:
        assert len(outs) == 2
        for out, want in zip(outs, ref):
            assert out.shape == want.shape and rel_err(out, want) < 1e-6


def test_collectives_and_local_shapes(graphs):
    """One collective per redistribution the propagation lists (two all-reduces, one all-gather, one local chunk),
    each on the placeholder group and awaited; view sizes along sharded dims become local; the original is intact."""
    gm, prop, sharded, _ = graphs
    kinds = sorted(r.kind for r in prop.redistributions)
    assert kinds == ["all_gather", "all_reduce", "all_reduce", "chunk"]
    colls = collective_nodes(sharded)
    assert sorted(str(n.target) for n in colls) == sorted(
        ["_c10d_functional.all_reduce.default"] * 2 + ["_c10d_functional.all_gather_into_tensor.default"])
    for n in colls:
        assert n.args[-1] == GROUP_PLACEHOLDER
        (user,) = n.users
        assert user.target is C10D.wait_tensor.default
    assert len([n for n in sharded.graph.nodes if n.target is local_chunk]) == 1
    views = [list(n.args[1]) for n in sharded.graph.nodes if str(n.target) == "aten.view.default"]
    assert views == [[8, 2, 16], [8, 32]]
    assert collective_nodes(gm) == [] and [list(n.args[1]) for n in gm.graph.nodes
                                           if str(n.target) == "aten.view.default"] == [[8, 4, 16], [8, 64]]


def test_copy_keeps_names_and_refs(graphs):
    """The sharded copy binds like the original: same placeholder names and flexc_ref, same output refs."""
    gm, _, sharded, _ = graphs
    old, new = gm.graph.find_nodes(op="placeholder"), sharded.graph.find_nodes(op="placeholder")
    assert [p.name for p in new] == [p.name for p in old]
    assert [p.meta["flexc_ref"] for p in new] == [p.meta["flexc_ref"] for p in old]
    assert sharded.graph.find_nodes(op="output")[0].meta["flexc_ref"] == \
        gm.graph.find_nodes(op="output")[0].meta["flexc_ref"]


def test_bind_group_renames_every_collective_in_place(graphs):
    """bind_group points every collective at the given group, in place, and the regenerated code uses it."""
    _, _, sharded, _ = graphs
    assert bind_group(sharded, "tp:ranks0-1") is sharded
    colls = collective_nodes(sharded)
    assert len(colls) == 3 and all(n.args[-1] == "tp:ranks0-1" for n in colls)
    assert GROUP_PLACEHOLDER not in sharded.code and "tp:ranks0-1" in sharded.code
    assert {str(n.target) for n in colls} <= COLLECTIVE_OPS


def test_local_chunk_without_a_process_group_is_rank_0():
    """Outside torch.distributed the process is rank 0: its chunk is the first, contiguous."""
    x = torch.arange(24.0).view(4, 6)
    out = local_chunk(x, 1, 3)
    assert torch.equal(out, x[:, :2]) and out.is_contiguous()
