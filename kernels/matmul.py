"""``flexc::skinny_mm``: ``x @ w.T`` for a few rows of x against a wide weight, as the torch custom op.

The vocabulary projection of a decode batch multiplies one row per sequence (a handful) by the LM head's
weight ([vocab, hidden]: 49152 x 576 for SmolLM2, 113 MB in fp32). On a CPU, torch's ``mm`` of that shape
runs as one matrix-vector product per row, each reading the whole weight: measured with torch 2.13 (MKL) on
a 2-core AMD EPYC at two threads, 6.7 ms a row for 1 to 3 rows (20.1 ms for 3). The same product taken as
``w @ x.T`` is one GEMM whose narrow right-hand side shares each read of the weight: 2.6-3.3 ms for 1 to 3
rows, 5.9 ms for 8 (11.3 ms the other way); from 12 rows on both take the same time
(``benchmarks/logits.py``, 2026-11-30). A single row is padded to two, which keeps it a GEMM.

    flexc::skinny_mm(x, w) -> out
      x:   [n, K]   activations (n rows)
      w:   [N, K]   weight, as ``nn.Linear`` stores it
      out: [n, N]   x @ w.T, contiguous

On a CPU in fp32 with at most :data:`SKINNY_ROWS` rows it computes ``(w @ x.T).T``; elsewhere (other
dtypes, CUDA, more rows) ``x @ w.T``. The two agree to fp32 rounding (different summation order). The
``serve`` pass puts it in place of the logits region's vocabulary projection (``passes/serve.py``); it has
no autograd formula: the serving graphs run without one.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["skinny_mm", "SKINNY_ROWS"]

SKINNY_ROWS = 8
"""Most rows computed as ``w @ x.T`` (beyond them both forms are GEMMs of about the same speed)."""


@torch.library.custom_op("flexc::skinny_mm", mutates_args=())
def skinny_mm(x: Tensor, w: Tensor) -> Tensor:
    n = x.shape[0]
    if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32 or not 0 < n <= SKINNY_ROWS:
        return x @ w.t()
    xp = torch.cat([x, x.new_zeros((1, x.shape[1]))]) if n == 1 else x      # NOTE: one column would be a GEMV
    return torch.mm(w, xp.t()).t()[:n].contiguous()


@skinny_mm.register_fake
def _skinny_mm_fake(x: Tensor, w: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0]))
