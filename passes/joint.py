"""Analysis of one region's joint forward+backward graph: what the backward needs, sizes, FLOPs, min cuts.

:class:`JointAnalysis` is the mechanism the ``prune`` pass decides with: the *needed* set (forward values the
adapter gradients and the input-gradient chain read), storage-aware byte counts, recompute closures, and the
min cut over the forward graph that minimises ``saved bytes + price * recompute FLOPs``, with the sweep of
every saved set some price selects (the saved-bytes / recompute-FLOPs trade-off curve). Forward nodes that
only a LoRA branch computes are never saved (the serving graph's multi-LoRA op does not compute them).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import networkx as nx
import sympy
import torch
import torch.fx as fx
from networkx.algorithms.flow import boykov_kolmogorov, build_residual_network

from flexc.ir.graph import RegionGraph, node_flops, storage_root, value_bytes
from flexc.ir.vocab import TOKEN_SYMBOL, CapturedRegion, evaluate_at, is_sym_node
from flexc.passes.multi_lora import branch_internals

__all__ = ["JointAnalysis", "SavedValue", "RegionPlan", "SweepPoint", "PRICE_MIN", "PRICE_MAX"]

_SHARED_INPUTS = {"layer": (1, 2, 3)}
"""Region inputs every layer receives as the same tensor (cos, sin, cu_seqlens): counted once per model."""
_INF = math.inf
PRICE_MIN, PRICE_MAX = 1e-9, 1e3
"""Bytes-per-FLOP prices: the sweep starts at the lowest (the fewest bytes, recompute nearly free); above the
highest nothing with FLOPs is worth recomputing (the representative price of the ``pruned`` end)."""


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
    """pruned_remat only: a bytes-per-FLOP price whose min cut is the saved set the budget chose."""

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
class SweepPoint:
    """One saved set on a region's trade-off curve: the min cut for every price in [price_low, price_high]."""

    price_low: float
    """Lowest bytes-per-FLOP price that selects this saved set (0 for the fewest-bytes end)."""
    price_high: float
    """Highest price that selects it (``inf`` for the no-recompute end, ``pruned``)."""
    plan: RegionPlan
    kept: list[fx.Node] = dataclasses.field(default_factory=list, repr=False)
    """The saved nodes the backward reads (what :func:`partition_joint` keeps)."""

    @property
    def price(self) -> float:
        """A price inside the interval (geometric middle, clamped to the searched range)."""
        lo, hi = max(self.price_low, PRICE_MIN), min(self.price_high, PRICE_MAX)
        return math.sqrt(lo * max(hi, lo))

    def to_dict(self, seq_len: int) -> dict:
        return {"price_low": self.price_low, "price_high": self.price_high,
                "saved_bytes": evaluate_at(self.plan.saved_bytes, seq_len),
                "recompute_flops": evaluate_at(self.plan.recompute_flops, seq_len),
                "num_recomputed": len(self.plan.recomputed)}


def _crossing(a: tuple, b: tuple) -> float:
    """Price at which two cuts ``(saved, bytes, flops)`` cost the same (``a`` recomputes more)."""
    return max((b[1] - a[1]) / (a[2] - b[2]), 0.0)


def _dim(d: Any) -> str:
    """A dimension for reports: T stays T; any other symbol is the sequence-start count N+1."""
    e = sympy.sympify(d)
    return str(e.xreplace({s: sympy.Symbol("N+1") for s in e.free_symbols if s != TOKEN_SYMBOL}))


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
        self._sweeps: dict[frozenset, list[SweepPoint]] = {}
        self._shapes: dict[fx.Node, tuple] = {}
        self.unsaveable = self._lora_internals()
        """Forward nodes that only a LoRA branch computes: never kept for the backward (the serving graph's
        multi-LoRA op does not compute them), recomputed from the branch input instead."""


    def _lora_internals(self) -> set[fx.Node]:
        """Run the multi-LoRA matcher on a forward-only copy of the joint graph (region outputs only)."""
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in self.nodes:
            if n in self.fwd:
                env[n] = g.node_copy(n, lambda a: env[a])
                if n.op == "placeholder":
                    env[n].meta["flexc_ref"] = self.refs.get(n)
        g.output(tuple(env[a] for a in self.fwd_outputs[:self.captured.num_user_outputs]))
        g.eliminate_dead_code()
        by_name = {n.name: n for n in self.nodes}
        return {by_name[name] for names in branch_internals(g).values() for name in names}

    # ---- sizes
    def nbytes(self, n: fx.Node) -> sympy.Expr:
        if n not in self._bytes:
            self._bytes[n] = value_bytes(n, self.captured)
        return self._bytes[n]

    def shape(self, n: fx.Node) -> tuple:
        """Shape of a tensor node, the token dimension as ``T`` (``()`` for other values)."""
        if n not in self._shapes:
            v = _tensor_val(n)
            self._shapes[n] = tuple(self.captured.to_token_expr(d) for d in v.shape) if v is not None else ()
        return self._shapes[n]

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
        # NOTE: one Add of all terms; summing them pairwise re-sorted the growing sum at every step
        return sympy.expand(sympy.Add(*(self.flops(n) for n in fwd_live | self.backward_nodes())))

    def plan(self, strategy: str, saved: set[fx.Node], need: set[fx.Node],
             **extra: Any) -> tuple[RegionPlan, list[fx.Node], set[fx.Node]]:
        """Alias-aware accounting of a saved set: (plan, the saved nodes actually read, recomputed nodes)."""
        rec = self.recompute_closure(saved, need)
        used = {a for n in rec for a in n.all_input_nodes} | need
        kept = sorted((n for n in saved if n in used and not is_sym_node(n)), key=self.order.__getitem__)
        values, roots = [], set()
        private, shared = [], []
        for n in kept:
            root = storage_root(n)
            kind = self.storage_kind(root)
            nb = sympy.Integer(0)
            if kind != "param" and root in roots:
                kind = "alias"
            elif kind != "param":
                roots.add(root)
                nb = self.nbytes(root)
                (shared if kind == "shared" else private).append(nb)
            v = _tensor_val(n)
            values.append(SavedValue(name=n.name, shape=self.shape(n), dtype=str(v.dtype).replace("torch.", "")
                                     if v is not None else "", kind=kind, nbytes=nb))
        # NOTE: one Add of all terms: summing term by term re-flattens the growing sum each time (slow in sympy)
        return RegionPlan(strategy=strategy, saved=values, saved_bytes=sympy.expand(sympy.Add(*private)),
                          shared_bytes=sympy.expand(sympy.Add(*shared)),
                          recompute_flops=sympy.expand(sympy.Add(*(self.flops(n) for n in rec))),
                          train_flops=self.train_flops(need), recomputed=sorted(n.name for n in rec),
                          **extra), kept, rec

    # ---- min cut
    def min_cut(self, need: set[fx.Node], price: Optional[float]) -> set[fx.Node]:
        """Saved set minimising ``bytes + price * recompute FLOPs`` at T = seq_len (price None: only
        zero-FLOP ops, views, may be recomputed)."""
        return self._cut(need, price)[0]

    def _cut(self, need: set[fx.Node], price: Optional[float]) -> tuple[set[fx.Node], float, float]:
        """:meth:`min_cut` with the cut's two terms as the network prices them: (saved set, bytes, FLOPs)."""
        if self._net is None or self._net[0] != need:
            net, costs, members = self._build_net(need)
            # NOTE: networkx sizes its stand-in for 'no capacity' from the finite capacities it sees: give the
            # price edges their largest value first, so that no price * FLOPs set later reaches it
            for n, f in costs.items():
                net["src"][(n, "in")]["capacity"] = 10 * PRICE_MAX * f
            self._net = (set(need), net, costs, members, build_residual_network(net, "capacity"))
        _, net, costs, members, residual = self._net
        for n, f in costs.items():          # only the price-dependent edges change between calls
            # NOTE: set on the residual network networkx reuses (its 'inf' stands for no capacity)
            if price is None:     # NOTE: recomputing a LoRA branch is the only way to have it, so it is (nearly) free
                cap = 1e-12 * f if n in self.unsaveable else residual.graph["inf"]
            else:
                cap = price * f
            residual["src"][(n, "in")]["capacity"] = cap
        # the sink side of a min cut is the same for every max flow; Boykov-Kolmogorov finds one ~3x faster than
        # networkx's default on these graphs (measured on llama-3.1-8b's layer)
        _, (src_side, _) = nx.minimum_cut(net, "src", "sink", flow_func=boykov_kolmogorov, residual=residual)
        saved = {n for n in members if (n, "in") in src_side and (n, "out") not in src_side}
        nbytes = sum(net[(n, "in")][(n, "out")].get("capacity", 0.0) for n in saved)
        flops = sum(f for n, f in costs.items() if (n, "in") not in src_side)
        return saved, nbytes, flops

    def sweep(self, need: set[fx.Node]) -> list[SweepPoint]:
        """Every saved set some price selects, from the fewest bytes (price ``PRICE_MIN``) to no recompute
        (``pruned``): the vertices of the convex saved-bytes / recompute-FLOPs curve, ascending in price.

        Eisner-Severance search for the breakpoints of ``min over cuts (bytes + price * FLOPs)``: the cut at
        the price where two vertices' lines cross is either on both lines (they are adjacent) or a new vertex
        between them; ``2 * vertices - 1`` min cuts in all.
        """
        key = frozenset(need)
        if key not in self._sweeps:
            low, high = self._cut(need, PRICE_MIN), self._cut(need, None)
            cuts = [low] + self._between(need, low, high) + [high]
            # NOTE: vertex k is the min cut from its crossing with vertex k-1 to its crossing with vertex k+1
            crossings = [_crossing(a, b) for a, b in zip(cuts, cuts[1:])]
            points = []
            for (saved, _, _), lo, hi in zip(cuts, [0.0] + crossings, crossings + [_INF]):
                plan, kept, _ = self.plan("pruned_remat", saved, need)
                points.append(SweepPoint(price_low=lo, price_high=hi, plan=plan, kept=kept))
            self._sweeps[key] = points
        return self._sweeps[key]

    def _between(self, need: set[fx.Node], a: tuple, b: tuple) -> list[tuple]:
        """Vertices strictly between cut ``a`` (more recompute) and cut ``b``, ascending in price."""
        if a[2] <= b[2]:
            return []
        price = _crossing(a, b)
        c = self._cut(need, price)
        if c[0] in (a[0], b[0]) or c[1] + price * c[2] >= (a[1] + price * a[2]) * (1 - 1e-9):
            return []                           # a and b are adjacent vertices
        return self._between(need, a, c) + [c] + self._between(need, c, b)

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
            if isinstance(val, torch.Tensor) and n not in self.unsaveable:
                root = storage_root(n)
                save = 0.0 if self.storage_kind(root) == "param" else evaluate_at(self.nbytes(root), self.seq_len)
                net.add_edge((n, "in"), (n, "out"), capacity=save)
            else:     # a tuple of outputs cannot be saved as such, nor what only a LoRA branch computes
                net.add_edge((n, "in"), (n, "out"))
            if n.op == "placeholder" or torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ()):
                net.add_edge("src", (n, "in"))
            else:
                # NOTE: ties (every K=hidden matmul has the same bytes per FLOP) are broken towards earlier nodes
                cost = evaluate_at(self.flops(n), self.seq_len) * (1 + 0.05 * self.order[n] / size)
                if cost > 0:                 # zero-FLOP ops (views) are free to recompute: no source edge
                    costs[n] = cost
                    net.add_edge("src", (n, "in"))         # priced per cut on the residual network
            for u in n.users:
                if u in members:
                    net.add_edge((n, "out"), (u, "in"))
            if n in need:
                net.add_edge((n, "out"), "sink")
        return net, costs, members
