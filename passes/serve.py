"""The ``serve`` pass: the serving graph of every layer template, one pass over the weights per iteration.

A co-serving iteration is one flat batch of T tokens: decodes, prefill chunks and finetuning chunks, each
sequence with its adapter (or none). The serving graph of a layer template computes all of them at once::

    serve(weights..., A/B stacks and scalings..., seg_starts, seg_adapter,
          h[T,H], cos[T,D], sin[T,D], cu_seqlens[N+1],
          k_cache, v_cache, block_tables[N,B], context_lens[N], slot_mapping[T], train_rows[Tf])
        -> (h[T,H], *saved)

It is the installed forward graph (the prune pass's partition) with three changes:

1. every LoRA branch is one ``flexc::lora`` call over the resident adapters' stacked weights
   (:func:`~flexc.passes.multi_lora.rewrite_multi_lora`): each base projection runs once for all rows, and
   each row gets its own adapter's delta (the adapters being trained included: their stacks are the live
   weights);
2. ``flexc::attention`` becomes ``flexc::paged_attention``, which writes the new K/V into this layer's cache
   (declared as mutated) and attends over it: the cache, block tables, context lengths and slot mapping are
   arguments, nothing is read from elsewhere;
3. every value the backward needs is returned for the finetuning rows only (``index_select`` of its token
   dimension at ``train_rows``), so inference rows pay for nothing but the shared computation. Sizes and
   ``cu_seqlens`` are returned as they are (the activation store evaluates them for the whole sequence).

The pass also builds the serving form of the logits region (tp = 1): its vocabulary projection
``mm(h, t(lm_head.weight))`` becomes ``flexc::skinny_mm`` (:mod:`flexc.kernels.matmul`), which a decode
batch's few rows run several times faster on a CPU.

With tensor parallelism (the ``parallelize`` pass ran), the same is built from each sharded forward graph:
the ranks run the same serving graphs, sharded. The runtime binds inputs by the placeholders' kinds
(:class:`~flexc.ir.vocab.InputKind`) and runs the graphs; it rewrites none.

Invariant (tests/passes/test_serve.py, tests/runtime/test_executor.py): run over a batch, the serving graph
gives every request its adapter's outputs (PEFT's within 1e-5) and each finetuning sequence the rows of the
installed forward graph's saved values.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch
import torch.fx as fx

import flexc.kernels.attention  # noqa: F401  (registers flexc::attention and flexc::paged_attention)
import flexc.kernels.matmul  # noqa: F401  (registers flexc::skinny_mm)
from flexc.ir.graph import CompiledGraph, value_bytes
from flexc.ir.program import RegionProgram
from flexc.ir.saved import SlotKind, saved_slots
from flexc.ir.vocab import CapturedRegion, InputKind, InputRef, OutputKind, OutputRef, evaluate_at
from flexc.passes.manager import PassContext, define_pass
from flexc.passes.multi_lora import rewrite_multi_lora
from flexc.passes.serve_summary import serving_summary_lines

logger = logging.getLogger(__name__)

__all__ = ["serve", "ServeReport", "ServingGraphInfo", "build_serving_graph", "build_serving_logits",
           "serving_summary_lines", "PAGED_INPUTS"]

_aten = torch.ops.aten
PAGED_INPUTS = (InputKind.K_CACHE, InputKind.V_CACHE, InputKind.BLOCK_TABLES, InputKind.CONTEXT_LENS,
                InputKind.SLOT_MAPPING)
"""The paged-cache placeholders of a serving graph, in ``flexc::paged_attention``'s argument order."""


@dataclasses.dataclass(kw_only=True)
class ServingGraphInfo:
    """One layer template's serving graph, as plan.json shows it."""

    num_nodes: int
    placeholders: dict[str, int]
    """Placeholders by kind (param, lora_A_stack, k_cache, train_rows, ...)."""
    lora_linears: list[str]
    """Adapted linears whose branch is one ``flexc::lora`` call."""
    saved_outputs: int
    """Values returned for the backward (finetuning rows of token tensors, sizes, cu_seqlens)."""
    saved_rows_outputs: int
    """Of those, token tensors sliced to the finetuning rows."""
    saved_bytes_per_finetuning_token: float
    """Bytes the finetuning rows of one token add to the outputs (what the activation store keeps per layer)."""


@dataclasses.dataclass(kw_only=True)
class ServeReport:
    """What the pass built; the GraphModules themselves are left out of plan.json."""

    modified: bool
    regions: dict[str, ServingGraphInfo] = dataclasses.field(default_factory=dict)
    """Layer template -> its serving graph."""
    sharded_regions: list[str] = dataclasses.field(default_factory=list)
    """Templates that also have a sharded serving graph (tp > 1)."""
    graphs: dict[str, fx.GraphModule] = dataclasses.field(default_factory=dict)
    """Layer template -> serving graph (tp = 1)."""
    sharded: dict[str, fx.GraphModule] = dataclasses.field(default_factory=dict)
    """Layer template -> serving graph of one tensor-parallel rank (built from the sharded forward graph)."""
    logits: Optional[fx.GraphModule] = None
    """The logits region's forward with its vocabulary projection as ``flexc::skinny_mm`` (tp = 1)."""

    def to_dict(self) -> dict:
        return {"modified": self.modified, "sharded_regions": list(self.sharded_regions),
                "regions": {k: dataclasses.asdict(v) for k, v in self.regions.items()}}

    def summary_lines(self) -> list[str]:
        """The serving section of ``flexc compile``'s summary."""
        return serving_summary_lines(self.to_dict())


def _placeholder(graph: fx.Graph, after: fx.Node, name: str, kind: InputKind) -> fx.Node:
    with graph.inserting_after(after):
        p = graph.placeholder(name)
    p.meta["flexc_ref"] = InputRef(kind)
    return p


def _paged_attention(graph: fx.Graph, cache_inputs: list[fx.Node]) -> int:
    """Replace each ``flexc::attention(q, k, v, cu, scale, window)`` by its paged form; returns how many."""
    count = 0
    for n in list(graph.find_nodes(op="call_function", target=torch.ops.flexc.attention.default)):
        q, k, v, cu, scale, window = n.args
        with graph.inserting_before(n):
            paged = graph.call_function(torch.ops.flexc.paged_attention.default,
                                        (q, k, v, *cache_inputs, cu, scale, window))
        paged.meta.update(n.meta)
        n.replace_all_uses_with(paged)
        graph.erase_node(n)
        count += 1
    if count > 1:
        raise ValueError(f"serve: a layer template calls attention {count} times; the paged cache holds one "
                         "K/V per layer")
    return count


def _rows(graph: fx.Graph, value: fx.Node, dim: int, per_token: int, rows: fx.Node) -> fx.Node:
    """``value``'s entries along ``dim`` that belong to the finetuning rows (``per_token`` entries per token)."""
    if per_token == 1:
        return graph.call_function(_aten.index_select.default, (value, dim, rows))
    grouped = graph.call_function(_aten.unflatten.int, (value, dim, [-1, per_token]))     # [.., T, k, ..]
    picked = graph.call_function(_aten.index_select.default, (grouped, dim, rows))
    return graph.call_function(_aten.flatten.using_ints, (picked, dim, dim + 1))


def build_serving_graph(program: RegionProgram, captured: CapturedRegion) -> tuple[fx.GraphModule, ServingGraphInfo]:
    """The serving graph of one layer template from its installed (or sharded) forward graph; see the module
    docstring. ``program`` gives the forward's outputs (``user_idx``, ``saved_idx``)."""
    fw = program.fw
    slots = saved_slots(fw, program.saved_idx, captured) if program.bw is not None else []
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outs = None
    for n in fw.graph.nodes:
        if n.op == "output":
            outs = n.args[0]
        else:
            env[n] = g.node_copy(n, lambda a: env[a])
    last = g.find_nodes(op="placeholder")[-1]
    cache_inputs, prev = [], last
    for kind in PAGED_INPUTS:
        prev = _placeholder(g, prev, kind.value, kind)
        cache_inputs.append(prev)
    rows = _placeholder(g, prev, "train_rows", InputKind.TRAIN_ROWS)
    _paged_attention(g, cache_inputs)
    result, refs = [env[outs[i]] for i in program.user_idx], [OutputRef(OutputKind.USER, index=i)
                                                              for i in range(len(program.user_idx))]
    per_token_bytes = 0.0
    for j, slot in zip(program.saved_idx, slots):
        node = env[outs[j]] if isinstance(outs[j], fx.Node) else outs[j]
        if slot.kind is SlotKind.ROWS:
            per_token_bytes += evaluate_at(value_bytes(outs[j], captured), 1)
            node = _rows(g, node, slot.dim, slot.per_token, rows)
        elif slot.kind in (SlotKind.SYMINT, SlotKind.CU_SEQLENS):
            node = None                   # NOTE: the store derives these for the whole sequence
        result.append(node)
        refs.append(OutputRef(OutputKind.SAVED))
    out = g.output(tuple(result))
    out.meta["flexc_ref"] = refs
    g.eliminate_dead_code()
    lora = rewrite_multi_lora(g)          # NOTE: after the dead code is gone: only what the outputs read is left
    g.lint()
    kinds: dict[str, int] = {}
    for p in g.find_nodes(op="placeholder"):
        k = p.meta["flexc_ref"].kind.value
        kinds[k] = kinds.get(k, 0) + 1
    info = ServingGraphInfo(num_nodes=len(g.nodes), placeholders=kinds, lora_linears=list(lora.linears),
                            saved_outputs=len(slots), saved_rows_outputs=sum(s.kind is SlotKind.ROWS for s in slots),
                            saved_bytes_per_finetuning_token=per_token_bytes)
    return fx.GraphModule(fw, g), info


def build_serving_logits(fw: fx.GraphModule) -> fx.GraphModule:
    """The logits region's forward with each ``mm(x, t(weight))`` (a weight placeholder) as
    ``flexc::skinny_mm(x, weight)``; ValueError if it has none."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in fw.graph.nodes:
        env[n] = g.node_copy(n, lambda a: env[a])
    count = 0
    for n in list(g.find_nodes(op="call_function", target=_aten.mm.default)):
        x, wt = n.args
        if not (isinstance(wt, fx.Node) and wt.target is _aten.t.default and wt.args[0].op == "placeholder"
                and wt.args[0].meta["flexc_ref"].kind is InputKind.PARAM):
            continue
        with g.inserting_before(n):
            mm = g.call_function(torch.ops.flexc.skinny_mm.default, (x, wt.args[0]))
        mm.meta.update(n.meta)
        n.replace_all_uses_with(mm)
        g.erase_node(n)
        count += 1
    if not count:
        raise ValueError("serve: the logits region has no mm(x, t(weight)) to run as flexc::skinny_mm")
    g.eliminate_dead_code()
    g.lint()
    return fx.GraphModule(fw, g)


def _sharded_programs(ctx: PassContext) -> Optional[dict[str, Any]]:
    rep = ctx.results.get("parallelize")
    if rep is None or getattr(rep, "tp", 1) <= 1:
        return None
    return rep.sharded


@define_pass("serve")
def serve(graph: CompiledGraph, ctx: PassContext) -> ServeReport:
    """Build the serving graph of every layer template (and of its sharded forward at tp > 1)."""
    report = ServeReport(modified=True)
    sharded = _sharded_programs(ctx)
    for name in dict.fromkeys(graph.layer_regions):
        region = graph.regions[name]
        program = RegionProgram(region.fw, region.bw, (0, 1, 2))
        report.graphs[name], report.regions[name] = build_serving_graph(program, region.captured)
        if sharded is not None:
            fw, bw = sharded[name]
            report.sharded[name], _ = build_serving_graph(RegionProgram(fw, bw, (0, 1, 2)), region.captured)
            report.sharded_regions.append(name)
    if "logits" in graph.regions:
        report.logits = build_serving_logits(graph.regions["logits"].fw)
    logger.info("serve: %d serving graphs%s", len(report.graphs), " (+ sharded)" if sharded else "")
    return report
