"""Memory measured on real tensors: the references the memory plan is checked against.

:func:`measure_saved_bytes` runs the compiled region graphs (the installed ones,
or another partition's) through :meth:`RegionRunner.train_step` and reports the
storages the forward graphs kept for the backward; :func:`measure_autograd_bytes`
counts what PyTorch autograd holds for the eager HF+PEFT model, through
``torch.autograd.graph.saved_tensors_hooks``. Both run the backward too, so a
measurement also says whether those graphs give the right gradients.

Invariant (tests/passes/test_memory.py, test_prune.py): the memory pass's
predicted bytes equal these measurements within 2% for every strategy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from flexc.ir.program import RegionProgram
from flexc.ir.regions import TOKEN_INPUTS
from flexc.runtime.regions import RegionRunner, TrainStepResult, distinct_storage_bytes

if TYPE_CHECKING:
    from flexc.ir.artifact import CompiledModel

__all__ = ["measure_saved_bytes", "measure_autograd_bytes"]


def measure_saved_bytes(compiled: "CompiledModel", model: nn.Module, batch: Sequence[torch.Tensor],
                        graphs: Optional[dict[str, tuple[fx.GraphModule, fx.GraphModule]]] = None) -> TrainStepResult:
    """One forward+backward of ``batch = (ids[T], pos[T], cu_seqlens[N+1], labels[T])`` through the compiled
    regions, with ``graphs`` (region name -> (fw, bw)) in place of the installed ones where given.
    ``saved_bytes`` is what the forward graphs held for the backward; ``grads`` those of the mean loss."""
    programs = {name: RegionProgram(*(graphs or {}).get(name, (r.fw, r.bw)), TOKEN_INPUTS[name.split(".")[0]])
                for name, r in compiled.regions.items()}
    ids, pos, cu, labels = batch
    return RegionRunner(compiled, model, programs=programs).train_step(ids, pos, cu, labels)


def measure_autograd_bytes(model: nn.Module, batch: Sequence[torch.Tensor]) -> TrainStepResult:
    """What PyTorch autograd holds for the eager HF+PEFT model on a packed batch (saved-tensor hooks), with the
    loss as HF computes it (summed cross-entropy of the fp32 logits); gradients of the mean loss."""
    ids, pos, cu, labels = batch
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    longest = int((cu[1:] - cu[:-1]).max())
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids[None], position_ids=pos[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                    max_length_q=longest, max_length_k=longest)
        loss_sum = F.cross_entropy(out.logits[0].float(), labels, ignore_index=-100, reduction="sum")
    held = distinct_storage_bytes(packed, params)
    packed.clear()
    del out
    n_tok = int((labels != -100).sum())
    (loss_sum / max(n_tok, 1)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return TrainStepResult(loss_sum=loss_sum.detach(), num_tokens=n_tok, grads=grads, saved_bytes=held)
