"""The annotated region graph: every node of a captured forward/backward graph with what it is.

``annotate`` writes exactly one meta key, ``node.meta[NODE_INFO]`` (a
:class:`NodeInfo`), on every node of the region's graphs. Passes read it; only
``annotate`` writes it (the parallelize pass fills ``NodeInfo.placement``).

Example: in a Llama layer template the node computing ``x @ A.T`` of
``layer.self_attn.q_proj.lora_A.default`` has role ``adapter_A``, shape
``(T, r)`` with ``T`` the token symbol, and ``flops = 2*T*r*hidden``.
"""
from __future__ import annotations

import dataclasses
import enum
import operator
import re
from typing import Any, Iterable, Optional

import sympy
import torch
import torch.fx as fx

from flexc.ir.vocab import CapturedRegion

__all__ = ["Role", "NodeInfo", "RegionGraph", "CompiledGraph", "NODE_INFO", "annotate", "storage_root", "value_bytes", "VIEW_OPS",
           "Decision", "DECISION", "node_flops"]

NODE_INFO = "flexc_info"
"""The meta key ``annotate`` writes (a :class:`NodeInfo`)."""


DECISION = "flexc_decision"
"""The meta key the prune pass writes on every forward node of a partitioned region (a :class:`Decision`);
it travels with the node into the forward graph and, for recomputed nodes, into the backward graph."""


class Decision(str, enum.Enum):
    """What the partition does with one forward value (written by the prune pass under :data:`DECISION`)."""

    SAVE = "save"
    """Kept from the forward for the backward (costs its storage's bytes between forward and backward)."""
    RECOMPUTE = "recompute"
    """Computed again in the backward from saved values (costs its FLOPs once more)."""
    DROP = "drop"
    """Not needed by the backward: freed after its last forward use."""


class Role(str, enum.Enum):
    """What a node computes, by the model part it belongs to."""

    EMBEDDING = "embedding"
    BASE_LINEAR = "base_linear"
    ADAPTER_A = "adapter_A"
    ADAPTER_B = "adapter_B"
    NORM = "norm"
    ROTARY = "rotary"
    ATTENTION = "attention"
    ACTIVATION = "activation"
    ELEMENTWISE = "elementwise"
    LM_HEAD = "lm_head"
    LOSS = "loss"
    INPUT = "input"
    OUTPUT = "output"


@dataclasses.dataclass
class NodeInfo:
    """Annotation of one graph node (values in bytes / FLOPs, sympy in the token symbol T)."""

    role: Role
    phase: str
    """``forward`` or ``backward`` (nodes of the backward graph, recomputed forward nodes included)."""
    module: str
    """FQN inside the region (``layer.mlp.down_proj.lora_A.default``), '' if none."""
    layer: Optional[int]
    """Decoder layer index for per-layer graphs, None for a shared template or non-layer region."""
    dtype: Optional[str]
    shape: Optional[tuple]
    """Shape with the token dimension as :data:`TOKEN_SYMBOL`; None for non-tensor values."""
    nbytes: sympy.Expr
    """Bytes of the node's output (0 for views: they share their base's storage)."""
    flops: sympy.Expr
    """Floating point operations to compute the node (matmuls 2*M*N*K, elementwise one per element)."""
    placement: Any = None
    """Parallel state of the node's value; filled by the parallelize pass."""


VIEW_OPS = frozenset({
    "aten.t.default", "aten.view.default", "aten.permute.default", "aten.transpose.int",
    "aten._unsafe_view.default", "aten.expand.default", "aten.alias.default", "aten.reshape.default",
    "aten.unsqueeze.default", "aten.select.int", "aten.slice.Tensor", "aten.squeeze.dim",
    "aten.detach.default", "aten.squeeze.default", "aten.as_strided.default", "aten.split.Tensor",
    "aten.unbind.int",
})
_MM_OPS = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default"}
_ROTARY_OPS = {"aten.mul.Tensor", "aten.neg.default", "aten.cat.default", "aten.add.Tensor"}



_FQN_RES = (
    (re.compile(r"^L\['self'\]\.?"), ""),
    (re.compile(r"\.?__dict__\['_modules'\]\['([^']+)'\]"), r".\1"),
    (re.compile(r"\.?_modules\['([^']+)'\]"), r".\1"),
    (re.compile(r"\[(\d+)\]"), r".\1"),
)


def module_fqn(node: fx.Node) -> str:
    """Fully qualified name (inside the region) of the innermost module a node came from, '' if none.

    Forward nodes and recomputed forward nodes carry ``nn_module_stack``,
    backward nodes ``fwd_nn_module_stack``.
    """
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    for rx, rep in _FQN_RES:
        path = rx.sub(rep, path)
    return path.lstrip(".")


def storage_root(n: fx.Node) -> fx.Node:
    """The node owning ``n``'s storage: walk views and ``detach`` back; an output of a multi-output op that is
    not a view (the ``(out, lse)`` of attention) owns its own storage, one of ``split``/``unbind`` does not."""
    while n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node):
        if n.target is operator.getitem:
            src = n.args[0]
            if str(src.target) not in VIEW_OPS:
                return n
            n = src
        elif str(n.target) in VIEW_OPS:
            n = n.args[0]
        else:
            return n
    return n


def value_bytes(n: fx.Node, cap: CapturedRegion) -> sympy.Expr:
    """Bytes of the tensor a node computes (whether or not it owns its storage), sympy in T; 0 for non-tensors."""
    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return sympy.Integer(0)
    return sympy.Integer(v.element_size()) * _numel(cap.to_token_expr(d) for d in v.shape)


def _role(n: fx.Node, fqn: str, region: str) -> Role:
    if n.op == "placeholder":
        return Role.INPUT
    if n.op == "output":
        return Role.OUTPUT
    target = str(n.target)
    if "flexc.attention" in target:
        return Role.ATTENTION
    if "flexc.linear_cross_entropy" in target:      # lm_head matmul and loss fused, chunk by chunk
        return Role.LM_HEAD
    parts = fqn.split(".")
    if "lora_A" in parts:
        return Role.ADAPTER_A
    if "lora_B" in parts:
        return Role.ADAPTER_B
    leaf = parts[-1] if fqn else ""
    if "embed_tokens" in parts:
        return Role.EMBEDDING
    if "rotary_emb" in parts:
        return Role.ROTARY
    if leaf.endswith("norm") or leaf.endswith("layernorm"):
        return Role.NORM
    if leaf == "act_fn":
        return Role.ACTIVATION
    if "lm_head" in parts:
        return Role.LM_HEAD
    if leaf.endswith("_proj") or leaf == "base_layer":
        return Role.BASE_LINEAR if target in _MM_OPS else Role.ELEMENTWISE
    if leaf == "self_attn" and target in _ROTARY_OPS:
        return Role.ROTARY
    if region == "head" and not fqn:
        return Role.LOSS
    return Role.ELEMENTWISE


def _numel(shape: Iterable[sympy.Expr]) -> sympy.Expr:
    out = sympy.Integer(1)
    for s in shape:
        out *= s
    return out


def _flops(n: fx.Node, cap: CapturedRegion, out_shape: Optional[tuple]) -> sympy.Expr:
    target = str(n.target)
    if n.op != "call_function" or out_shape is None:
        return sympy.Integer(0)
    if target in _MM_OPS:
        a = n.args[1] if target == "aten.addmm.default" else n.args[0]
        k = cap.to_token_expr(a.meta["val"].shape[-1])
        return 2 * _numel(out_shape) * k
    if "flexc.attention" in target:
        q = n.args[1] if "backward" in target else n.args[0]
        t, hq, d = (cap.to_token_expr(s) for s in q.meta["val"].shape)
        fwd = 2 * t * t * hq * d       # causal QK^T and PV over one sequence of T tokens (upper bound)
        return fwd * 5 // 2 if "backward" in target else fwd
    if "flexc.linear_cross_entropy" in target:
        t, h = (cap.to_token_expr(s) for s in n.args[0].meta["val"].shape)
        v = cap.to_token_expr(n.args[1].meta["val"].shape[0])
        return 4 * t * h * v           # logits (2*T*H*V) and their input gradient (2*T*H*V), chunk by chunk
    if target in VIEW_OPS:
        return sympy.Integer(0)
    return _numel(out_shape)


def node_flops(n: fx.Node, cap: CapturedRegion) -> sympy.Expr:
    """FLOPs of one node of any of the region's graphs (joint included), sympy in T; see :class:`NodeInfo`."""
    val = n.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0] if val and isinstance(val[0], torch.Tensor) else None
    return _flops(n, cap, _shape(cap, val))


def _shape(cap: CapturedRegion, val: Any) -> Optional[tuple]:
    if isinstance(val, torch.Tensor):
        return tuple(cap.to_token_expr(s) for s in val.shape)
    return None


def _info(n: fx.Node, cap: CapturedRegion, region: str, phase: str) -> NodeInfo:
    val = n.meta.get("val")
    multi = isinstance(val, (tuple, list))
    if multi:   # a multi-output op: its getitem users own (and count) the bytes of each output
        val = val[0] if val and isinstance(val[0], torch.Tensor) else None
    fqn = module_fqn(n)
    shape = _shape(cap, val)
    owns = not multi and storage_root(n) is n           # views (and split/unbind pieces) share their base's
    nbytes = _numel(shape) * val.element_size() if shape is not None and owns else sympy.Integer(0)
    return NodeInfo(role=_role(n, fqn, region), phase=phase, module=fqn, layer=None,
                    dtype=str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None,
                    shape=shape, nbytes=sympy.sympify(nbytes), flops=_flops(n, cap, shape))


@dataclasses.dataclass
class RegionGraph:
    """One captured region with annotated graphs: what the passes work on.

    ``layers`` lists the decoder layers that share this graph (a template),
    empty for the embedding and head regions.
    """

    name: str
    captured: CapturedRegion
    layers: list[int] = dataclasses.field(default_factory=list)

    @property
    def fw(self) -> fx.GraphModule:
        return self.captured.fw

    @property
    def bw(self) -> Optional[fx.GraphModule]:
        return self.captured.bw

    def nodes(self, phase: Optional[str] = None) -> Iterable[fx.Node]:
        """Annotated nodes of the forward and/or backward graph."""
        if phase in (None, "forward"):
            yield from self.fw.graph.nodes
        if phase in (None, "backward") and self.bw is not None:
            yield from self.bw.graph.nodes

    def total_flops(self, phase: str) -> sympy.Expr:
        """Sum of node FLOPs of one graph, a polynomial in T (expanded: ``sympy.simplify`` took 0.2 s a graph)."""
        return sympy.expand(sympy.Add(*(n.meta[NODE_INFO].flops for n in self.nodes(phase))))

    def summary(self) -> dict:
        """Counts for plan.json: nodes per phase and per role."""
        roles: dict[str, int] = {}
        for n in self.nodes():
            r = n.meta[NODE_INFO].role.value
            roles[r] = roles.get(r, 0) + 1
        return {
            "layers": list(self.layers),
            "forward_nodes": len(self.fw.graph.nodes),
            "backward_nodes": len(self.bw.graph.nodes) if self.bw is not None else 0,
            "roles": dict(sorted(roles.items())),
            "forward_flops": str(self.total_flops("forward")),
            "backward_flops": str(self.total_flops("backward")),
        }


def annotate(graph: RegionGraph) -> RegionGraph:
    """Write ``meta[NODE_INFO]`` on every node of the region's forward and backward graphs."""
    layer = graph.layers[0] if len(graph.layers) == 1 else None
    for phase, gm in (("forward", graph.fw), ("backward", graph.bw)):
        if gm is None:
            continue
        for n in gm.graph.nodes:
            info = _info(n, graph.captured, graph.name.split(".")[0], phase)
            info.layer = layer
            n.meta[NODE_INFO] = info
    return graph


@dataclasses.dataclass
class CompiledGraph:
    """Every region of one model: what a pass receives.

    ``regions`` maps a region name (``embed``, ``layer.0``, ``head``, ``logits``)
    to its graph; ``layer_regions[i]`` names the template decoder layer i runs.
    """

    regions: dict[str, RegionGraph]
    layer_regions: list[str]
    model: dict
    """Architecture and shapes: architecture, num_layers, hidden_size, num_heads, num_kv_heads, head_dim,
    intermediate_size, vocab_size, dtype, parameters, trainable_parameters."""
    lora: Optional[dict]
    """The adapter every layer gets (type, r, alpha, scaling, targets), None without LoRA."""

    def layer_templates(self) -> dict[str, list[int]]:
        """Template region name -> the decoder layers it runs."""
        out: dict[str, list[int]] = {}
        for i, name in enumerate(self.layer_regions):
            out.setdefault(name, []).append(i)
        return out
