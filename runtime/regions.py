"""Region programs bound to a real model: the compiled graphs executed with each layer's weights.

:class:`RegionRunner` is the bottom of the runtime: it runs the embed region,
every decoder layer through its template, and the head (loss) or logits region
over one flat batch, and the backward graphs in reverse. It reads which
template each layer uses and the graphs' calling conventions from the compiled
artifact; it decides nothing itself.

Invariant (tests/runtime/test_regions.py): logits and LoRA gradients equal the
eager HF+PEFT model's for the same packed batch.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from flexc.ir.program import RegionProgram
from flexc.ir.regions import (TOKEN_INPUTS, EmbedRegion, HeadRegion, LayerRegion, LogitsRegion, causal_lm_parts,
                              layer_prefixes)

if TYPE_CHECKING:
    import torch.fx as fx

    from flexc.ir.artifact import CompiledModel
    from flexc.runtime.sharding import ShardPlan

__all__ = ["RegionRunner", "TrainStepResult", "distinct_storage_bytes"]


def distinct_storage_bytes(values: Sequence[Any], exclude: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages behind the tensors in ``values`` (storages whose pointer is in
    ``exclude`` left out; non-tensors ignored): what holding these values costs."""
    seen: dict[int, int] = {}
    for t in values:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if st.data_ptr() not in exclude:
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@dataclasses.dataclass
class TrainStepResult:
    """Loss and gradients of one full forward+backward over a flat batch."""

    loss_sum: torch.Tensor
    """Summed cross-entropy over the labelled tokens (fp32 scalar)."""
    num_tokens: int
    """Labelled tokens (labels != -100)."""
    grads: dict[str, torch.Tensor]
    """Gradients by the model's parameter name (as in ``model.named_parameters()``)."""
    saved_bytes: int = 0
    """Bytes the forward graphs kept for the backward: distinct storages, the model's parameters excluded
    (what the memory plan predicts)."""


class RegionRunner:
    """Runs a :class:`CompiledModel`'s region graphs with the weights of ``model`` (same structure)."""

    def __init__(self, compiled: "CompiledModel", model: nn.Module,
                 programs: Optional[dict[str, RegionProgram]] = None, layer_modules: Optional[Sequence[Any]] = None):
        """``programs`` (per region) and ``layer_modules`` (what each layer's parameters are bound from) default
        to the compiled graphs and the model's own layers; the tensor-parallel runner passes its shards."""
        self.compiled = compiled
        self.model = model
        lm = causal_lm_parts(model)
        self.layers = list(lm.model.layers)
        if len(self.layers) != len(compiled.graph.layer_regions):
            raise ValueError(f"model has {len(self.layers)} layers, the compiled graph "
                             f"{len(compiled.graph.layer_regions)}")
        self.embed = EmbedRegion(lm)
        self.head = HeadRegion(lm)
        self.logits_head = LogitsRegion(lm)
        self.layer_modules = (list(layer_modules) if layer_modules is not None
                              else [LayerRegion(layer) for layer in self.layers])
        self.programs = programs if programs is not None else self._programs(compiled)
        self._layer_prefix = layer_prefixes(model)
        self.num_kv_heads: int = compiled.graph.model["num_kv_heads"]
        """KV heads the attention runs over (the tensor-parallel runner: this rank's)."""
        self.shards: Optional["ShardPlan"] = None
        """Where each parameter lives at tp > 1 (set by the tensor-parallel runner); None: all tensors whole."""

    @staticmethod
    def _programs(compiled: "CompiledModel") -> dict[str, RegionProgram]:
        """Every region's captured graphs; the logits region's serving form where the ``serve`` pass built one."""
        programs = {name: RegionProgram(r.fw, r.bw, TOKEN_INPUTS[name.split(".")[0]])
                    for name, r in compiled.regions.items()}
        try:
            serving = getattr(compiled.pass_report("serve"), "logits", None)
        except ValueError:                  # no serve pass ran: the captured logits graph
            serving = None
        if serving is not None:
            programs["logits"] = RegionProgram(serving, None, TOKEN_INPUTS["logits"])
        return programs

    def layer_prefix(self, i: int) -> str:
        """Name prefix of decoder layer i's parameters in ``model.named_parameters()``."""
        return self._layer_prefix[i]

    def serving_graphs(self) -> dict[str, "fx.GraphModule"]:
        """The serving graph of every layer template (built by the ``serve`` pass), by template name."""
        report = self.compiled.pass_report("serve")
        return {name: report.graphs[name] for name in dict.fromkeys(self.compiled.graph.layer_regions)}

    unbacked_token_count = True
    """Whether compiled serving graphs take the token count as a size nothing is assumed of
    (:func:`flexc.ir.capture.compile_dynamic`), so that no batch size compiles them again."""

    def compile_turn(self) -> tuple[Optional[Callable[[], None]], Optional[Callable[[], None]]]:
        """(run before a compiled serving graph's first call, run right after its first compile): how this
        process takes its turn compiling beside others; one process has nobody to wait for."""
        return None, None

    def layer_program(self, i: int) -> RegionProgram:
        return self.programs[self.compiled.graph.layer_regions[i]]

    def embed_forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor):
        """ids[T], pos[T] -> h[T,H], cos[T,D], sin[T,D]."""
        (h, cos, sin), _ = self.programs["embed"].forward(self.embed, (input_ids, position_ids))
        return h, cos, sin

    def layers_forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor,
                       layers: Optional[Sequence[int]] = None, keep_saved: bool = False) -> tuple[torch.Tensor, list]:
        """Run decoder layers (all by default) over h[T,H] (whole sequences, no KV cache); returns h and, if
        asked, each layer's saved values."""
        saved = []
        for i in (range(len(self.layers)) if layers is None else layers):
            (h,), s = self.layer_program(i).forward(self.layer_modules[i], (h, cos, sin, cu_seqlens))
            saved.append(s if keep_saved else None)
        return h, saved

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h[T,H] -> logits[T,V] fp32."""
        (out,), _ = self.programs["logits"].forward(self.logits_head, (h,))
        return out

    def forward_logits(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                       cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Full forward over a flat batch without a KV cache: ids[T] -> logits[T,V]."""
        h, cos, sin = self.embed_forward(input_ids, position_ids)
        h, _ = self.layers_forward(h, cos, sin, cu_seqlens)
        return self.logits(h)

    def train_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                   labels: torch.Tensor, loss_scale: Optional[float] = None) -> TrainStepResult:
        """Forward and backward over whole sequences; gradients of ``loss_sum * loss_scale``.

        ``loss_scale`` defaults to 1/num_tokens, so the gradients are those of the mean loss
        (what ``loss.backward()`` on HF's mean cross-entropy gives).
        """
        h, cos, sin = self.embed_forward(input_ids, position_ids)
        h, saved = self.layers_forward(h, cos, sin, cu_seqlens, keep_saved=True)
        (loss_sum,), head_saved = self.programs["head"].forward(self.head, (h, labels))
        held = distinct_storage_bytes([t for s in saved for t in s] + list(head_saved),
                                      exclude={p.untyped_storage().data_ptr() for p in self.model.parameters()})
        n = int((labels != -100).sum())
        scale = loss_scale if loss_scale is not None else 1.0 / max(n, 1)
        grads: dict[str, torch.Tensor] = {}
        dh = self.head_backward(head_saved, loss_sum, scale)
        for i in reversed(range(len(self.layers))):
            dh, g = self.layer_backward(i, saved[i], dh)
            saved[i] = None
            grads.update(g)
        return TrainStepResult(loss_sum=loss_sum, num_tokens=n, grads=grads, saved_bytes=held)

    def head_backward(self, saved: list, loss_sum: torch.Tensor, scale: float) -> torch.Tensor:
        """The head's backward seeded with d(loss_sum * scale): the gradient of its input h."""
        seed = torch.tensor(scale, dtype=loss_sum.dtype, device=loss_sum.device)
        return self.programs["head"].backward(saved, [seed], self.head).pop("input0")

    def layer_backward(self, i: int, saved: list, dh: torch.Tensor,
                       adapter: Optional[Mapping[str, torch.Tensor]] = None) -> tuple[torch.Tensor,
                                                                                    dict[str, torch.Tensor]]:
        """Layer i's backward: the gradient of its input and its parameters' gradients by model name.

        ``adapter``: the LoRA tensors to differentiate through, by model parameter name (a resident adapter's
        ``weights``); default the model's own.
        """
        prefix = self._layer_prefix[i]
        overrides = None if adapter is None else self.region_names(i, adapter)
        g = self.layer_program(i).backward(saved, [dh], self.layer_modules[i], overrides)
        return g.pop("input0"), {f"{prefix}.{k.removeprefix('layer.')}": v for k, v in g.items()
                                 if not k.startswith("input")}

    def region_names(self, i: int, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model-named tensors of decoder layer i (``base_model...layers.3.mlp.down_proj...``) by their FQN inside
        the layer region (``layer.mlp.down_proj...``); tensors of other layers are left out."""
        prefix = self._layer_prefix[i] + "."
        return {"layer." + n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
