"""Activation stores for token-level finetuning.

A finetuning sequence's forward runs in chunks, its tokens riding in mixed
batches with other requests. Every value a layer's forward saves for the
backward is classified once (:mod:`flexc.ir.saved`): a token tensor's rows of
each chunk are copied into a per-sequence buffer at their token positions, so
after the last chunk the buffer holds exactly what a full-sequence forward
would have saved; ``cu_seqlens`` becomes ``[0, L]`` and sizes are evaluated at
T = L for the backward. A sequence whose forward is one chunk alone in its
batch keeps the forward's own output tensors (no buffer, no copy) when each is
exactly its rows, contiguous and alone in its storage.

:class:`SavedLayout` holds a region program's classification;
:class:`ActivationStore` holds one sequence's saved values for every layer and
rebuilds the backward graph's inputs.

Invariant (tests/runtime/test_activations.py): a sequence run in chunks and
back-propagated from its store gives the gradients of the full-sequence run.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from flexc.ir.program import RegionProgram
from flexc.ir.saved import SavedSlot, SlotKind, saved_slots
from flexc.ir.vocab import TOKEN_SYMBOL, CapturedRegion

__all__ = ["SavedLayout", "ActivationStore"]


def _owns_rows(value: torch.Tensor, dim: int, start: int, size: int) -> bool:
    """Whether ``value`` is exactly rows [start, start + size) of ``dim`` and nothing else: the whole tensor,
    contiguous, alone in its storage (so keeping it holds no other bytes alive)."""
    return (start == 0 and value.shape[dim] == size and value.is_contiguous() and value.storage_offset() == 0
            and value.untyped_storage().nbytes() == value.numel() * value.element_size())


class SavedLayout:
    """The :class:`~flexc.ir.saved.SavedSlot` of every saved value of a region program."""

    def __init__(self, program: RegionProgram, captured: CapturedRegion):
        assert program.bw is not None, "forward-only region has nothing saved"
        self.slots: list[SavedSlot] = saved_slots(program.fw, program.saved_idx, captured)


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
            if slot.kind is SlotKind.ROWS:
                key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), slot.dim)
                if key in seen:            # the same view saved twice: store it once
                    store[i] = store[seen[key]]
                    continue
                seen[key] = i
                k = slot.per_token
                if position == 0 and n == self.length and _owns_rows(value, slot.dim, a * k, n * k):
                    store[i] = value       # NOTE: a one-chunk sequence: keep the graph's own output, no copy
                    continue
                if store[i] is None:
                    store[i] = self._buffer(value, slot)
                store[i].narrow(slot.dim, position * k, n * k).copy_(value.narrow(slot.dim, a * k, n * k))
            elif slot.kind is SlotKind.STATIC:
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
            if slot.kind is SlotKind.SYMINT:
                out.append(int(slot.expr.subs(TOKEN_SYMBOL, self.length)))
            elif slot.kind is SlotKind.CU_SEQLENS:
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
                if slot.kind is SlotKind.ROWS and v is not None and v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    total += v.numel() * v.element_size()
        return total
