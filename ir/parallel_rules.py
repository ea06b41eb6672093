"""Placement rules of the ops in region graphs: under which input placements an op runs locally.

A rule maps a node and its inputs' placements to its *options*: pairs (input placements it needs, output
placement it gives). :func:`flexc.ir.parallel.propagate` picks the cheapest option per node; an op with no
rule in :data:`RULES` is a :class:`~flexc.ir.placements.NoRuleError` naming it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import sympy
import torch
import torch.fx as fx

from flexc.ir.graph import NODE_INFO
from flexc.ir.placements import P, R, Placement, Shard
from flexc.ir.vocab import evaluate_at

__all__ = ["RULES", "NO_PLACEMENT", "tensor_args", "is_tensor", "Ctx", "Option", "node_nbytes"]

_EVAL_TOKENS = 1009   # a prime: numeric stand-in for T where only shape structure matters


# ------------------------------------------------------------------------------------------- shapes
def _shape(n: Any) -> Optional[tuple]:
    """Global sympy shape of a node's value (tuple outputs: None)."""
    if not isinstance(n, fx.Node):
        return None
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    info = n.meta.get(NODE_INFO)
    if info is not None and info.shape is not None:
        return info.shape
    return tuple(sympy.Integer(int(s)) for s in val.shape)   # unannotated graph with static shapes


def _numeric(shape: tuple) -> tuple[int, ...]:
    return tuple(int(evaluate_at(s, _EVAL_TOKENS)) for s in shape)


def node_nbytes(n: fx.Node) -> sympy.Expr:
    shape = _shape(n)
    val = n.meta.get("val")
    if shape is None or not isinstance(val, torch.Tensor):
        return sympy.Integer(0)
    return sympy.Mul(*shape) * val.element_size() if shape else sympy.Integer(val.element_size())


# ------------------------------------------------------------------------------------------- rules
@dataclasses.dataclass
class Ctx:
    tp: int


def is_tensor(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def tensor_args(n: fx.Node) -> list[fx.Node]:
    """Tensor-valued node arguments of ``n`` in order (lists flattened, sym ints and scalars skipped)."""
    out: list[fx.Node] = []
    for a in list(n.args) + list(n.kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(x for x in a if is_tensor(x))
        elif is_tensor(a):
            out.append(a)
    return out


Option = tuple[tuple, Placement]   # (required placements of tensor_args, output placement)


def _divisible(shape: tuple, dim: int, tp: int) -> bool:
    size = sympy.sympify(shape[dim])
    return bool(size.is_Integer) and int(size) % tp == 0


def _pointwise(linear: str) -> Callable:
    """Elementwise op with broadcasting; ``linear``: 'add' (all tensors Partial), 'scale' (one tensor, scalars),
    or '' (Partial not allowed)."""
    def rule(n: fx.Node, ins: list, ctx: Ctx) -> list[Option]:
        args = tensor_args(n)
        out_shape = _shape(n)
        opts: list[Option] = [(tuple(R for _ in args), R)]
        if out_shape is None:
            return opts
        nd = len(out_shape)
        dims = set()
        for a, p in zip(args, ins):
            if isinstance(p, Shard):
                dims.add(p.dim + nd - len(_shape(a)))
        for d in sorted(dims):
            req = []
            ok = _divisible(out_shape, d, ctx.tp)
            for a in args:
                s = _shape(a)
                ad = d - (nd - len(s))
                if ad < 0 or s[ad] == 1:
                    req.append(R)
                elif s[ad] == out_shape[d]:
                    req.append(Shard(ad))
                else:
                    ok = False
            if ok:
                opts.append((tuple(req), Shard(d)))
        if linear == "add" or (linear == "scale" and len(args) == 1):
            opts.append((tuple(P for _ in args), P))
        return opts
    return rule


def _mm(n: fx.Node, ins: list, ctx: Ctx) -> list[Option]:
    table = [((R, R), R), ((Shard(0), R), Shard(0)), ((R, Shard(1)), Shard(1)), ((Shard(1), Shard(0)), P),
             ((P, R), P), ((R, P), P)]
    if str(n.target) == "aten.addmm.default":   # addmm(bias[N], a[M,K], b[K,N]): bias follows the output's N
        bias = {R: R, Shard(0): R, Shard(1): Shard(0)}
        return [((bias[out], *req), out) for req, out in table if out in bias]
    return table


def _identity(n: fx.Node, ins: list, ctx: Ctx) -> list[Option]:
    """Placement passes through (clone, detach, dtype casts): any state, Partial included."""
    p = ins[0] if ins else R
    return [((p,), p), ((R,), R)]


def _dim_map(n: fx.Node, ins: list, ctx: Ctx, mapping: Callable[[int], Optional[int]], linear: bool = True
             ) -> list[Option]:
    """Ops that move dims of their first tensor input: ``mapping(in_dim) -> out_dim`` or None (not shardable)."""
    p = ins[0]
    opts: list[Option] = [((R,), R)]
    if isinstance(p, Shard):
        d = mapping(p.dim)
        if d is not None:
            opts.append(((p,), Shard(d)))
    if linear:
        opts.append(((P,), P))
    return opts


def _norm_dim(d: int, nd: int) -> int:
    return d + nd if d < 0 else d


def _transpose(n, ins, ctx):
    nd = len(_shape(n.args[0]))
    if str(n.target) == "aten.t.default":
        a, b = 0, 1
    else:
        a, b = _norm_dim(n.args[1], nd), _norm_dim(n.args[2], nd)
    return _dim_map(n, ins, ctx, lambda d: b if d == a else a if d == b else d)


def _permute(n, ins, ctx):
    nd = len(_shape(n.args[0]))
    perm = [_norm_dim(d, nd) for d in n.args[1]]
    return _dim_map(n, ins, ctx, lambda d: perm.index(d))


def _unsqueeze(n, ins, ctx):
    nd = len(_shape(n))
    k = _norm_dim(n.args[1], nd)
    return _dim_map(n, ins, ctx, lambda d: d + 1 if d >= k else d)


def _squeeze(n, ins, ctx):
    shape = _shape(n.args[0])
    dims = n.args[1] if len(n.args) > 1 else [i for i, s in enumerate(shape) if s == 1]
    dims = [_norm_dim(d, len(shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    dims = [d for d in dims if shape[d] == 1]
    return _dim_map(n, ins, ctx, lambda d: None if d in dims else d - sum(1 for x in dims if x < d))


def _select(n, ins, ctx):
    k = _norm_dim(n.args[1], len(_shape(n.args[0])))
    return _dim_map(n, ins, ctx, lambda d: None if d == k else d - (d > k))


def _slice(n, ins, ctx):
    k = _norm_dim(n.args[1] if len(n.args) > 1 else 0, len(_shape(n.args[0])))
    return _dim_map(n, ins, ctx, lambda d: None if d == k else d)


def _expand(n, ins, ctx):
    src, dst = _shape(n.args[0]), _shape(n)
    lead = len(dst) - len(src)
    return _dim_map(n, ins, ctx, lambda d: d + lead if src[d] == dst[d + lead] else None)


def _view_groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of dims with equal products (size-1 dims alone): [(src dims, dst dims), ...]."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        if i < len(src) and src[i] == 1 and (j >= len(dst) or dst[j] != 1):
            groups.append(([i], [])); i += 1; continue
        if j < len(dst) and dst[j] == 1 and (i >= len(src) or src[i] != 1):
            groups.append(([], [j])); j += 1; continue
        gi, gj, pi, pj = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                gi.append(i); pi *= src[i]; i += 1
            else:
                gj.append(j); pj *= dst[j]; j += 1
        groups.append((gi, gj))
    return groups


def _view(n, ins, ctx):
    src, dst = _numeric(_shape(n.args[0])), _numeric(_shape(n))

    def mapping(d: int) -> Optional[int]:
        for gi, gj in _view_groups(src, dst):
            if d not in gi:
                continue
            first_in = next(x for x in gi if src[x] != 1)
            outs = [x for x in gj if dst[x] != 1]
            if d != first_in or not outs or dst[outs[0]] % ctx.tp:
                return None
            return outs[0]
        return None
    return _dim_map(n, ins, ctx, mapping)


def _cat(n, ins, ctx):
    k = _norm_dim(n.args[1] if len(n.args) > 1 else 0, len(_shape(n)))
    opts: list[Option] = [(tuple(R for _ in ins), R), (tuple(P for _ in ins), P)]
    for p in set(ins):
        if isinstance(p, Shard) and p.dim != k:
            opts.append((tuple(p for _ in ins), p))
    return opts


def _reduce(partial_ok: bool):
    """sum/mean over ``dims``: a Shard on a reduced dim gives Partial (sum) or needs Replicate (mean)."""
    def rule(n, ins, ctx):
        shape = _shape(n.args[0])
        dims = n.args[1] if len(n.args) > 1 and n.args[1] is not None else list(range(len(shape)))
        dims = [_norm_dim(d, len(shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        keep = bool(n.args[2]) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
        opts: list[Option] = [((R,), R), ((P,), P)]
        p = ins[0]
        if isinstance(p, Shard):
            if p.dim in dims:
                if partial_ok:
                    opts.append(((p,), P))
            else:
                opts.append(((p,), Shard(p.dim if keep else p.dim - sum(1 for x in dims if x < p.dim))))
        return opts
    return rule


def _select_backward(n, ins, ctx):
    k = _norm_dim(n.args[2], len(n.args[1]))
    return _dim_map(n, ins, ctx, lambda d: d + (d >= k))


def _slice_backward(n, ins, ctx):
    k = _norm_dim(n.args[2], len(n.args[1]))
    return _dim_map(n, ins, ctx, lambda d: None if d == k else d)


def _attention(n, ins, ctx):
    # attention(q[T,Hq,D], k[T,Hkv,D], v, cu, scale, window) -> (out[T,Hq,D], lse[Hq,T]): heads shard
    q, k = _numeric(_shape(n.args[0])), _numeric(_shape(n.args[1]))
    opts: list[Option] = [((R, R, R, R), (R, R))]
    if q[1] % ctx.tp == 0 and k[1] % ctx.tp == 0:
        opts.append(((Shard(1), Shard(1), Shard(1), R), (Shard(1), Shard(0))))
    return opts


def _attention_backward(n, ins, ctx):
    # (dout, q, k, v, out, lse, cu[, dlse]) -> (dq, dk, dv)
    extra = len(ins) - 7
    opts: list[Option] = [((R,) * len(ins), (R, R, R))]
    q, k = _numeric(_shape(n.args[1])), _numeric(_shape(n.args[2]))
    if q[1] % ctx.tp == 0 and k[1] % ctx.tp == 0:
        s = Shard(1)
        opts.append(((s, s, s, s, s, Shard(0), R) + (Shard(0),) * extra, (s, s, s)))
    return opts


def _replicate_only(n, ins, ctx):
    val = n.meta.get("val")
    out = tuple(R for _ in val) if isinstance(val, (tuple, list)) else R
    return [(tuple(R for _ in ins), out)]


def _factory(n, ins, ctx):
    return [(tuple(R for _ in ins), R)]


_LINEAR_ADD = _pointwise("add")
_SCALE = _pointwise("scale")
_NONLINEAR = _pointwise("")

RULES: dict[str, Callable[[fx.Node, list, Ctx], list[Option]]] = {
    "aten.mm.default": _mm, "aten.addmm.default": _mm,
    "aten.add.Tensor": _LINEAR_ADD, "aten.sub.Tensor": _LINEAR_ADD,
    "aten.mul.Tensor": _SCALE, "aten.mul.Scalar": _SCALE, "aten.div.Scalar": _SCALE, "aten.div.Tensor": _SCALE,
    "aten.neg.default": _SCALE,
    "aten.silu.default": _NONLINEAR, "aten.silu_backward.default": _NONLINEAR, "aten.pow.Tensor_Scalar": _NONLINEAR,
    "aten.rsqrt.default": _NONLINEAR, "aten.cos.default": _NONLINEAR, "aten.sin.default": _NONLINEAR,
    "aten.exp.default": _NONLINEAR, "aten.sigmoid.default": _NONLINEAR, "aten.relu.default": _NONLINEAR,
    "aten.gelu.default": _NONLINEAR, "aten.tanh.default": _NONLINEAR,
    "aten.clone.default": _identity, "aten.detach.default": _identity, "aten.alias.default": _identity,
    "aten._to_copy.default": _identity,
    "aten.t.default": _transpose, "aten.transpose.int": _transpose, "aten.permute.default": _permute,
    "aten.view.default": _view, "aten._unsafe_view.default": _view, "aten.reshape.default": _view,
    "aten.unsqueeze.default": _unsqueeze, "aten.squeeze.dim": _squeeze, "aten.squeeze.default": _squeeze,
    "aten.select.int": _select, "aten.slice.Tensor": _slice, "aten.expand.default": _expand,
    "aten.cat.default": _cat,
    "aten.sum.dim_IntList": _reduce(True), "aten.mean.dim": _reduce(False),
    "aten.select_backward.default": _select_backward, "aten.slice_backward.default": _slice_backward,
    "flexc.attention.default": _attention, "flexc.attention_backward.default": _attention_backward,
    "aten.embedding.default": _replicate_only, "aten._log_softmax.default": _replicate_only,
    "aten._log_softmax_backward_data.default": _replicate_only, "aten.nll_loss_forward.default": _replicate_only,
    "aten.nll_loss_backward.default": _replicate_only, "flexc.linear_cross_entropy.default": _replicate_only,
    "aten.zeros.default": _factory, "aten.full.default": _factory, "aten.arange.start": _factory,
    "aten.arange.default": _factory,
}
"""Op name (``str(node.target)``) -> rule: the options (input placements, output placement) it runs under."""

NO_PLACEMENT = {"aten.sym_size.int", "aten.sym_numel.default", "aten.sym_stride.int"}
