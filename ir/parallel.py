"""Propagation of parallel tensor states through region graphs.

Every tensor of a region graph, on ``tp`` ranks, is in one of three states
(the DTensor vocabulary):

* :class:`Replicate`: every rank holds the whole tensor;
* :class:`Shard` ``(dim)``: rank i holds the i-th of ``tp`` equal chunks along ``dim``;
* :class:`Partial`: every rank holds a full-size tensor and the value is their sum.

:func:`propagate` walks a graph in order, starting from the placements of its
placeholders (weights from a tensor-parallel plan, activations replicated), and
gives each node a placement by the rule of its op (``RULES``; an op without a
rule raises :class:`NoRuleError` naming the op). A rule lists the input
placements under which the op can run locally and the output each gives; where
an input has another placement, the cheapest option is taken and the input is
redistributed first (Partial -> Replicate is an all-reduce, Shard -> Replicate
an all-gather, Replicate -> Shard a free local chunk). Those redistributions are
the communication of the plan: :class:`Propagation` lists them with their bytes
(sympy in the token symbol T).

:func:`flexc.ir.sharded.make_sharded_graph` turns a graph and its propagation
into the graph every rank runs.

Invariant (tests/ir/test_parallel.py): the redistributions are exactly the
communication a rank needs, e.g. one all-reduce for a Megatron MLP.

Example: a row-parallel ``o_proj`` (weight ``Shard(1)``) multiplies an input
``Shard(1)``; ``mm`` gives ``Partial``; the residual ``add`` with a ``Replicate``
operand needs ``Replicate``, so the propagation all-reduces there:
``2*(tp-1)/tp * T*hidden*bytes`` per rank.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from fractions import Fraction
from typing import Any, Callable, Optional, Sequence

import sympy
import torch.fx as fx

from flexc.ir.graph import NODE_INFO
from flexc.ir.parallel_rules import NO_PLACEMENT, RULES, Ctx, is_tensor, node_nbytes, tensor_args
from flexc.ir.placements import P, R, NoRuleError, Placement, Propagation, Redistribution, Shard, redistribution, \
    redistribution_cost
from flexc.ir.vocab import TOKEN_SYMBOL, evaluate_at

__all__ = ["propagate"]


class _Propagator:
    """One walk of :func:`propagate` over a graph: placements so far and the redistributions they need."""

    def __init__(self, tp: int, tokens: int, cache: dict, eager_reduce: Callable[[fx.Node], bool],
                 replicated: Callable[[fx.Node], bool]):
        self.tp, self.tokens, self.cache = tp, tokens, cache
        self.eager_reduce, self.replicated = eager_reduce, replicated
        self.ctx = Ctx(tp)
        self.pl: dict[str, Placement] = {}
        self.redists: list[Redistribution] = []
        self.index: dict[tuple[str, Any], int] = {}
        self.full = _Poly()
        self.sharded = _Poly()

    def nbytes(self, a: fx.Node) -> tuple[sympy.Expr, float]:
        key = ("bytes", a)
        if key not in self.cache:
            nb = node_nbytes(a)
            self.cache[key] = (nb, evaluate_at(nb, self.tokens))
        return self.cache[key]

    def _redistribution(self, a: fx.Node, src: Placement, dst: Placement) -> Optional[tuple[str, sympy.Expr]]:
        key = ("redist", a, src, dst)
        if key not in self.cache:
            self.cache[key] = redistribution(src, dst, self.nbytes(a)[0], self.tp)
        return self.cache[key]

    def need(self, arg: fx.Node, dst: Placement, consumer: str) -> None:
        """``consumer`` needs ``arg`` as ``dst``: record the redistribution (one per value and placement)."""
        src = self.pl[arg.name]
        if src == dst:
            return
        key = (arg.name, dst)
        if key in self.index:          # one collective serves every consumer that wants the same placement
            r = self.redists[self.index[key]]
            self.redists[self.index[key]] = dataclasses.replace(r, consumers=r.consumers + (consumer,))
            return
        kind, nb = self._redistribution(arg, src, dst)
        self.index[key] = len(self.redists)
        self.redists.append(Redistribution(arg.name, (consumer,), src, dst, kind, nb))

    def outputs(self, n: fx.Node, want_of: Callable[[int, fx.Node], Optional[Placement]]) -> None:
        for i, a in enumerate(n.args[0]):
            want = want_of(i, a) if isinstance(a, fx.Node) else None
            if want is not None and is_tensor(a):
                if redistribution(self.pl[a.name], want, sympy.Integer(0), self.tp) is None:
                    raise ValueError(f"output {i} ({a.name}) is {self.pl[a.name]}, cannot become {want}")
                self.need(a, want, f"output.{i}")

    def _best(self, n: fx.Node, args: Sequence[fx.Node], ins: tuple, whole: bool) -> "_Decision":
        """The rule's option for inputs placed ``ins`` with the cheapest input redistribution (ties: listed
        first); a pure function of the node, ``ins`` and ``whole``, so it is cached across walks."""
        target = str(n.target)
        rule = RULES.get(target)
        if rule is None:
            raise NoRuleError(f"no parallel placement rule for op {target} (node {n.name}); "
                              f"add one to flexc.ir.parallel_rules.RULES")
        options = rule(n, list(ins), self.ctx)
        if whole:
            options = [(req, out) for req, out in options
                       if all(p == R for p in req) and all(p == R for p in (out if isinstance(out, tuple) else (out,)))]
        best, best_cost = None, math.inf
        for req, out in options:
            cost = 0.0
            for a, p, want in zip(args, ins, req):
                c = 0.0 if p == want else redistribution_cost(p, want, self.nbytes(a)[1], self.tp)
                if c is None:
                    cost = math.inf
                    break
                cost += c
            if cost < best_cost:
                best, best_cost = (req, out), cost
        if best is None:
            raise NoRuleError(f"op {target} (node {n.name}): no option of its rule accepts inputs "
                              f"{[str(p) for p in ins]}")
        req, out = best
        moves = tuple((a, want) for a, p, want in zip(args, ins, req) if p != want)
        split = any(isinstance(p, Shard) for p in req) or isinstance(out, Shard)
        return _Decision(out=out, moves=moves, split=split)

    def op(self, n: fx.Node, args: tuple[fx.Node, ...], flops: Optional["_Poly"]) -> None:
        """Place one call node: the rule's option with the cheapest input redistribution (ties: listed first)."""
        pl = self.pl
        ins = tuple([pl[a.name] for a in args])
        whole = self.replicated(n)
        key = ("best", n, ins, whole)
        d = self.cache.get(key)
        if d is None:
            d = self.cache[key] = self._best(n, args, ins, whole)
        for a, want in d.moves:
            self.need(a, want, n.name)
        if flops is not None:
            (self.sharded if d.split else self.full).add(flops)
        out = d.out
        if out == P and self.eager_reduce(n):
            kind, nb = self._redistribution(n, P, R)
            self.redists.append(Redistribution(n.name, (), P, R, kind, nb))
            out = R
        pl[n.name] = out


@dataclasses.dataclass(frozen=True)
class _Decision:
    """What an op does under given input placements: its output, the inputs it needs redistributed (value,
    placement wanted) and whether its work is split over the ranks."""

    out: Any
    moves: tuple
    split: bool


class _Poly:
    """A sum of FLOP counts. Polynomials in T (what node FLOPs are) are kept as exact coefficients by degree:
    adding one is a few integer additions, where a sympy ``Add`` re-sorts every term each walk. Any other
    expression is kept as it is and added with sympy at the end."""

    def __init__(self, terms: Optional[dict[int, Any]] = None, other: tuple = ()):
        self.terms: dict[int, Any] = dict(terms or {})
        self.other: list[sympy.Expr] = list(other)

    @staticmethod
    def of(expr: Any) -> "_Poly":
        expr = sympy.sympify(expr)
        if expr.free_symbols - {TOKEN_SYMBOL} or not expr.is_polynomial(TOKEN_SYMBOL):
            return _Poly(other=(expr,))
        terms = {}
        for (k,), c in sympy.Poly(expr, TOKEN_SYMBOL).terms():
            terms[k] = Fraction(int(c.p), int(c.q)) if c.q != 1 else int(c.p)
        return _Poly(terms)

    def add(self, other: "_Poly") -> None:
        for k, c in other.terms.items():
            self.terms[k] = self.terms.get(k, 0) + c
        self.other.extend(other.other)

    def expr(self, scale: int = 1) -> sympy.Expr:
        poly = [sympy.Rational(c.numerator, c.denominator * scale) * TOKEN_SYMBOL ** k
                for k, c in sorted(self.terms.items()) if c]
        return sympy.Add(*poly, sympy.Add(*self.other) / scale)


def _static(gm: fx.GraphModule) -> list[tuple]:
    """(node, kind, tensor args, FLOPs) of every node: what a walk needs that does not change between walks."""
    out = []
    for n in gm.graph.nodes:
        kind = _kind(n)
        if kind != "op":
            out.append((n, kind, (), None))
            continue
        info = n.meta.get(NODE_INFO)
        flops = _Poly.of(info.flops) if info is not None and info.flops != 0 else None
        out.append((n, kind, tuple(tensor_args(n)), flops))
    return out


def _kind(n: fx.Node) -> str:
    if n.op in ("placeholder", "output"):
        return n.op
    if n.target is operator.getitem:
        return "getitem"
    return "none" if str(n.target) in NO_PLACEMENT else "op"


def propagate(gm: fx.GraphModule, inputs: dict[str, Placement], tp: int, *,
              outputs: Optional[Callable[[int, fx.Node], Optional[Placement]]] = None,
              eager_reduce: Callable[[fx.Node], bool] = lambda n: False,
              replicated: Callable[[fx.Node], bool] = lambda n: False, tokens: int = 2048,
              cache: Optional[dict] = None) -> Propagation:
    """Placements of every node of ``gm`` from the placements of its placeholders (``inputs`` by name).

    For each op the rule's option with the cheapest input redistribution (bytes at ``tokens`` tokens) is
    taken; ties go to the option listed first. ``outputs(i, value_node)`` gives the placement output i must
    have (None: as it is). ``eager_reduce(node)``: all-reduce a Partial result of this node at once (the
    cost model uses it to move a reduction from a weight gradient to an activation or back).
    ``replicated(node)``: the node computes on whole tensors only (the naive plan's adapters).
    ``cache``: a dict reused across calls on the same graph (rule options and byte counts per node).
    """
    w = _Propagator(tp, tokens, {} if cache is None else cache, eager_reduce, replicated)
    walk = w.cache.get(("walk", gm))
    if walk is None:            # NOTE: what each node is does not change between walks (the search walks hundreds)
        walk = w.cache[("walk", gm)] = _static(gm)
    for n, kind, args, flops in walk:
        if kind == "op":
            w.op(n, args, flops)
        elif kind == "placeholder":
            w.pl[n.name] = inputs.get(n.name, R) if is_tensor(n) else None
        elif kind == "output":
            if outputs is not None:
                w.outputs(n, outputs)
        elif kind == "getitem":
            src = w.pl.get(n.args[0].name)
            w.pl[n.name] = src[n.args[1]] if isinstance(src, tuple) else src
        else:
            w.pl[n.name] = None
    flops = w.full.expr() + w.sharded.expr(scale=tp)
    return Propagation(placements=w.pl, redistributions=w.redists, flops=flops)
