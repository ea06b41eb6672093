"""Token-level finetuning of one sequence: chunked forward, layer-windowed backward.

A :class:`FinetuneSequence` moves through two phases, driven by the scheduler
one iteration at a time:

1. **forward**: ``next_chunk(n)`` hands out the next n tokens; the executor
   runs them inside a mixed batch (they attend to the sequence's own cached
   K/V like a prefill chunk) and calls ``record_layer`` with every layer's
   saved values and the chunk's rows in the flat batch, then ``record_output``
   with the final hidden rows;
2. **backward**: ``backward_window(runner, k)`` runs the head (loss) on the
   first call, then the backward graphs of the next k layers, top-down, over the
   whole sequence from the activation store, carrying the hidden-state gradient
   between windows. LoRA gradients are returned for accumulation in fp32.

The result is exactly the gradient of ``loss_sum * loss_scale`` of a
full-sequence forward and backward (tests/runtime/test_sequence.py).
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import torch

from flexc.runtime.activations import ActivationStore, SavedLayout

if TYPE_CHECKING:
    from flexc.runtime.dataset import TrainingSequence
    from flexc.runtime.regions import RegionRunner

__all__ = ["FinetuneSequence", "WindowResult", "make_layouts"]


def make_layouts(runner: "RegionRunner") -> list[SavedLayout]:
    """The saved-value layout of every decoder layer (shared by layers of one template)."""
    by_region: dict[str, SavedLayout] = {}
    out = []
    for name in runner.compiled.graph.layer_regions:
        if name not in by_region:
            by_region[name] = SavedLayout(runner.programs[name], runner.compiled.regions[name].captured)
        out.append(by_region[name])
    return out


@dataclasses.dataclass
class WindowResult:
    """What one backward window produced."""

    grads: dict[str, torch.Tensor]
    """LoRA gradients by model parameter name (of ``loss_sum * loss_scale``)."""
    layers: list[int]
    """Layers whose backward ran, top-down."""
    loss_sum: Optional[float] = None
    """Summed token loss of the sequence (set by the window that ran the head)."""


class FinetuneSequence:
    """State of one training sequence between iterations."""

    def __init__(self, seq: "TrainingSequence", layouts: Sequence[SavedLayout], loss_scale: float,
                 seq_id: str = "", adapter: Optional[Mapping[str, torch.Tensor]] = None):
        """``adapter``: the LoRA tensors the sequence trains, by model parameter name (a resident adapter's
        ``weights``), which its backward differentiates through; None: the model's own."""
        self.seq = seq
        self.adapter = adapter
        self.seq_id = seq_id
        self.length = len(seq)
        self.loss_scale = loss_scale
        self.store = ActivationStore(layouts, self.length)
        self.num_layers = len(layouts)
        self.forward_pos = 0
        """Tokens whose forward has been scheduled."""
        self.forward_done_pos = 0
        """Tokens whose forward has completed (all layers recorded)."""
        self.next_backward_layer = self.num_layers - 1
        self.head_done = False
        self.dh: Optional[torch.Tensor] = None
        self._final = None

    # ---- forward -------------------------------------------------------------------------------------
    @property
    def forward_remaining(self) -> int:
        return self.length - self.forward_pos

    @property
    def in_backward(self) -> bool:
        return self.forward_done_pos >= self.length

    @property
    def done(self) -> bool:
        return self.in_backward and self.head_done and self.next_backward_layer < 0

    def next_chunk(self, n: int) -> tuple[int, list[int], list[int]]:
        """Reserve the next ``n`` tokens: (start position, token ids, positions)."""
        n = min(n, self.forward_remaining)
        if n <= 0:
            raise ValueError(f"sequence {self.seq_id} has no forward tokens left")
        start = self.forward_pos
        self.forward_pos += n
        return start, list(self.seq.input_ids[start:start + n]), list(range(start, start + n))

    def record_layer(self, layer: int, saved: Sequence, batch_rows: tuple[int, int], position: int) -> None:
        """Store the chunk's rows of ``layer``'s saved values."""
        self.store.write(layer, saved, batch_rows, position)

    def record_output(self, hidden: torch.Tensor, batch_rows: tuple[int, int], position: int) -> None:
        """Store the chunk's final hidden states (input of the head): hidden [T, H]."""
        a, b = batch_rows
        if self._final is None:
            self._final = hidden.new_empty((self.length, hidden.shape[1]))
        self._final[position:position + b - a].copy_(hidden[a:b])
        self.forward_done_pos = max(self.forward_done_pos, position + b - a)

    # ---- backward ------------------------------------------------------------------------------------
    def backward_window(self, runner: "RegionRunner", num_layers: int) -> WindowResult:
        """Run the head (first call) and then up to ``num_layers`` layers' backward, top-down."""
        if not self.in_backward:
            raise ValueError(f"sequence {self.seq_id}: forward covered {self.forward_done_pos}/{self.length} tokens")
        result = WindowResult(grads={}, layers=[])
        if not self.head_done:
            labels = torch.tensor(self.seq.labels, dtype=torch.long, device=self._final.device)
            (loss_sum,), saved = runner.programs["head"].forward(runner.head, (self._final, labels))
            self.dh = runner.head_backward(saved, loss_sum, self.loss_scale)
            self._final = None
            self.head_done = True
            result.loss_sum = float(loss_sum)
        for _ in range(num_layers):
            i = self.next_backward_layer
            if i < 0:
                break
            self.dh, grads = runner.layer_backward(i, self.store.backward_inputs(i), self.dh, self.adapter)
            self.store.release(i)
            result.grads.update(grads)
            result.layers.append(i)
            self.next_backward_layer -= 1
        if self.next_backward_layer < 0:
            self.dh = None
        return result
