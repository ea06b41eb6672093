"""Summed cross-entropy of a linear head without keeping logits: ``flexc::linear_cross_entropy``.

    flexc::linear_cross_entropy(x, weight, labels, chunk) -> (loss_sum, dx)
      x:      [T, H]   normed hidden states (any float dtype)
      weight: [V, H]   frozen lm_head weight (same dtype as x)
      labels: int64 [T]  target token per row, -100 to skip
      loss_sum: fp32 scalar  sum over labelled rows of -log softmax(x @ weight.T)[label]
      dx:     [T, H]   d loss_sum / d x (dtype of x), not differentiable

The loss is the last op of training, so its input gradient does not depend on
anything that comes later except the scalar upstream gradient: the forward
computes it chunk by chunk (``chunk`` rows of fp32 logits at a time) and the
backward only scales it. Full ``[T, V]`` fp32 logits (128K-152K columns for the
presets) are never materialised and never saved for the backward; what is saved
is ``dx``, the size of the input.

The numerics follow autograd on ``F.cross_entropy((x @ weight.T).float(), ...)``:
fp32 log-softmax, the logits gradient cast to x's dtype, then one matmul with the
weight in x's dtype. ``linear_cross_entropy_ref`` is that eager formula (tests
compare the two).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref", "default_chunk"]

_CHUNK_BYTES = 256 * 2**20
"""Target size of one chunk of fp32 logits (transient memory of the op)."""


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits takes about 256 MiB (at least 16 rows)."""
    return max(16, _CHUNK_BYTES // (4 * max(int(vocab_size), 1)))


def linear_cross_entropy_ref(x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Eager reference: summed CE of fp32 logits (keeps [T, V] logits for autograd)."""
    # x: [T, H], weight: [V, H], labels: [T]
    return F.cross_entropy((x @ weight.t()).float(), labels, ignore_index=-100, reduction="sum")


@torch.library.custom_op("flexc::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(x: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """See the module docstring: (summed CE in fp32, its gradient with respect to x)."""
    # x: [T, H], weight: [V, H], labels: int64 [T]
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    for start in range(0, x.shape[0], max(int(chunk), 1)):
        xc, lc = x[start:start + chunk], labels[start:start + chunk]
        logp = torch.log_softmax((xc @ weight.t()).float(), dim=-1)          # [C, V] fp32
        valid = lc != -100
        safe = torch.where(valid, lc, torch.zeros_like(lc))
        picked = logp.gather(1, safe[:, None])[:, 0]
        loss += -(picked * valid).sum()
        grad = logp.exp_()                                                  # softmax, in place
        grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1.0
        grad *= valid[:, None]
        dx[start:start + chunk] = grad.to(x.dtype) @ weight                  # [C, H]
    return loss, dx


@linear_cross_entropy.register_fake
def _linear_cross_entropy_fake(x, weight, labels, chunk):
    return x.new_empty((), dtype=torch.float32), torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    _loss, dx = output
    ctx.save_for_backward(dx)
    ctx.mark_non_differentiable(dx)
    ctx.set_materialize_grads(False)


def _backward(ctx, dloss, _ddx):
    (dx,) = ctx.saved_tensors
    if dloss is None:
        return None, None, None, None
    return dx * dloss.to(dx.dtype), None, None, None


torch.library.register_autograd("flexc::linear_cross_entropy", _backward, setup_context=_setup_context)
