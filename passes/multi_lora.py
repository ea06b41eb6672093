"""Rewrite of a layer's inference graph: every captured LoRA branch becomes one ``flexc::lora`` call.

The captured layer template computes each adapted linear as PEFT's ``Linear``
does, with ONE adapter's ``lora_A``/``lora_B`` as graph parameters::

    y = mm(x, t(W))                      # base linear (addmm with a bias), viewed back to [1, T, H_out]
    u = mm(x, t(lora_A))                 # [T, r]   (after a dtype cast of x when the adapter is fp32)
    v = mm(view(u), t(lora_B)) * scaling # [T, H_out], viewed back to [1, T, H_out]
    out = y + v

:func:`rewrite_multi_lora` replaces each such branch by

    out = view(flexc::lora(x, y, A_stack, B_stack, seg_starts, seg_adapter, scaling), <y's view>)

so one call of the graph applies a different adapter to every segment of the
flat batch (``kernels/lora.py`` has the op's contract). The two parameters of
each branch are replaced by new placeholders, told apart by their
``meta['flexc_ref']`` (an :class:`~flexc.ir.vocab.InputRef`):
``LORA_A_STACK`` / ``LORA_B_STACK`` (``target`` is the replaced parameter's FQN
in the region, e.g. ``layer.self_attn.q_proj.lora_A.default.weight``),
``LORA_SCALING`` (``target`` is the linear, e.g. ``layer.self_attn.q_proj``;
fp32 ``[num_adapters]``, the graph's constant is in the report), and the two
placeholders every branch shares, ``SEG_STARTS`` and ``SEG_ADAPTER``.

The match is structural and strict: a LoRA parameter whose branch does not
have this shape is a ``ValueError`` naming the linear and the node, never a
silent fallback. When the branch adds in a wider dtype than the base output
(bf16 base, fp32 adapter), the base output is cast to that dtype first, so the
sum is rounded once, as in the captured graph.

The ``serve`` pass (:mod:`flexc.passes.serve`) applies it to every layer template's
forward graph; the ``prune`` pass asks :func:`branch_internals` which nodes exist
only inside a branch, so that it never keeps one of them for the backward (the
rewritten graph does not compute them).

Invariant (tests/passes/test_multi_lora.py): the rewritten graph has exactly
one ``flexc::lora`` node per adapted linear and no ``lora_A``/``lora_B``
parameter, and with one adapter in every segment it returns what the captured
graph returns with that adapter's tensors bound.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Optional

import torch
import torch.fx as fx

import flexc.kernels.lora  # noqa: F401  (registers flexc::lora)
from flexc.ir.vocab import InputKind, InputRef

logger = logging.getLogger(__name__)

__all__ = ["MultiLoraReport", "rewrite_multi_lora", "branch_internals"]

_aten = torch.ops.aten
_VIEWS = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default}
_WEIGHT_OPS = {_aten.t.default, _aten.transpose.int, _aten.permute.default}


@dataclasses.dataclass(kw_only=True)
class MultiLoraReport:
    """What :func:`rewrite_multi_lora` changed in one graph."""

    linears: list[str] = dataclasses.field(default_factory=list)
    """The adapted linears rewritten, by path in the region (``layer.mlp.down_proj``), in graph order."""
    scaling: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per linear: the constant the captured branch multiplied by (alpha / r of the compiled spec)."""
    num_lora_ops: int = 0
    """``flexc::lora`` nodes added (one per linear)."""
    num_nodes_before: int = 0
    num_nodes_after: int = 0
    modified: bool = False


def _is_shape_use(n: fx.Node) -> bool:
    """A user that reads only a size (it does not keep the value alive in a meaningful way)."""
    return n.op == "call_function" and n.target is _aten.sym_size.int


def _value_users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if not _is_shape_use(u)]


def _next(n: fx.Node, ops: set) -> Optional[fx.Node]:
    """The single value user of n if it is one of ``ops`` applied to n, else None."""
    users = _value_users(n)
    if len(users) == 1 and users[0].op == "call_function" and users[0].target in ops and users[0].args[0] is n:
        return users[0]
    return None


def _follow(n: fx.Node, ops: set) -> fx.Node:
    """Walk forward from n through single-user ops of ``ops``; the last node reached."""
    while (u := _next(n, ops)) is not None:
        n = u
    return n


def _strip_views(n: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Walk back from n through view ops: (the first non-view node, the views from it to n in order)."""
    chain = []
    while n.op == "call_function" and n.target in _VIEWS:
        chain.append(n)
        n = n.args[0]
    return n, chain[::-1]


def _is_transposed(chain: list[fx.Node]) -> bool:
    """Whether the weight ops of ``chain`` (from the parameter on) swap the two dims of a 2-d weight, once."""
    swaps = 0
    for n in chain:
        if n.target is _aten.permute.default:
            swaps += list(n.args[1]) in ([1, 0], [-1, -2])
        else:
            swaps += 1                            # t, or transpose of the only two dims of a 2-d tensor
    return swaps % 2 == 1


def _dtype(n: fx.Node) -> Optional[torch.dtype]:
    v = n.meta.get("val")
    return v.dtype if isinstance(v, torch.Tensor) else None


class _Branch:
    """The matched nodes of one LoRA branch."""

    def __init__(self, linear: str, a: fx.Node, b: fx.Node):
        self.linear, self.a, self.b = linear, a, b
        self.x = self.y = self.add = None
        self.internal: list[fx.Node] = []
        self.y_views: list[fx.Node] = []
        self.scaling = 1.0

    def fail(self, node: fx.Node, why: str) -> ValueError:
        return ValueError(f"multi_lora: the LoRA branch of {self.linear} does not have PEFT's captured shape: "
                          f"{why} at node {node.name} ({node.target})")

    def _matmul(self, param: fx.Node) -> fx.Node:
        """The mm that multiplies by the transposed parameter: mm(lhs, t(param))."""
        w, chain = param, []
        while (u := _next(w, _WEIGHT_OPS)) is not None:
            chain.append(u)
            w = u
        users = _value_users(w)
        if len(users) != 1:
            raise self.fail(w, f"expected one matmul user of {param.name}, found {len(users)}")
        mm = users[0]
        if mm.target is not _aten.mm.default or mm.args[1] is not w:
            raise self.fail(mm, f"expected aten.mm(lhs, {w.name})")
        if not _is_transposed(chain):
            raise self.fail(w, f"{param.name} is not transposed before its matmul")
        return mm

    def match(self) -> "_Branch":
        mm_a = self._matmul(self.a)
        mm_b = self._matmul(self.b)
        if _strip_views(mm_b.args[0])[0] is not mm_a:
            raise self.fail(mm_b, f"the lora_B matmul does not read the lora_A matmul {mm_a.name}")
        self.x = mm_a.args[0]
        v = _follow(mm_b, _VIEWS)
        users = _value_users(v)
        if len(users) == 1 and users[0].target is _aten.mul.Tensor:
            mul = users[0]
            other = mul.args[1] if mul.args[0] is v else mul.args[0]
            if not isinstance(other, numbers.Real) or isinstance(other, bool):
                raise self.fail(mul, "the scaling is not a constant")
            self.scaling = float(other)
            v = _follow(mul, _VIEWS)
        users = _value_users(v)
        add = users[0] if len(users) == 1 else None
        if add is None or add.target is not _aten.add.Tensor or add.kwargs.get("alpha", 1) != 1:
            raise self.fail(v, "expected the scaled LoRA output to be added to the base output")
        y = add.args[1] if add.args[0] is v else add.args[0]
        if not isinstance(y, fx.Node):
            raise self.fail(add, "the base output is not a tensor")
        self.internal = _between(mm_a, add)
        y2d, self.y_views = _strip_views(y)
        val = y2d.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() != 2:
            raise self.fail(y2d, f"the base output {y2d.name} is not [T, H_out]")
        self.y, self.add = y2d, add
        return self

    def replace(self, graph: fx.Graph, a_stack: fx.Node, b_stack: fx.Node, scaling: fx.Node,
                seg_starts: fx.Node, seg_adapter: fx.Node) -> None:
        add = self.add
        with graph.inserting_before(add):
            base = self.y
            want = _dtype(add)
            if want is not None and _dtype(base) not in (None, want):
                base = graph.call_function(_aten._to_copy.default, (base,), {"dtype": want})
            out = graph.call_function(torch.ops.flexc.lora.default,
                                      (self.x, base, a_stack, b_stack, seg_starts, seg_adapter, scaling))
            for view in self.y_views:                 # back to the shape the add had
                out = graph.call_function(view.target, (out, *view.args[1:]), dict(view.kwargs))
        add.replace_all_uses_with(out)
        graph.erase_node(add)
        self._reroute_sizes(graph)

    def _reroute_sizes(self, graph: fx.Graph) -> None:
        """Sizes read from the removed nodes (``sym_size(x @ A.T, 0)``, the token count) are read from the branch
        input instead, so nothing keeps the branch alive."""
        tokens = self.x.meta.get("val").shape[0] if isinstance(self.x.meta.get("val"), torch.Tensor) else None
        for n in self.internal:
            for u in [u for u in n.users if _is_shape_use(u)]:
                val = n.meta.get("val")
                size = val.shape[u.args[1]] if isinstance(val, torch.Tensor) else None
                if tokens is None or size is None or str(size) != str(tokens):
                    raise self.fail(u, "a size other than the token count is read from inside the branch")
                with graph.inserting_before(u):
                    again = graph.call_function(_aten.sym_size.int, (self.x, 0))
                again.meta.update(u.meta)
                u.replace_all_uses_with(again)
                graph.erase_node(u)


def _between(first: fx.Node, stop: fx.Node) -> list[fx.Node]:
    """The single-user chain from ``first`` (included) to ``stop`` (excluded): the nodes a branch computes
    from x and its weights before its output joins the base output."""
    chain, n = [], first
    while n is not stop:
        chain.append(n)
        users = _value_users(n)
        n = users[0]
    return chain


def _branches(graph: fx.Graph) -> list[_Branch]:
    params = _lora_params(graph)
    for linear, ab in params.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"multi_lora: {linear} has lora_{''.join(ab)} but not both lora_A and lora_B")
    return [_Branch(linear, ab["A"], ab["B"]).match() for linear, ab in params.items()]


def branch_internals(graph: fx.Graph) -> dict[str, list[str]]:
    """Per adapted linear, the names of the nodes only its LoRA branch computes (``x @ A.T``, ``@ B.T``, the
    scaling and their views), which the rewrite removes. ``graph`` is a forward graph whose only outputs are
    the region's (nothing saved for a backward)."""
    return {br.linear: [n.name for n in br.internal] for br in _branches(graph)}


def _lora_params(graph: fx.Graph) -> dict[str, dict[str, fx.Node]]:
    """Adapted linear path -> {'A': placeholder, 'B': placeholder}, in graph order."""
    found: dict[str, dict[str, fx.Node]] = {}
    for p in graph.find_nodes(op="placeholder"):
        ref = p.meta.get("flexc_ref")
        if not isinstance(ref, InputRef) or ref.kind is not InputKind.PARAM:
            continue
        for part in ("A", "B"):
            key = f".lora_{part}."
            if key in ref.target:
                found.setdefault(ref.target.split(key)[0], {})[part] = p
    return found


def _placeholder(graph: fx.Graph, name: str, ref: InputRef) -> fx.Node:
    p = graph.placeholder(name)
    p.meta["flexc_ref"] = ref
    return p


def rewrite_multi_lora(graph: fx.Graph) -> MultiLoraReport:
    """Replace every LoRA branch of ``graph`` (in place) by one ``flexc::lora`` call; see the module docstring.

    ``graph`` is a forward graph whose placeholders carry ``meta['flexc_ref']``; it may return saved values,
    but none from inside a branch. A graph without LoRA parameters is left as it is (``modified=False``).
    """
    report = MultiLoraReport(num_nodes_before=len(graph.nodes))
    branches = _branches(graph)
    if not branches:
        report.num_nodes_after = report.num_nodes_before
        return report
    last = graph.find_nodes(op="placeholder")[-1]
    with graph.inserting_after(last):
        seg_adapter = _placeholder(graph, "seg_adapter", InputRef(InputKind.SEG_ADAPTER))
    with graph.inserting_after(last):
        seg_starts = _placeholder(graph, "seg_starts", InputRef(InputKind.SEG_STARTS))
    for br in branches:
        with graph.inserting_after(br.b):
            scaling = _placeholder(graph, f"{br.b.name}_scaling", InputRef(InputKind.LORA_SCALING, br.linear))
        with graph.inserting_after(br.b):
            b_stack = _placeholder(graph, f"{br.b.name}_stack", InputRef(InputKind.LORA_B_STACK,
                                                                         br.b.meta["flexc_ref"].target))
        with graph.inserting_after(br.a):
            a_stack = _placeholder(graph, f"{br.a.name}_stack", InputRef(InputKind.LORA_A_STACK,
                                                                         br.a.meta["flexc_ref"].target))
        br.replace(graph, a_stack, b_stack, scaling, seg_starts, seg_adapter)
        report.linears.append(br.linear)
        report.scaling[br.linear] = br.scaling
    graph.eliminate_dead_code()
    for br in branches:
        for p in (br.a, br.b):
            if p.users:
                user = next(iter(p.users))
                raise br.fail(user, f"{p.name} is still read after the rewrite")
            graph.erase_node(p)
    graph.lint()
    report.num_lora_ops = len(branches)
    report.num_nodes_after = len(graph.nodes)
    report.modified = True
    logger.debug("multi_lora: %d LoRA branches -> flexc::lora, %d -> %d nodes", len(branches),
                 report.num_nodes_before, report.num_nodes_after)
    return report
