"""What each value a forward graph saves for the backward is, with respect to the tokens of the batch.

A finetuning sequence's forward runs in chunks that ride in mixed batches; its backward runs once over the
whole sequence. Every saved value is one of (:class:`SlotKind`):

* ``rows``: a *token tensor*, one dimension is the batch's token count T (or k*T): a chunk contributes its
  rows, and the rows of all chunks together are what a full-sequence forward saves;
* ``cu_seqlens``: the batch's sequence bounds (the backward of one sequence uses ``[0, L]``);
* ``symint``: a size, an expression in T (evaluated at T = L for the backward);
* ``static``: anything else (the same for every chunk).

The ``serve`` pass returns only the finetuning rows of ``rows`` values; the runtime's activation store
(:mod:`flexc.runtime.activations`) collects them per sequence. Both read the classification from here.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from flexc.ir.graph import NODE_INFO
from flexc.ir.vocab import TOKEN_SYMBOL, CapturedRegion, InputKind, InputRef, canonical

__all__ = ["SlotKind", "SavedSlot", "saved_slots", "CU_SEQLENS_INPUT"]

CU_SEQLENS_INPUT = 3
"""User input index of ``cu_seqlens`` in a decoder layer region (h, cos, sin, cu_seqlens)."""


class SlotKind(str, enum.Enum):
    """How one saved value is kept across chunks (see the module docstring)."""

    ROWS = "rows"
    CU_SEQLENS = "cu_seqlens"
    SYMINT = "symint"
    STATIC = "static"


@dataclasses.dataclass(frozen=True)
class SavedSlot:
    """How one saved value of a forward graph is kept across chunks."""

    kind: SlotKind
    dim: int = -1
    """For ``rows``: the token dimension."""
    per_token: int = 1
    """For ``rows``: entries of the token dimension per token (k in k*T)."""
    expr: Optional[sympy.Expr] = None
    """For ``symint``: the value as an expression in T."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", SlotKind(self.kind))


def _slot(node: Any, captured: CapturedRegion, cu_input: int) -> SavedSlot:
    if not isinstance(node, fx.Node):
        return SavedSlot(SlotKind.STATIC)
    val = node.meta.get("val")
    if isinstance(val, torch.SymInt):
        return SavedSlot(SlotKind.SYMINT, expr=captured.to_token_expr(val))
    ref = node.meta.get("flexc_ref")
    if isinstance(ref, InputRef) and ref.kind is InputKind.USER and ref.index == cu_input:
        return SavedSlot(SlotKind.CU_SEQLENS)
    shape = node.meta[NODE_INFO].shape
    if shape is None:
        return SavedSlot(SlotKind.STATIC)
    token_dims = [(d, s) for d, s in enumerate(shape) if TOKEN_SYMBOL in sympy.sympify(s).free_symbols]
    if not token_dims:
        other = set().union(*(sympy.sympify(s).free_symbols for s in shape))
        if other:
            raise ValueError(f"saved value {node.name} has a data-dependent shape {shape}; "
                             "token-level finetuning cannot store it per token")
        return SavedSlot(SlotKind.STATIC)
    if len(token_dims) > 1:
        raise ValueError(f"saved value {node.name} has several token dimensions {shape}")
    d, s = token_dims[0]
    k = canonical(sympy.sympify(s) / TOKEN_SYMBOL)
    if not k.is_Integer:
        raise ValueError(f"saved value {node.name}: token dimension {s} is not a multiple of T")
    return SavedSlot(SlotKind.ROWS, dim=d, per_token=int(k))


def saved_slots(fw: fx.GraphModule, saved_idx: Sequence[int], captured: CapturedRegion,
                cu_input: int = CU_SEQLENS_INPUT) -> list[SavedSlot]:
    """The :class:`SavedSlot` of every saved value of a forward graph, in the order of ``saved_idx`` (indices
    into the forward's outputs, as in :attr:`RegionProgram.saved_idx <flexc.ir.program.RegionProgram>`)."""
    outs = fw.graph.find_nodes(op="output")[0].args[0]
    return [_slot(outs[j], captured, cu_input) for j in saved_idx]
