"""The ``prune`` pass: flexc's own partition of every trainable region's joint graph.

Finetuning only the adapters, the backward needs far less than what autograd
keeps by default:

* frozen base weights get no gradient (the joint graph has no weight-gradient
  work for them), so nothing is kept for it;
* what is kept is exactly what the adapter gradients and the input-gradient
  chain read (the *needed* set), with aliases (views, ``detach``) of one storage
  counted once and identical forward values (PEFT's ``x.to(fp32)`` copy of a
  LoRA input, one per adapter) merged first;
* cheap values are recomputed in the backward instead of kept. Which ones is a
  cost decision, not a list: a min cut over the forward graph minimises
  ``saved bytes + price * recompute FLOPs``; the price is searched so that the
  result fits the budget (``ctx.options['activation_budget']``).

Strategies (``STRATEGIES``), each a saved set for every trainable region:

``autograd``      what PyTorch autograd keeps for the HF+PEFT model (the needed set, no merging; the
                  first layer needs no input gradient; the eager head keeps fp32 log-probs ``[T, V]``);
``checkpoint``    only the region inputs (full activation checkpointing, everything else recomputed);
``pruned``        the needed set, merged and alias-aware, recomputing only free ops (views);
``pruned_remat``  the min-cut choice under the budget.

Budget (``activation_budget``): ``"max"`` installs ``pruned``, ``"min"`` installs ``checkpoint``, a number
(bytes per finetuning token of one region; ``"64KiB"`` style units allowed) installs the cheapest
recompute whose saved bytes fit it, and ``"auto"`` (the default) the fewest saved bytes whose recompute
stays within ``ctx.options['recompute_budget']`` (a fraction of the region's training FLOPs, default
:data:`DEFAULT_RECOMPUTE_FRACTION`). ``pruned_remat`` in the report is what the budget chose.

Every forward node of an installed graph carries one :class:`~flexc.ir.graph.Decision` under
``meta[DECISION]``: ``save``, ``recompute`` (also on its copy in the backward graph) or ``drop``.

Invariant (tests/passes/test_prune.py): the graphs of every strategy give the same loss and LoRA gradients
as PEFT's ``loss.backward()``, and the bytes they actually hold equal the predicted ``saved_bytes``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Optional

import networkx as nx
import sympy
import torch
import torch.fx as fx

from flexc.ir.capture import partition_joint
from flexc.ir.vocab import TOKEN_SYMBOL, CapturedRegion, evaluate_at, is_sym_node
from flexc.ir.graph import (DECISION, CompiledGraph, Decision, RegionGraph, annotate, node_flops, storage_root,
                            value_bytes)
from flexc.passes.manager import PassContext, register_pass

logger = logging.getLogger(__name__)

__all__ = ["prune", "PruneReport", "RegionPlan", "SavedValue", "STRATEGIES", "DEFAULT_RECOMPUTE_FRACTION",
           "JointAnalysis", "partition_region", "parse_budget"]

STRATEGIES = ("autograd", "checkpoint", "pruned", "pruned_remat")
DEFAULT_RECOMPUTE_FRACTION = 0.2
"""Default recompute budget of ``activation_budget='auto'``: FLOPs recomputed per region, as a fraction of
the region's forward+backward FLOPs (the issue's ceiling: recompute at most 20% of training FLOPs)."""

_SHARED_INPUTS = {"layer": (1, 2, 3)}
"""Region inputs every layer receives as the same tensor (cos, sin, cu_seqlens): counted once per model."""
_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
_INF = math.inf


@dataclasses.dataclass(kw_only=True)
class SavedValue:
    """One value a strategy keeps for the backward."""

    name: str
    """Node name in the joint graph (and in the forward/backward graphs)."""
    shape: tuple
    """Shape, the token dimension as ``T``."""
    dtype: str
    kind: str
    """``activation``, ``input`` (a region input), ``shared`` (an input every layer shares), ``param``
    (a weight or a view of one: costs nothing) or ``alias`` (a view of another saved value's storage)."""
    nbytes: sympy.Expr
    """Bytes this value adds (0 for params and aliases), sympy in T."""


@dataclasses.dataclass(kw_only=True)
class RegionPlan:
    """One strategy for one region: what is saved and what is recomputed."""

    strategy: str
    saved: list[SavedValue]
    saved_bytes: sympy.Expr
    """Bytes held between this region's forward and backward (storages counted once, shared inputs and
    weights excluded), sympy in T."""
    shared_bytes: sympy.Expr
    """Bytes of saved shared inputs (cos, sin, cu_seqlens): held once for the whole model."""
    recompute_flops: sympy.Expr
    """FLOPs of forward nodes computed again in the backward, sympy in T."""
    train_flops: sympy.Expr
    """Forward + backward FLOPs of the region without any recompute (the 100% for recompute fractions)."""
    recomputed: list[str]
    """Names of the recomputed forward nodes."""
    first_layer_bytes: Optional[sympy.Expr] = None
    """autograd only: saved bytes of the first decoder layer (its input needs no gradient), None elsewhere."""
    price: Optional[float] = None
    """pruned_remat only: the bytes-per-FLOP price of the min cut the budget chose."""

    def to_dict(self, seq_len: int) -> dict:
        def ev(e):
            return evaluate_at(e, seq_len)
        return {
            "strategy": self.strategy,
            "saved_bytes": str(self.saved_bytes), "saved_bytes_per_token": ev(self.saved_bytes) / seq_len,
            "shared_bytes": str(self.shared_bytes),
            "recompute_flops": str(self.recompute_flops), "recompute_flops_at_seq_len": ev(self.recompute_flops),
            "train_flops": str(self.train_flops), "train_flops_at_seq_len": ev(self.train_flops),
            "first_layer_bytes": None if self.first_layer_bytes is None else str(self.first_layer_bytes),
            "price": self.price,
            "num_recomputed": len(self.recomputed),
            "saved": [{"name": s.name, "shape": [_dim(d) for d in s.shape], "dtype": s.dtype, "kind": s.kind,
                       "bytes": str(s.nbytes), "bytes_per_token": ev(s.nbytes) / seq_len}
                      for s in self.saved if s.kind != "param"],
        }


@dataclasses.dataclass(kw_only=True)
class PruneReport:
    """What the prune pass decided: every strategy per trainable region, and which one is installed."""

    modified: bool
    budget: str
    """The activation budget as given ('auto' when none was)."""
    recompute_budget: float
    seq_len: int
    installed: str
    """Strategy whose graphs now are ``region.fw`` / ``region.bw``."""
    budget_met: bool
    """False when even full checkpointing keeps more than a byte budget allows."""
    regions: dict[str, dict[str, RegionPlan]]
    """Region name -> strategy -> plan."""

    def to_dict(self) -> dict:
        return {"modified": self.modified, "budget": self.budget, "recompute_budget": self.recompute_budget,
                "seq_len": self.seq_len, "installed": self.installed, "budget_met": self.budget_met,
                "regions": {r: {s: p.to_dict(self.seq_len) for s, p in plans.items()}
                            for r, plans in self.regions.items()}}


def _dim(d: Any) -> str:
    """A dimension for reports: T stays T; any other symbol is the sequence-start count N+1."""
    e = sympy.sympify(d)
    return str(e.xreplace({s: sympy.Symbol("N+1") for s in e.free_symbols if s != TOKEN_SYMBOL}))


def parse_budget(value: Any) -> tuple[str, Optional[float]]:
    """``None``/'auto' -> ('auto', None); 'max'/'min'; bytes per token (int, float or '64KiB') -> ('bytes', n)."""
    if value is None or value == "auto":
        return "auto", None
    if value in ("max", "min"):
        return value, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        num = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not m or m.group(2).lower() not in ("", *_UNITS):
            raise ValueError(f"activation_budget {value!r}: expected 'max', 'min', 'auto' or bytes per token "
                             "(e.g. 65536 or '64KiB')")
        num = float(m.group(1)) * _UNITS.get(m.group(2).lower(), 1)
    else:
        raise ValueError(f"activation_budget {value!r}: expected 'max', 'min', 'auto' or bytes per token")
    if not num > 0:
        raise ValueError(f"activation_budget must be positive bytes per token, got {value!r}")
    return "bytes", num


# ---------------------------------------------------------------------------------------------- analysis
def _tensor_val(n: fx.Node) -> Optional[torch.Tensor]:
    v = n.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None


def _freeze(x: Any) -> Any:
    if isinstance(x, fx.Node):
        return x
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(a) for a in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    try:
        hash(x)
        return (type(x), x)
    except TypeError:
        return repr(x)


def _cse_copy(joint: fx.GraphModule) -> fx.GraphModule:
    """A copy of the joint graph with identical deterministic forward nodes merged (same names otherwise).

    Merges PEFT's per-adapter ``x.to(fp32)`` copies of one LoRA input (q, k and v each make one).
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    rv, old_out = g.graph_copy(joint.graph, env, return_output_node=True)
    out = g.output(rv)
    out.meta = dict(old_out.meta)
    seen: dict[Any, fx.Node] = {}
    for n in list(g.nodes):
        if n.op != "call_function" or n.meta.get("partitioner_tag") != "is_forward":
            continue
        tags = getattr(n.target, "tags", ())
        name = str(n.target).split(".")
        if torch.Tag.nondeterministic_seeded in tags or (len(name) > 1 and name[1].endswith("_")):
            continue
        key = (n.target, _freeze(n.args), _freeze(n.kwargs))
        if key in seen:
            n.replace_all_uses_with(seen[key])
            g.erase_node(n)
        else:
            seen[key] = n
    return fx.GraphModule(joint, g)


class JointAnalysis:
    """Needed set, sizes and FLOPs of one region's joint graph (optionally with identical nodes merged)."""

    def __init__(self, region: RegionGraph, seq_len: int, *, merge: bool):
        cap = region.captured
        assert cap.joint is not None, f"region {region.name} has no joint graph"
        self.region, self.seq_len = region, seq_len
        self.kind = region.name.split(".")[0]
        self.joint = _cse_copy(cap.joint) if merge else cap.joint
        self.captured: CapturedRegion = dataclasses.replace(cap, joint=self.joint)
        g = self.joint.graph
        self.nodes = list(g.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.primals = [p for p in g.find_nodes(op="placeholder") if p.meta.get("partitioner_tag") != "is_backward"
                        and "tangent" not in p.name]
        fw_refs = {p.name: p.meta.get("flexc_ref") for p in cap.fw.graph.find_nodes(op="placeholder")}
        self.refs = {p: fw_refs.get(p.name) or p.meta.get("flexc_ref") for p in self.primals}
        self.fwd = {n for n in self.nodes if n.op == "placeholder" and n in self.refs
                    or n.op == "call_function" and n.meta.get("partitioner_tag") == "is_forward"}
        out = g.find_nodes(op="output")[0]
        self.fwd_outputs = [a for a in out.args[0][:cap.num_fwd_outputs] if isinstance(a, fx.Node)]
        self.grad_outputs = list(out.args[0][cap.num_fwd_outputs:])
        self.fwd_names = {n.name for n in self.fwd}
        self._bytes: dict[fx.Node, sympy.Expr] = {}
        self._flops: dict[fx.Node, sympy.Expr] = {}
        self._net: Optional[tuple] = None
        self._train: dict[frozenset, sympy.Expr] = {}

    # ---- sizes
    def nbytes(self, n: fx.Node) -> sympy.Expr:
        if n not in self._bytes:
            self._bytes[n] = value_bytes(n, self.captured)
        return self._bytes[n]

    def flops(self, n: fx.Node) -> sympy.Expr:
        if n not in self._flops:
            self._flops[n] = node_flops(n, self.captured) if n.op == "call_function" else sympy.Integer(0)
        return self._flops[n]

    def storage_kind(self, root: fx.Node) -> str:
        ref = self.refs.get(root)
        if ref is None:
            return "activation"
        if ref.kind in ("param", "buffer"):
            return "param"
        return "shared" if ref.index in _SHARED_INPUTS.get(self.kind, ()) else "input"

    # ---- what the backward reads
    def needed(self, input_grads: bool = True) -> set[fx.Node]:
        """Forward values (tensors) the backward reads; without ``input_grads`` the region-input gradients
        are not computed (the first decoder layer: the frozen embedding needs no gradient)."""
        keep = []
        for p, gnode in zip(self.primals, self.grad_outputs):
            if not isinstance(gnode, fx.Node):
                continue
            ref = self.refs.get(p)
            if not input_grads and ref is not None and ref.kind == "user":
                continue
            keep.append(gnode)
        need: set[fx.Node] = set()
        seen: set[fx.Node] = set()
        stack = list(keep)
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.fwd:
                need.add(n)
                continue
            stack.extend(n.all_input_nodes)
        return {n for n in need if not is_sym_node(n)}

    def backward_nodes(self) -> set[fx.Node]:
        """Backward nodes that compute a kept gradient."""
        seen: set[fx.Node] = set()
        stack = [g for g in self.grad_outputs if isinstance(g, fx.Node)]
        while stack:
            n = stack.pop()
            if n in seen or n in self.fwd:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        return seen

    def recompute_closure(self, saved: set[fx.Node], need: set[fx.Node]) -> set[fx.Node]:
        """Forward nodes the backward must compute again when only ``saved`` (and sym ints) are kept."""
        rec: set[fx.Node] = set()
        stack = [n for n in need if n not in saved]
        while stack:
            n = stack.pop()
            if n in rec or n in saved or is_sym_node(n):
                continue
            assert n.op != "placeholder", f"region input {n.name} is needed but not saved"
            rec.add(n)
            stack.extend(n.all_input_nodes)
        return rec

    def train_flops(self, need: set[fx.Node]) -> sympy.Expr:
        """Forward + backward FLOPs without recompute (forward work for the outputs and ``need``)."""
        key = frozenset(need)
        if key not in self._train:
            self._train[key] = self._train_flops(need)
        return self._train[key]

    def _train_flops(self, need: set[fx.Node]) -> sympy.Expr:
        fwd_live: set[fx.Node] = set()
        stack = list(self.fwd_outputs) + list(need)
        while stack:
            n = stack.pop()
            if n in fwd_live:
                continue
            fwd_live.add(n)
            stack.extend(a for a in n.all_input_nodes if a in self.fwd)
        total = sum((self.flops(n) for n in fwd_live | self.backward_nodes()), sympy.Integer(0))
        return sympy.expand(total)

    def plan(self, strategy: str, saved: set[fx.Node], need: set[fx.Node],
             **extra: Any) -> tuple[RegionPlan, list[fx.Node], set[fx.Node]]:
        """Alias-aware accounting of a saved set: (plan, the saved nodes actually read, recomputed nodes)."""
        rec = self.recompute_closure(saved, need)
        used = {a for n in rec for a in n.all_input_nodes} | need
        kept = sorted((n for n in saved if n in used and not is_sym_node(n)), key=self.order.__getitem__)
        values, roots = [], set()
        private, shared = sympy.Integer(0), sympy.Integer(0)
        for n in kept:
            root = storage_root(n)
            kind = self.storage_kind(root)
            nb = sympy.Integer(0)
            if kind != "param" and root in roots:
                kind = "alias"
            elif kind != "param":
                roots.add(root)
                nb = self.nbytes(root)
                if kind == "shared":
                    shared += nb
                else:
                    private += nb
            v = _tensor_val(n)
            values.append(SavedValue(name=n.name, shape=tuple(self.captured.to_token_expr(d) for d in v.shape)
                                     if v is not None else (), dtype=str(v.dtype).replace("torch.", "")
                                     if v is not None else "", kind=kind, nbytes=nb))
        return RegionPlan(strategy=strategy, saved=values, saved_bytes=sympy.expand(private),
                          shared_bytes=sympy.expand(shared),
                          recompute_flops=sympy.expand(sum((self.flops(n) for n in rec), sympy.Integer(0))),
                          train_flops=self.train_flops(need), recomputed=sorted(n.name for n in rec),
                          **extra), kept, rec

    # ---- min cut
    def min_cut(self, need: set[fx.Node], price: Optional[float]) -> set[fx.Node]:
        """Saved set minimising ``bytes + price * recompute FLOPs`` at T = seq_len (price None: only
        zero-FLOP ops, views, may be recomputed)."""
        if self._net is None or self._net[0] != need:
            self._net = (set(need), *self._build_net(need))
        _, net, costs, members = self._net
        for n, f in costs.items():          # only the price-dependent edges change between calls
            edge = net["src"][(n, "in")]
            if price is None:
                edge.pop("capacity", None)      # no capacity: infinite
            else:
                edge["capacity"] = price * f
        _, (src_side, _) = nx.minimum_cut(net, "src", "sink")
        return {n for n in members if (n, "in") in src_side and (n, "out") not in src_side}

    def _build_net(self, need: set[fx.Node]) -> tuple[nx.DiGraph, dict, set]:
        members: set[fx.Node] = set()
        stack = list(need)
        while stack:
            n = stack.pop()
            if n in members or is_sym_node(n):
                continue
            members.add(n)
            stack.extend(n.all_input_nodes)
        net = nx.DiGraph()
        costs: dict[fx.Node, float] = {}
        size = max(len(self.nodes), 1)
        for n in members:
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                root = storage_root(n)
                save = 0.0 if self.storage_kind(root) == "param" else evaluate_at(self.nbytes(root), self.seq_len)
                net.add_edge((n, "in"), (n, "out"), capacity=save)
            else:
                net.add_edge((n, "in"), (n, "out"))          # a tuple of outputs cannot be saved as such
            if n.op == "placeholder" or torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ()):
                net.add_edge("src", (n, "in"))
            else:
                # NOTE: ties (every K=hidden matmul has the same bytes per FLOP) are broken towards earlier nodes
                cost = evaluate_at(self.flops(n), self.seq_len) * (1 + 0.05 * self.order[n] / size)
                if cost > 0:                 # zero-FLOP ops (views) are free to recompute: no source edge
                    costs[n] = cost
                    net.add_edge("src", (n, "in"), capacity=0.0)
            for u in n.users:
                if u in members:
                    net.add_edge((n, "out"), (u, "in"))
            if n in need:
                net.add_edge((n, "out"), "sink")
        return net, costs, members


# ---------------------------------------------------------------------------------------------- strategies
def _strategy(an: JointAnalysis, strategy: str, need: set[fx.Node], budget: tuple[str, Optional[float]],
              recompute_fraction: float):
    """(plan, saved nodes) of one strategy on an analysis (merged joint for the pruned ones)."""
    if strategy == "autograd":
        plan, kept, _ = an.plan("autograd", set(need), need)
        if an.kind == "layer":
            first = an.needed(input_grads=False)
            plan.first_layer_bytes = an.plan("autograd", set(first), first)[0].saved_bytes
        elif an.kind == "head":
            plan = _autograd_head(an, plan)
        return plan, kept
    if strategy == "checkpoint":
        plan, kept, _ = an.plan("checkpoint", set(an.primals), need)
        return plan, kept
    if strategy == "pruned":
        plan, kept, _ = an.plan("pruned", an.min_cut(need, None), need)
        return plan, kept
    return _remat(an, need, budget, recompute_fraction)


def _remat(an: JointAnalysis, need: set[fx.Node], budget: tuple[str, Optional[float]], fraction: float):
    mode, limit = budget
    if mode == "max":
        plan, kept = _strategy(an, "pruned", need, budget, fraction)
        return dataclasses.replace(plan, strategy="pruned_remat"), kept
    if mode == "min":
        plan, kept = _strategy(an, "checkpoint", need, budget, fraction)
        return dataclasses.replace(plan, strategy="pruned_remat"), kept
    points = []          # (price, plan, kept)

    def at(price: float):
        plan, kept, _ = an.plan("pruned_remat", an.min_cut(need, price), need, price=price)
        points.append((price, plan, kept))
        return plan

    train = evaluate_at(an.train_flops(need), an.seq_len)

    def ok(plan: RegionPlan) -> bool:
        if mode == "bytes":
            return evaluate_at(plan.saved_bytes, an.seq_len) / an.seq_len <= limit
        return evaluate_at(plan.recompute_flops, an.seq_len) <= fraction * train

    # bisection on log(price): a higher price recomputes less (nested min cuts); find the edge of `ok`
    lo, hi = math.log(1e-9), math.log(1e3)
    if mode == "bytes" and not ok(at(math.exp(lo))):
        best = min(points, key=lambda p: evaluate_at(p[1].saved_bytes, an.seq_len))
        best[1].price = None
        return best[1], best[2]
    # NOTE: the tolerance must resolve the tie-breaking spread of equal-ratio nodes (see _build_net)
    while hi - lo > 1e-5:
        mid = (lo + hi) / 2
        plan = at(math.exp(mid))
        if (mode == "bytes") == ok(plan):
            lo = mid
        else:
            hi = mid
    good = [p for p in points if ok(p[1])] or [max(points, key=lambda p: p[0])]
    if mode == "bytes":
        price, plan, kept = min(good, key=lambda p: (evaluate_at(p[1].recompute_flops, an.seq_len), -p[0]))
    else:
        price, plan, kept = min(good, key=lambda p: (evaluate_at(p[1].saved_bytes, an.seq_len), -p[0]))
    return plan, kept


def _autograd_head(an: JointAnalysis, plan: RegionPlan) -> RegionPlan:
    """The eager HF head keeps fp32 log-probs [T, V] and int64 labels instead of the fused op's ``dx``."""
    fused = [n for n in an.nodes if "linear_cross_entropy" in str(n.target)]
    if not fused:
        return plan
    op = fused[0]
    x, weight = op.args[0], op.args[1]
    to_expr = an.captured.to_token_expr
    t = to_expr(x.meta["val"].shape[0])
    vocab = to_expr(weight.meta["val"].shape[0])
    dx = {u.name for u in op.users}
    saved = [s for s in plan.saved if s.name not in dx]
    extra = [SavedValue(name="log_softmax", shape=(t, vocab), dtype="float32", kind="activation",
                        nbytes=4 * t * vocab),
             SavedValue(name="labels", shape=(t,), dtype="int64", kind="input", nbytes=8 * t)]
    dx_bytes = sum((s.nbytes for s in plan.saved if s.name in dx), sympy.Integer(0))
    return dataclasses.replace(plan, saved=saved + extra,
                               saved_bytes=sympy.expand(plan.saved_bytes - dx_bytes + 4 * t * vocab + 8 * t + 4))


def partition_region(region: RegionGraph, strategy: str, seq_len: int, budget: Any = None,
                     recompute_fraction: float = DEFAULT_RECOMPUTE_FRACTION):
    """Forward and backward graphs of one strategy for a trainable region: ``(fw, bw, plan)``.

    The graphs are new; the region keeps its installed ones. ``plan.saved_bytes`` is the prediction that
    :func:`flexc.passes.memory.measure_saved_bytes` checks against real tensors.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
    an = JointAnalysis(region, seq_len, merge=strategy != "autograd")
    need = an.needed()
    plan, kept = _strategy(an, strategy, need, parse_budget(budget), recompute_fraction)
    fw, bw = _partition(an, kept, set(plan.recomputed))
    return fw, bw, plan


def _partition(an: JointAnalysis, kept: list[fx.Node], recomputed: set[str]):
    syms = [n for n in an.nodes if n in an.fwd and is_sym_node(n)]
    fw, bw = partition_joint(an.captured, list(kept), syms)
    saved = {ph.name for ph in bw.graph.find_nodes(op="placeholder") if ph.meta["flexc_ref"].kind == "saved"}
    for gm, phase in ((fw, "forward"), (bw, "backward")):
        for n in gm.graph.nodes:
            if n.op == "output" or n.name not in an.fwd_names:
                continue
            if n.name in recomputed:
                n.meta[DECISION] = Decision.RECOMPUTE
            elif n.name in saved:
                n.meta[DECISION] = Decision.SAVE
            elif phase == "forward":
                n.meta[DECISION] = Decision.DROP
    return fw, bw


@register_pass("prune")
def prune(graph: CompiledGraph, ctx: PassContext) -> PruneReport:
    """Partition every trainable region for each strategy; install the one the budget selects."""
    budget = parse_budget(ctx.options.get("activation_budget"))
    fraction = float(ctx.options.get("recompute_budget", DEFAULT_RECOMPUTE_FRACTION))
    if not 0 <= fraction <= 10:
        raise ValueError(f"recompute_budget must be a fraction of training FLOPs in [0, 10], got {fraction!r}")
    seq_len = int(ctx.options.get("seq_len", 2048))
    install = {"max": "pruned", "min": "checkpoint"}.get(budget[0], "pruned_remat")
    plans: dict[str, dict[str, RegionPlan]] = {}
    met = True
    for name, region in graph.regions.items():
        if region.captured.joint is None or region.bw is None:
            continue
        plans[name] = {}
        original = JointAnalysis(region, seq_len, merge=False)
        merged = JointAnalysis(region, seq_len, merge=True)
        chosen = None
        for strategy in STRATEGIES:
            an = original if strategy == "autograd" else merged
            need = an.needed()
            plan, kept = _strategy(an, strategy, need, budget, fraction)
            plans[name][strategy] = plan
            if strategy == install:
                chosen = (an, kept, plan)
        an, kept, plan = chosen
        if budget[0] == "bytes" and evaluate_at(plan.saved_bytes, seq_len) / seq_len > budget[1]:
            met = False
        fw, bw = _partition(an, kept, set(plan.recomputed))
        region.captured.fw, region.captured.bw = fw, bw
        annotate(region)
        logger.info("prune %s: %s saves %.0f B/token (autograd %.0f), recomputes %d nodes", name, install,
                    evaluate_at(plan.saved_bytes, seq_len) / seq_len,
                    evaluate_at(plans[name]["autograd"].saved_bytes, seq_len) / seq_len, len(plan.recomputed))
    budget_text = str(ctx.options.get("activation_budget") or "auto")
    return PruneReport(modified=bool(plans), budget=budget_text, recompute_budget=fraction, seq_len=seq_len,
                       installed=install, budget_met=met, regions=plans)
