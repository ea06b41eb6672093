"""Sharded copies of region graphs: what every rank of a tensor-parallel group runs.

:func:`make_sharded_graph` takes a graph and its :class:`~flexc.ir.parallel.Propagation`
and returns a copy with shape arguments rewritten to local sizes and functional
collectives (``torch.ops._c10d_functional``: public op namespace, no private
import) inserted where the propagation redistributes: Partial -> Replicate is
an ``all_reduce``, Shard -> Replicate an ``all_gather_into_tensor`` (along dim 0
of a moved view), Replicate -> Shard a local chunk by rank.

Invariant (tests/runtime/test_distributed.py): run on ``tp`` ranks with each
rank's shards, the sharded forward/backward graphs give the outputs and the
(sharded) gradients of the unsharded graphs.
"""
from __future__ import annotations


import torch
import torch.fx as fx

from flexc.ir.placements import Placement, Propagation, Redistribution, Shard

__all__ = ["make_sharded_graph", "collective_nodes", "bind_group", "local_chunk", "COLLECTIVE_OPS",
           "GROUP_PLACEHOLDER"]

GROUP_PLACEHOLDER = "flexc_tp"
"""Process-group name the pass writes into collectives; the runtime rebinds it (:func:`bind_group`)."""


def local_chunk(x: torch.Tensor, dim: int, tp: int) -> torch.Tensor:
    """This rank's chunk of a replicated tensor (rank of the default group: tp spans the world)."""
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return x.chunk(tp, dim)[rank].contiguous()


COLLECTIVE_OPS = frozenset({"_c10d_functional.all_reduce.default", "_c10d_functional.all_gather_into_tensor.default"})
"""Targets of the collective nodes :func:`make_sharded_graph` inserts (``wait_tensor`` nodes follow them)."""

_SHAPE_ARG_OPS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.expand.default",
                  "aten.select_backward.default", "aten.slice_backward.default"}


def collective_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The collective nodes of a graph (what a test counts)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in COLLECTIVE_OPS]


def _emit(g: fx.Graph, x: fx.Node, r: Redistribution, tp: int, group: str) -> fx.Node:
    c10d = torch.ops._c10d_functional
    aten = torch.ops.aten
    out = x
    if r.kind.startswith("all_reduce"):
        reduced = g.call_function(c10d.all_reduce.default, (out, "sum", group))
        out = g.call_function(c10d.wait_tensor.default, (reduced,))
    if r.kind.startswith("all_gather"):
        d = r.src.dim
        moved = g.call_function(aten.clone.default, (g.call_function(aten.movedim.int, (out, d, 0)),),
                                {"memory_format": torch.contiguous_format})
        gathered = g.call_function(c10d.wait_tensor.default, (
            g.call_function(c10d.all_gather_into_tensor.default, (moved, tp, group)),))
        out = g.call_function(aten.movedim.int, (gathered, 0, d))
    if r.kind.endswith("chunk"):
        out = g.call_function(local_chunk, (out, r.dst.dim, tp))
    return out


def _rewrite_shape_arg(n: fx.Node, placement: Placement, tp: int) -> None:
    if not isinstance(placement, Shard):
        return
    sizes = list(n.args[1])
    d = placement.dim
    if isinstance(sizes[d], int) and sizes[d] != -1:
        assert sizes[d] % tp == 0, f"{n.name}: dim {d} of size {sizes[d]} does not split over {tp} ranks"
        sizes[d] //= tp
        n.args = (n.args[0], sizes, *n.args[2:])


def make_sharded_graph(gm: fx.GraphModule, prop: Propagation, tp: int, group: str = GROUP_PLACEHOLDER
                       ) -> fx.GraphModule:
    """A copy of ``gm`` that each rank runs on its shards: local shape arguments, collectives inserted.

    Node names and meta (``flexc_ref`` included) are kept, so the copy binds like the original.
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_val = g.graph_copy(gm.graph, env)
    out = g.output(out_val)
    out.meta.update(gm.graph.find_nodes(op="output")[0].meta)   # flexc_ref travels with the copy
    new = {old.name: nn for old, nn in env.items()}
    for n in list(g.nodes):
        if n.op == "call_function" and str(n.target) in _SHAPE_ARG_OPS:
            _rewrite_shape_arg(n, prop.placements.get(n.name), tp)
    for r in prop.redistributions:
        src = new[r.producer]
        if not r.consumers:        # producer-side (eager reduction): every user sees the reduced value
            users = list(src.users)
            with g.inserting_before(src.next):
                red = _emit(g, src, r, tp, group)
            for u in users:
                u.replace_input_with(src, red)
            continue
        first = r.consumers[0]
        with g.inserting_before(out if first.startswith("output.") else new[first]):
            red = _emit(g, src, r, tp, group)
        for c in r.consumers:
            if c.startswith("output."):
                vals = list(out.args[0])
                vals[int(c.split(".")[1])] = red
                out.args = (tuple(vals),)
            else:
                new[c].replace_input_with(src, red)
    g.lint()
    out_gm = fx.GraphModule(gm, g)
    out_gm.meta.update(getattr(gm, "meta", {}))
    return out_gm


def bind_group(gm: fx.GraphModule, group_name: str) -> fx.GraphModule:
    """Point the collectives of a sharded graph at a process group (by name), in place."""
    for n in collective_nodes(gm):
        n.args = tuple(group_name if a == GROUP_PLACEHOLDER else a for a in n.args)
    gm.recompile()
    return gm
