"""Finetuning an adapter in its own coordinates while the engine serves it padded and folded.

The registry keeps every adapter in the compiled structure: rank padded to the
compiled rank R, its scaling folded into ``lora_B`` (``B_stack = k * B_own`` with
k = its scaling / the compiled scaling). Training the stack's tensors directly
would train another parametrisation: the gradient of ``B_stack`` is ``1/k`` of
PEFT's, so SGD and AdamW (whose update does not scale with the gradient) would
take other steps than PEFT does for that adapter.

:class:`OwnCoordinatesJob` is a :class:`~flexc.runtime.finetune.FinetuneJob`
whose parameters, fp32 masters, optimizer state and checkpoints are the
adapter's own tensors (rank r, only its targets, its own scaling): each backward
window's gradients are converted (``AdapterRegistry.own_grads``: the rank-r
block, ``k *`` for B) before they are accumulated, and each optimizer step's new
version is written back into the stack (``publish_own``). The optimizer
therefore sees exactly the parameters and gradients PEFT would, and a
checkpoint is the adapter's own PEFT directory.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from flexc.runtime.finetune import FinetuneConfig, FinetuneJob

if TYPE_CHECKING:
    from flexc.runtime.adapters import AdapterRegistry
    from flexc.runtime.sequence import FinetuneSequence, WindowResult

__all__ = ["OwnCoordinatesJob"]


class OwnCoordinatesJob(FinetuneJob):
    """A finetuning job of resident adapter ``adapter_name`` trained in the adapter's own coordinates."""

    def __init__(self, job_id: str, sequences: Sequence[Any], registry: "AdapterRegistry", adapter_name: str,
                 config: FinetuneConfig, make_sequence: Callable[[Any, float, str], "FinetuneSequence"],
                 all_ranks: Optional[Callable[[bool], bool]] = None):
        self._registry = registry
        super().__init__(job_id, sequences, registry.own_weights(adapter_name), config, make_sequence,
                         adapter_name=adapter_name, peft_config=registry.get(adapter_name).shape.to_peft(),
                         all_ranks=all_ranks)
        self._publish()          # NOTE: a job resumed from a checkpoint serves the checkpoint's version at once

    def _publish(self) -> None:
        if self.adapter_name in self._registry:
            self._registry.publish_own(self.adapter_name, self.params)
        self._published = self.version

    def on_window(self, result: "WindowResult") -> None:
        """Accumulate the window's gradients in the adapter's own coordinates; publish a new version."""
        own = dataclasses.replace(result, grads=self._registry.own_grads(self.adapter_name, result.grads))
        super().on_window(own)
        if self.version != self._published:
            self._publish()
