"""FLOPs and bytes of the compiled region graphs, kernel by kernel, as polynomials in the token count.

The roofline cost model prices an iteration from what the compiler already
knows about every node (:class:`flexc.ir.graph.NodeInfo`: FLOPs and output bytes
as sympy in the token symbol T, and under tensor parallelism the node's
placement). This module turns one graph into a :class:`KernelTable`: the kernels
a GPU would launch for it, each with FLOPs and bytes moved as a polynomial
``c0 + c1*T + c2*T^2`` per rank, so that an iteration is priced with a few
numpy operations.

What counts as a kernel:

* a matmul (``mm``/``addmm``/``bmm``, ``flexc::lora``, the fused
  ``flexc::linear_cross_entropy``) or the attention backward: one kernel; its
  bytes are its distinct inputs (weights included) plus its output;
* a maximal run of elementwise nodes between two such kernels (norms, rotary,
  activations, casts, residual adds): ONE fused kernel, which reads what the
  run takes from outside it and writes what leaves it (as a fusing compiler
  would); views and shape queries are free;
* the forward ``flexc::attention`` is left out of the table: its work depends on
  the batch (query x context pairs, K/V read from the cache), which
  :class:`AttentionCost` prices per iteration.

Values the forward returns for the backward (saved activations) are kept apart
(``saved``): only finetuning tokens write them. Collectives of a tensor-parallel
plan come from the sharded graphs the parallelize pass built
(:class:`CollectiveTable`: bytes each rank sends, ring algorithm).

Invariant (tests/runtime/test_simulator_roofline.py): for a preset, the matmul
kernels of one decode iteration and of one large prefill equal the FLOPs and
bytes built by hand from the published shapes.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Iterable, Optional

import numpy as np
import sympy
import torch.fx as fx

from flexc.ir.graph import NODE_INFO, VIEW_OPS, storage_root
from flexc.ir.vocab import TOKEN_SYMBOL

__all__ = ["KernelTable", "CollectiveTable", "AttentionCost", "kernel_table", "collective_table",
           "attention_cost", "poly"]

_MATMULS = ("aten.mm.default", "aten.addmm.default", "aten.bmm.default", "flexc.lora", "flexc.linear_cross_entropy",
            "flexc.attention_backward")
_FREE = ("aten.sym_size", "wait_tensor")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4, "int8": 1,
                "bool": 1, "uint8": 1}
_POWERS = 3


def poly(expr: Any) -> np.ndarray:
    """Coefficients ``[c0, c1, c2]`` of a sympy expression in T (other symbols, e.g. a sequence count, set to 1)."""
    expr = sympy.sympify(expr)
    others = {s: 1 for s in expr.free_symbols if s != TOKEN_SYMBOL}
    expr = sympy.expand(expr.xreplace(others)) if others else sympy.expand(expr)
    p = sympy.Poly(expr, TOKEN_SYMBOL)
    if p.degree() >= _POWERS:
        raise ValueError(f"cost {expr} is of degree {p.degree()} in T; the roofline model handles up to T^2")
    out = np.zeros(_POWERS)
    for (k,), c in p.terms():
        out[k] = float(c)
    return out


def _powers(tokens: Any) -> np.ndarray:
    t = np.asarray(tokens, dtype=float)
    return np.stack([np.ones_like(t), t, t * t], axis=-1)


@dataclasses.dataclass(frozen=True)
class KernelTable:
    """The kernels of one graph on one rank (rows), polynomials in T (columns: 1, T, T^2)."""

    flops: np.ndarray
    """[K, 3] FLOPs of each kernel."""
    nbytes: np.ndarray
    """[K, 3] bytes each kernel reads and writes, saved activations excluded."""
    saved: np.ndarray
    """[K, 3] bytes each kernel writes only because the backward keeps them (finetuning tokens only)."""
    kinds: tuple[str, ...]
    """``matmul`` or ``fused`` (a run of elementwise nodes) per kernel."""

    @property
    def num_kernels(self) -> int:
        return len(self.kinds)

    def __post_init__(self) -> None:
        # NOTE: columns as contiguous arrays: an iteration evaluates every table once, so this is the hot path
        for name in ("flops", "nbytes", "saved"):
            m = getattr(self, name)
            for k in range(_POWERS):
                object.__setattr__(self, f"_{name}{k}", np.ascontiguousarray(m[:, k]))
        object.__setattr__(self, "_has_saved", bool(np.any(self.saved)))

    def seconds(self, tokens: float, compute_rate: float, memory_rate: float, overhead: float,
                saved_tokens: float = 0.0) -> float:
        """Sum over kernels of max(FLOPs / compute_rate, bytes / memory_rate) + overhead, at ``tokens`` tokens
        of which ``saved_tokens`` keep their activations for the backward."""
        if tokens <= 0 or not self.kinds:
            return 0.0
        t = float(tokens)
        f = self._flops0 + t * (self._flops1 + t * self._flops2)
        b = self._nbytes0 + t * (self._nbytes1 + t * self._nbytes2)
        if saved_tokens and self._has_saved:
            st = float(saved_tokens)
            b = b + (self._saved0 + st * (self._saved1 + st * self._saved2))
        return float(np.maximum(f * (1.0 / compute_rate), b * (1.0 / memory_rate)).sum()) + overhead * len(self.kinds)

    def seconds_by_kind(self, tokens: float, compute_rate: float, memory_rate: float, overhead: float
                        ) -> dict[str, float]:
        """:meth:`seconds` (no saved activations) split by kernel kind."""
        p = _powers(tokens)
        each = np.maximum((self.flops @ p) / compute_rate, (self.nbytes @ p) / memory_rate) + overhead
        return {k: float(sum(e for e, kk in zip(each, self.kinds) if kk == k)) for k in sorted(set(self.kinds))}

    def totals(self, tokens: float, kind: Optional[str] = None) -> tuple[float, float]:
        """(FLOPs, bytes) at ``tokens`` tokens, over all kernels or those of one kind."""
        rows = [i for i, k in enumerate(self.kinds) if kind is None or k == kind]
        p = _powers(tokens)
        return float((self.flops[rows] @ p).sum()), float((self.nbytes[rows] @ p).sum())


@dataclasses.dataclass(frozen=True)
class CollectiveTable:
    """The collectives of one sharded graph: bytes each rank sends, polynomials in T."""

    nbytes: np.ndarray
    """[C, 3]."""

    def seconds(self, tokens: float, link_rate: float, latency: float) -> float:
        if tokens <= 0 or not len(self.nbytes):
            return 0.0
        return float((self.nbytes @ _powers(tokens)).sum()) / link_rate + latency * len(self.nbytes)


EMPTY_COLLECTIVES = CollectiveTable(nbytes=np.zeros((0, _POWERS)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionCost:
    """The forward attention of one decoder layer on one rank, priced per iteration."""

    pair_flops: float
    """FLOPs per (query token, context token) pair: QK^T and PV over the rank's heads (4 * heads * head_dim)."""
    kv_bytes_per_token: float
    """K and V bytes of one context token in one layer on this rank (what a decode reads from the cache)."""
    qo_bytes_per_token: float
    """Query and output bytes of one new token (read and written once)."""

    def seconds(self, pairs: float, kv_tokens: float, new_tokens: float, compute_rate: float, memory_rate: float,
                overhead: float) -> float:
        """One kernel over the whole batch: max(pairs' FLOPs, K/V read + q/out bytes) at the rates, + overhead."""
        if new_tokens <= 0:
            return 0.0
        flops = self.pair_flops * pairs
        nbytes = self.kv_bytes_per_token * kv_tokens + self.qo_bytes_per_token * new_tokens
        return max(flops / compute_rate, nbytes / memory_rate) + overhead


# ------------------------------------------------------------------------------------------- building tables
def _target(n: fx.Node) -> str:
    return str(n.target)


def _is_free(n: fx.Node) -> bool:
    t = _target(n)
    return (n.op != "call_function" or t in VIEW_OPS or n.target is operator.getitem
            or any(f in t for f in _FREE))


def _is_matmul(n: fx.Node) -> bool:
    t = _target(n)
    return any(m in t for m in _MATMULS)


def _is_forward_attention(n: fx.Node) -> bool:
    t = _target(n)
    return "flexc.attention" in t and "backward" not in t


def _split(placement: Any) -> bool:
    from flexc.ir.parallel import Shard
    items = placement if isinstance(placement, tuple) else (placement,)
    return any(isinstance(p, Shard) for p in items)


class _Sizer:
    """Per-rank byte and FLOP polynomials of nodes (memoized: many nodes share inputs)."""

    def __init__(self, tp: int):
        self.tp = tp
        self._bytes: dict[fx.Node, np.ndarray] = {}

    def nbytes(self, n: fx.Node) -> np.ndarray:
        """Bytes of a node's value on one rank (a view: its own shape; a multi-output op: 0)."""
        if n not in self._bytes:
            info = n.meta.get(NODE_INFO)
            if info is None or info.shape is None or info.dtype is None:
                self._bytes[n] = np.zeros(_POWERS)
            else:
                numel = sympy.Integer(1)
                for s in info.shape:
                    numel *= s
                b = poly(numel) * _DTYPE_BYTES.get(info.dtype, 4)
                self._bytes[n] = b / self.tp if self.tp > 1 and _split(info.placement) else b
        return self._bytes[n]

    def flops(self, n: fx.Node) -> np.ndarray:
        """FLOPs one rank computes: a share when the work is split (an output shard, or a matmul with a sharded
        operand); whole when every operand is whole (a Partial input is a full-size tensor)."""
        info = n.meta.get(NODE_INFO)
        if info is None:
            return np.zeros(_POWERS)
        f = poly(info.flops)
        if self.tp > 1 and (_split(info.placement) or (_is_matmul(n) and any(
                _split(a.meta[NODE_INFO].placement) for a in n.all_input_nodes if NODE_INFO in a.meta))):
            return f / self.tp
        return f

    def reads(self, n: fx.Node, inside: set) -> dict[fx.Node, np.ndarray]:
        """The storages node ``n`` reads that were not produced inside ``inside``, with their bytes."""
        out = {}
        for i, a in enumerate(n.args):
            if not isinstance(a, fx.Node):
                continue
            root = storage_root(a)
            if root in inside:
                continue
            if "aten.embedding" in _target(n) and i == 0:
                out[n] = self.nbytes(n)       # a gather reads the rows it returns, not the whole table
            else:
                out[root] = self.nbytes(root)
        return out


def _read_outside(n: fx.Node, inside: set) -> bool:
    """Whether a computation outside the kernel ``inside`` reads ``n``'s value (directly or through views)."""
    stack, seen = list(n.users), set()
    while stack:
        u = stack.pop()
        if u in seen or u in inside or u.op == "output":
            continue
        seen.add(u)
        if _is_free(u):
            stack.extend(u.users)         # a view or a shape query: look at what reads it
            continue
        return True
    return False


def _returned(gm: fx.GraphModule, user_only: bool) -> tuple[set, set]:
    """(storages the graph returns as region outputs, storages it returns for the backward)."""
    out = gm.graph.find_nodes(op="output")[0]
    refs = out.meta.get("flexc_ref") or []
    user, saved = set(), set()
    for i, a in enumerate(out.args[0]):
        if not isinstance(a, fx.Node):
            continue
        kind = refs[i].kind if i < len(refs) else "user"
        (saved if kind == "saved" and not user_only else user).add(storage_root(a))
    return user, saved


def kernel_table(gm: fx.GraphModule, tp: int = 1, *, keep_attention: bool = True) -> KernelTable:
    """The kernels of an annotated region graph on one of ``tp`` ranks (see the module docstring);
    ``keep_attention=False`` leaves the forward ``flexc::attention`` out (priced per batch instead)."""
    size = _Sizer(tp)
    user_out, saved_out = _returned(gm, user_only=False)
    rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    group: list[fx.Node] = []

    def close() -> None:
        if not group:
            return
        inside = set(group)
        reads: dict[fx.Node, np.ndarray] = {}
        f = np.zeros(_POWERS)
        b = np.zeros(_POWERS)
        s = np.zeros(_POWERS)
        for n in group:
            reads.update(size.reads(n, inside))
            f += size.flops(n)
            if n in user_out or _read_outside(n, inside):
                b += size.nbytes(n)
            elif n in saved_out:
                s += size.nbytes(n)       # written only for the backward
        b += sum(reads.values(), np.zeros(_POWERS))
        rows.append(("fused", f, b, s))
        group.clear()

    for n in gm.graph.nodes:
        if _is_free(n):
            continue
        if _is_forward_attention(n) and not keep_attention:
            close()
            continue
        if _is_matmul(n) or _is_forward_attention(n):
            close()
            reads = size.reads(n, set())
            b = sum(reads.values(), np.zeros(_POWERS)) + size.nbytes(n)
            outs = [u for u in n.users if u.target is operator.getitem]   # multi-output ops write via getitems
            b = b + sum((size.nbytes(u) for u in outs), np.zeros(_POWERS))
            rows.append(("matmul", size.flops(n), b, np.zeros(_POWERS)))
            continue
        group.append(n)
    close()
    if not rows:
        z = np.zeros((0, _POWERS))
        return KernelTable(flops=z, nbytes=z, saved=z, kinds=())
    kinds, f, b, s = zip(*rows)
    return KernelTable(flops=np.stack(f), nbytes=np.stack(b), saved=np.stack(s), kinds=tuple(kinds))


def collective_table(gm: Optional[fx.GraphModule], tp: int) -> CollectiveTable:
    """Bytes each rank sends for every collective of a sharded graph (all-reduce 2(tp-1)/tp of the tensor,
    all-gather (tp-1)/tp), from the annotation of the value each collective moves."""
    if gm is None or tp <= 1:
        return EMPTY_COLLECTIVES
    from flexc.ir.sharded import COLLECTIVE_OPS
    size = _Sizer(1)
    rows = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or _target(n) not in COLLECTIVE_OPS:
            continue
        src = n.args[0]
        while isinstance(src, fx.Node) and NODE_INFO not in src.meta and src.args:
            src = src.args[0]             # all-gather: through the movedim/clone the pass inserted
        whole = size.nbytes(src) if isinstance(src, fx.Node) else np.zeros(_POWERS)
        factor = 2 * (tp - 1) / tp if "all_reduce" in _target(n) else (tp - 1) / tp
        rows.append(whole * factor)
    return CollectiveTable(nbytes=np.stack(rows) if rows else np.zeros((0, _POWERS)))


def attention_cost(gm: fx.GraphModule, tp: int, kv_bytes_per_token: float) -> AttentionCost:
    """The forward attention of a layer graph: FLOPs per pair from the op's annotation (its FLOPs are those of
    causal attention over one sequence of T tokens, T^2/2 pairs), K/V bytes per context token given (the
    memory plan's per layer), query/output bytes from the op's inputs."""
    nodes = [n for n in gm.graph.nodes if _is_forward_attention(n)]
    if not nodes:
        raise ValueError("the layer graph has no flexc::attention node to price")
    size = _Sizer(tp)
    pair_flops = qo = 0.0
    for n in nodes:
        pair_flops += 2 * size.flops(n)[2]
        q = storage_root(n.args[0])
        qo += 2 * size.nbytes(q)[1]
    return AttentionCost(pair_flops=float(pair_flops), kv_bytes_per_token=float(kv_bytes_per_token),
                         qo_bytes_per_token=float(qo))


def tables_for(graphs: Iterable[Optional[fx.GraphModule]], tp: int, **kw: Any) -> list[Optional[KernelTable]]:
    """``kernel_table`` of each graph (None stays None)."""
    return [kernel_table(g, tp, **kw) if g is not None else None for g in graphs]
