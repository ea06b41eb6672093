"""Activation stores for token-level finetuning.

A finetuning sequence's forward runs in chunks, its tokens riding in mixed
batches with other requests. Every value a layer's forward graph saves for
the backward is one of:

* a *token tensor*: one dimension is the batch's token count T (or k*T);
  the sequence's rows are copied into a per-sequence buffer at their token
  positions, so after the last chunk the buffer holds exactly what a
  full-sequence forward would have saved;
* the batch's ``cu_seqlens`` input: the backward of the whole sequence uses
  ``[0, L]``;
* a SymInt (an expression in T): evaluated at T = L for the backward;
* anything else (weights, their transposes, constants): the same for every
  chunk, kept once.

:class:`SavedLayout` classifies a region program's saved values from the
compiled graph's annotations (which dimension is T); :class:`ActivationStore`
holds one sequence's saved values for every layer and rebuilds the backward
graph's inputs.

Invariant (tests/runtime/test_activations.py): a sequence run in chunks and
back-propagated from its store gives the gradients of the full-sequence run.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from flexc.ir.vocab import TOKEN_SYMBOL, CapturedRegion, InputRef
from flexc.ir.graph import NODE_INFO
from flexc.ir.program import RegionProgram

__all__ = ["SavedSlot", "SavedLayout", "ActivationStore"]


@dataclasses.dataclass(frozen=True)
class SavedSlot:
    """How one saved value of a forward graph is kept across chunks."""

    kind: str
    """``rows`` (token tensor), ``cu_seqlens``, ``symint`` or ``static``."""
    dim: int = -1
    """For ``rows``: the token dimension."""
    per_token: int = 1
    """For ``rows``: entries of the token dimension per token (k in k*T)."""
    expr: Optional[sympy.Expr] = None
    """For ``symint``: the value as an expression in T."""


class SavedLayout:
    """The :class:`SavedSlot` of every saved value of a region program, read from the annotated graphs."""

    def __init__(self, program: RegionProgram, captured: CapturedRegion, cu_input: int = 3):
        assert program.bw is not None, "forward-only region has nothing saved"
        fw_out = program.fw.graph.find_nodes(op="output")[0].args[0]
        self.slots: list[SavedSlot] = []
        for j in program.saved_idx:
            node = fw_out[j]
            self.slots.append(self._slot(node, captured, cu_input))

    @staticmethod
    def _slot(node: Any, captured: CapturedRegion, cu_input: int) -> SavedSlot:
        if not isinstance(node, fx.Node):
            return SavedSlot("static")
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            return SavedSlot("symint", expr=captured.to_token_expr(val))
        ref = node.meta.get("flexc_ref")
        if isinstance(ref, InputRef) and ref.kind == "user" and ref.index == cu_input:
            return SavedSlot("cu_seqlens")
        shape = node.meta[NODE_INFO].shape
        if shape is None:
            return SavedSlot("static")
        token_dims = [(d, s) for d, s in enumerate(shape) if TOKEN_SYMBOL in sympy.sympify(s).free_symbols]
        if not token_dims:
            other = set().union(*(sympy.sympify(s).free_symbols for s in shape))
            if other:
                raise ValueError(f"saved value {node.name} has a data-dependent shape {shape}; "
                                 "token-level finetuning cannot store it per token")
            return SavedSlot("static")
        if len(token_dims) > 1:
            raise ValueError(f"saved value {node.name} has several token dimensions {shape}")
        d, s = token_dims[0]
        k = sympy.simplify(sympy.sympify(s) / TOKEN_SYMBOL)
        if not k.is_Integer:
            raise ValueError(f"saved value {node.name}: token dimension {s} is not a multiple of T")
        return SavedSlot("rows", dim=d, per_token=int(k))


class ActivationStore:
    """One finetuning sequence's saved values for every layer (and its final hidden states).

    ``write(layer, saved, batch_rows, positions)`` copies the sequence's rows of a
    chunk; ``backward_inputs(layer)`` returns the saved list for the layer's
    backward graph over the whole sequence of ``length`` tokens.
    """

    def __init__(self, layouts: Sequence[SavedLayout], length: int):
        self.layouts = list(layouts)
        self.length = length
        self._values: list[list[Any]] = [[None] * len(lay.slots) for lay in self.layouts]
        self._written = [0] * len(self.layouts)
        self.final_hidden: Optional[torch.Tensor] = None

    def _buffer(self, like: torch.Tensor, slot: SavedSlot) -> torch.Tensor:
        shape = list(like.shape)
        shape[slot.dim] = self.length * slot.per_token
        return like.new_empty(shape)

    def write(self, layer: int, saved: Sequence[Any], batch_rows: tuple[int, int], position: int) -> None:
        """Copy rows ``batch_rows`` (start, stop in the flat batch) of a chunk to sequence positions from ``position``."""
        a, b = batch_rows
        n = b - a
        if position + n > self.length:
            raise ValueError(f"chunk [{position}, {position + n}) runs past the sequence length {self.length}")
        store = self._values[layer]
        seen: dict[tuple, int] = {}
        for i, (slot, value) in enumerate(zip(self.layouts[layer].slots, saved)):
            if slot.kind == "rows":
                key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), slot.dim)
                if key in seen:            # the same view saved twice: store it once
                    store[i] = store[seen[key]]
                    continue
                seen[key] = i
                if store[i] is None:
                    store[i] = self._buffer(value, slot)
                k = slot.per_token
                store[i].narrow(slot.dim, position * k, n * k).copy_(value.narrow(slot.dim, a * k, n * k))
            elif slot.kind == "static":
                store[i] = value
        self._written[layer] = max(self._written[layer], position + n)

    def complete(self, layer: int) -> bool:
        return self._written[layer] >= self.length

    def backward_inputs(self, layer: int) -> list[Any]:
        """Saved values for the layer's backward graph over the whole sequence."""
        if not self.complete(layer):
            raise ValueError(f"layer {layer}: forward covered {self._written[layer]} of {self.length} tokens")
        out = []
        device = next((v.device for v in self._values[layer] if isinstance(v, torch.Tensor)), None)
        for slot, value in zip(self.layouts[layer].slots, self._values[layer]):
            if slot.kind == "symint":
                out.append(int(slot.expr.subs(TOKEN_SYMBOL, self.length)))
            elif slot.kind == "cu_seqlens":
                out.append(torch.tensor([0, self.length], dtype=torch.int32, device=device))
            else:
                out.append(value)
        return out

    def release(self, layer: int) -> None:
        """Free a layer's stored values once its backward has run."""
        self._values[layer] = [None] * len(self._values[layer])

    def nbytes(self) -> int:
        """Bytes held in token buffers (distinct storages), for checking against the memory plan."""
        seen, total = set(), 0
        for layer_vals, lay in zip(self._values, self.layouts):
            for v, slot in zip(layer_vals, lay.slots):
                if slot.kind == "rows" and v is not None and v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    total += v.numel() * v.element_size()
        return total
