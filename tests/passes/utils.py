"""Builders shared by the prune and memory tests: a compiled tiny model with real weights and a batch."""
from __future__ import annotations

import dataclasses

import torch

import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.measure import measure_saved_bytes
from flexc.passes.prune import partition_region
from tests.utils import eager_peft_loss_grads, packed_batch, randomize_lora, write_config

LENS = [10, 7, 15]
"""Three packed sequences, 32 tokens."""


@dataclasses.dataclass
class Tiny:
    """A tiny model compiled with the default passes, its real PEFT model, a batch and PEFT's gradients."""

    cm: "flexc.CompiledModel"
    model: torch.nn.Module
    batch: tuple
    ref_grads: dict
    ref_loss: torch.Tensor
    _measured: dict = dataclasses.field(default_factory=dict)

    def measured(self, strategy: str):
        """Each trainable region partitioned for ``strategy``, run on the batch (cached per strategy)."""
        if strategy not in self._measured:
            graphs = {n: partition_region(r, strategy, self.cm.seq_len)[:2]
                      for n, r in self.cm.graph.regions.items() if r.bw is not None}
            self._measured[strategy] = measure_saved_bytes(self.cm, self.model, self.batch, graphs)
        return self._measured[strategy]


def build_tiny(tmp_dir, arch: str, dtype: str = "fp32", **options) -> Tiny:
    """Compile ``arch``'s tiny config with LoRA r=4 on all projections and run PEFT's loss.backward()."""
    src = resolve_model(write_config(tmp_dir, arch))
    spec = LoraSpec(r=4, alpha=8)
    cm = flexc.compile(src, lora=spec, dtype=dtype, seq_len=16, **options)
    model = load_model(src, spec, dtype, seed=3)
    randomize_lora(model)
    ids, pos, cu, labels, seqs = packed_batch(LENS, src.config.vocab_size)
    model.get_base_model().set_attn_implementation("sdpa")        # independent reference: HF's own attention
    _, grads, loss = eager_peft_loss_grads(model, seqs)
    model.get_base_model().set_attn_implementation("flexc")
    return Tiny(cm=cm, model=model, batch=(ids, pos, cu, labels), ref_grads=grads, ref_loss=loss)
