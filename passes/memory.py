"""The ``memory`` pass: the memory plan of finetuning, predicted from the graphs and checkable on tensors.

What it reports (``plan.json`` under ``memory``):

* per trainable region, the bytes kept between forward and backward per
  finetuning token (sympy in T) for the installed partition, and the transient
  peak of its forward and backward graph by liveness (intermediates only);
* the strategies side by side at the compile's ``seq_len``: ``autograd`` (what
  PyTorch autograd keeps for the HF+PEFT model), ``checkpoint``, ``pruned``,
  ``pruned_remat``, each with ``activation_bytes`` and ``recompute_flops``;
* KV cache bytes per token, adapter weights, gradients and AdamW state (two
  fp32 moments), base weights and, given ``device_memory``, how many KV-cache
  tokens are left for inference next to one finetuning sequence.

The predictions are checked against real tensors by :mod:`flexc.runtime.measure`
(tests/passes/test_memory.py): predictions equal measurements within 2%.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from flexc.ir.graph import storage_root, value_bytes
from flexc.ir.spec import KVCacheSpec, parse_dtype
from flexc.ir.vocab import TOKEN_SYMBOL, canonical, evaluate_at, is_sym_node
from flexc.ir.graph import CompiledGraph
from flexc.passes.manager import PassContext, define_pass
from flexc.passes.joint import RegionPlan, SweepPoint
from flexc.passes.prune import STRATEGIES, PruneReport

logger = logging.getLogger(__name__)

__all__ = ["memory", "MemoryReport", "StrategyMemory", "RegionMemory", "model_saved_bytes", "model_pareto",
           "liveness_peak"]

@dataclasses.dataclass(kw_only=True)
class StrategyMemory:
    """One strategy for the whole model at the compile's seq_len."""

    activation_bytes: int
    """Bytes kept for the backward of one seq_len-token sequence (all layers, head, shared inputs once)."""
    activation_bytes_per_token: float
    bytes_expr: str
    """The same as a sympy expression of T."""
    recompute_flops: int
    """FLOPs computed again in the backward at seq_len."""
    recompute_fraction: float
    """recompute_flops / train_flops."""
    train_flops: int
    """Forward + backward FLOPs of one seq_len-token sequence without recompute."""
    reduction_vs_autograd: float
    """1 - activation_bytes / autograd's activation_bytes."""


@dataclasses.dataclass(kw_only=True)
class RegionMemory:
    """The installed partition of one trainable region."""

    num_layers: int
    """Decoder layers running this region (1 for the head)."""
    saved_bytes_per_token: str
    """sympy expression (bytes / T) of what one run keeps for the backward."""
    forward_peak: str
    """Transient peak of the forward graph by liveness (intermediates, outputs excluded), sympy in T."""
    backward_peak: str
    forward_peak_bytes: int
    backward_peak_bytes: int


@dataclasses.dataclass(kw_only=True)
class MemoryReport:
    """The memory plan (``plan.json['memory']``); bytes are at the compile's seq_len unless said otherwise."""

    modified: bool = False
    seq_len: int
    installed: str
    """Strategy whose graphs the compiled model runs (the prune pass's choice)."""
    strategies: dict[str, StrategyMemory]
    regions: dict[str, RegionMemory]
    kv_cache_bytes_per_token: int
    """K and V of all layers for one token, in the paged cache (inference and finetuning tokens alike)."""
    finetune_kv_cache_bytes: int
    """K/V of the finetuning sequence (seq_len tokens): kept in the paged cache until its backward ran,
    because its later chunks attend to them (token-level finetuning)."""
    adapter_parameters: int
    adapter_weight_bytes: int
    adapter_grad_bytes: int
    """fp32 gradient buffers."""
    optimizer_bytes: int
    """AdamW: two fp32 moments per adapter parameter."""
    base_weight_bytes: int
    transient_peak_bytes: int
    """Largest forward/backward transient peak of any region."""
    device_memory: Optional[int]
    kv_tokens_for_inference: Optional[int]
    """KV-cache tokens that fit next to everything above (installed strategy), None without device_memory."""
    breakdown: dict[str, int]
    """Device memory use by part (bytes): base weights, adapters, gradients, optimizer, activations,
    transient, the finetuning sequence's K/V, KV cache for inference, free."""
    pareto: list[dict] = dataclasses.field(default_factory=list)
    """Whole model at seq_len, ascending in price: each region's min cut at one common bytes-per-FLOP price
    (from the prune pass's sweeps), as ``price_low``, ``price_high``, ``activation_bytes``, ``recompute_flops``,
    ``recompute_fraction``. From the fewest bytes to ``pruned`` (no recompute)."""


# ---------------------------------------------------------------------------------------------- predictions
def model_saved_bytes(graph: CompiledGraph, plans: dict[str, dict[str, RegionPlan]], strategy: str) -> sympy.Expr:
    """Bytes one T-token sequence keeps for the backward under ``strategy``, whole model, sympy in T.

    Layers multiply their template's bytes (autograd: the first layer has its own, smaller set because
    the frozen embedding needs no input gradient); shared inputs (cos, sin, cu_seqlens) count once.
    """
    total, shared = sympy.Integer(0), sympy.Integer(0)
    for name, members in graph.layer_templates().items():
        if name not in plans:
            continue
        plan = plans[name][strategy]
        if plan.first_layer_bytes is not None and 0 in members:
            total += (len(members) - 1) * plan.saved_bytes + plan.first_layer_bytes
        else:
            total += len(members) * plan.saved_bytes
        shared = plan.shared_bytes      # the same cos/sin/cu tensors feed every template
    for name, by_strategy in plans.items():
        if not name.startswith("layer."):
            total += by_strategy[strategy].saved_bytes
    return sympy.expand(total + shared)


def _model_flops(graph: CompiledGraph, plans: dict[str, dict[str, RegionPlan]], strategy: str, attr: str):
    total = sympy.Integer(0)
    templates = graph.layer_templates()
    for name, by_strategy in plans.items():
        total += len(templates.get(name, [0])) * getattr(by_strategy[strategy], attr)
    return sympy.expand(total)


def model_pareto(graph: CompiledGraph, sweeps: dict[str, list[SweepPoint]], seq_len: int,
                 train_flops: float) -> list[dict]:
    """The whole model's saved-bytes / recompute-FLOPs curve: at every price where some region changes its
    saved set, the sum over regions (layers multiplied, shared inputs once) of each region's min cut."""
    prices = sorted({pt.price_low for pts in sweeps.values() for pt in pts})
    out = []
    for lo, hi in zip(prices, prices[1:] + [float("inf")]):
        plans = {name: {"sweep": next(pt.plan for pt in pts if pt.price_low <= lo < pt.price_high)}
                 for name, pts in sweeps.items()}
        act = int(evaluate_at(model_saved_bytes(graph, plans, "sweep"), seq_len))
        rec = evaluate_at(_model_flops(graph, plans, "sweep", "recompute_flops"), seq_len)
        out.append({"price_low": lo, "price_high": hi, "activation_bytes": act, "recompute_flops": int(rec),
                    "recompute_fraction": rec / train_flops if train_flops else 0.0})
    return out


def liveness_peak(gm: fx.GraphModule, nbytes: Any) -> tuple[sympy.Expr, int, int]:
    """Transient peak of a graph: the most bytes of intermediates (not inputs, not outputs) alive at once.

    ``nbytes(node) -> (sympy expr, value)`` sizes a storage-owning node. Returns (expr, value, node index).
    """
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    out = nodes[-1]
    outputs = {storage_root(a) for a in out.all_input_nodes}
    last: dict[fx.Node, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            r = storage_root(a)
            last[r] = max(last.get(r, 0), index[n])
    live: dict[fx.Node, tuple[sympy.Expr, int]] = {}
    best = (sympy.Integer(0), 0, 0)
    for i, n in enumerate(nodes):
        if n.op == "call_function" and storage_root(n) is n and n not in outputs and not is_sym_node(n) \
                and isinstance(n.meta.get("val"), torch.Tensor):
            live[n] = nbytes(n)
        cur = sum(v for _, v in live.values())
        if cur > best[1]:
            best = (sympy.expand(sum((e for e, _ in live.values()), sympy.Integer(0))), cur, i)
        for r in [r for r in live if last.get(r, 0) <= i]:
            del live[r]
    return best


def _sizer(region: Any, seq_len: int):
    def nbytes(n: fx.Node) -> tuple[sympy.Expr, int]:
        e = value_bytes(n, region.captured)
        return e, int(evaluate_at(e, seq_len))
    return nbytes


@define_pass("memory", requires=("prune",))
def memory(graph: CompiledGraph, ctx: PassContext) -> MemoryReport:
    """Memory plan from the prune pass's saved sets and the installed graphs."""
    prune: PruneReport = ctx.results["prune"]
    seq_len = int(ctx.options.get("seq_len", prune.seq_len))
    plans = prune.regions          # empty without adapters: an inference-only plan (weights and KV cache)
    m = graph.model
    dtype_bytes = parse_dtype(m.get("dtype", "bf16")).itemsize

    train = _model_flops(graph, plans, "pruned", "train_flops")
    train_at = evaluate_at(train, seq_len)
    strategies: dict[str, StrategyMemory] = {}
    for s in STRATEGIES if plans else ():
        expr = model_saved_bytes(graph, plans, s)
        act = int(evaluate_at(expr, seq_len))
        rec = evaluate_at(_model_flops(graph, plans, s, "recompute_flops"), seq_len)
        strategies[s] = StrategyMemory(activation_bytes=act, activation_bytes_per_token=act / seq_len,
                                       bytes_expr=str(expr), recompute_flops=int(rec),
                                       recompute_fraction=rec / train_at if train_at else 0.0,
                                       train_flops=int(train_at), reduction_vs_autograd=0.0)
    base = strategies["autograd"].activation_bytes if plans else 0
    for s in strategies.values():
        s.reduction_vs_autograd = 1 - s.activation_bytes / base if base else 0.0

    regions: dict[str, RegionMemory] = {}
    templates = graph.layer_templates()
    for name in plans:
        r = graph.regions[name]
        size = _sizer(r, seq_len)
        fe, fv, _ = liveness_peak(r.fw, size)
        be, bv, _ = liveness_peak(r.bw, size)
        saved = plans[name][prune.installed].saved_bytes
        regions[name] = RegionMemory(num_layers=len(templates.get(name, [0])),
                                     saved_bytes_per_token=str(canonical(saved / TOKEN_SYMBOL)),
                                     forward_peak=str(fe), backward_peak=str(be),
                                     forward_peak_bytes=fv, backward_peak_bytes=bv)

    kv = KVCacheSpec.of_model(m, m.get("dtype", "bf16")).bytes_per_token
    adapters = int(m.get("trainable_parameters", 0))
    adapter_bytes = adapters * 4               # PEFT keeps adapters in fp32 (autocast_adapter_dtype)
    base_weights = (int(m.get("parameters", 0)) - adapters) * dtype_bytes
    transient = max([max(x.forward_peak_bytes, x.backward_peak_bytes) for x in regions.values()] or [0])
    act = strategies[prune.installed].activation_bytes if plans else 0
    breakdown = {"base_weights": base_weights, "adapter_weights": adapter_bytes, "adapter_grads": adapters * 4,
                 "optimizer": adapters * 8, "activations": act, "transient": transient,
                 "finetune_kv_cache": seq_len * kv if plans else 0}
    device = ctx.options.get("device_memory")
    tokens = None
    if device is not None:
        if not isinstance(device, int) or device <= 0:
            raise ValueError(f"device_memory must be a positive number of bytes, got {device!r}")
        free = device - sum(breakdown.values())
        tokens = max(free, 0) // kv
        breakdown["kv_cache"] = tokens * kv
        breakdown["free"] = max(free, 0) - tokens * kv
        if free < 0:
            logger.warning("device memory %d B is %d B short of weights, adapters and one finetuning sequence",
                           device, -free)
    logger.info("memory: %s keeps %.1f MiB for a %d-token sequence (autograd %.1f MiB)", prune.installed,
                act / 2**20, seq_len, base / 2**20)
    return MemoryReport(seq_len=seq_len, installed=prune.installed, strategies=strategies, regions=regions,
                        kv_cache_bytes_per_token=kv, finetune_kv_cache_bytes=breakdown["finetune_kv_cache"],
                        adapter_parameters=adapters, adapter_weight_bytes=adapter_bytes,
                        adapter_grad_bytes=adapters * 4, optimizer_bytes=adapters * 8,
                        base_weight_bytes=base_weights, transient_peak_bytes=transient, device_memory=device,
                        kv_tokens_for_inference=tokens, breakdown=breakdown,
                        pareto=model_pareto(graph, prune.sweeps, seq_len, train_at) if plans else [])
