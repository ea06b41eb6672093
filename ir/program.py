"""Running a region's captured graphs with real tensors.

The captured graphs take parameters, buffers and user inputs as placeholders
(identified by ``meta['flexc_ref']``); a :class:`RegionProgram` binds them from a
region module built around real weights (``LayerRegion(model.layers[i])``), so
one layer template runs every structurally identical layer.

The graphs carry no shape checks: the program checks dtypes and static sizes
of the user inputs and that every token input has the same length.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from flexc.ir.vocab import InputRef, OutputRef

__all__ = ["RegionProgram"]


class RegionProgram:
    """Executes one region's forward (and backward) graph.

    ``forward`` returns the region outputs and the values the backward needs
    (``saved``); ``backward(saved, tangents)`` returns gradients keyed by the
    parameter FQN inside the region and, for user inputs, by ``input<i>``.
    """

    def __init__(self, fw: fx.GraphModule, bw: Optional[fx.GraphModule], token_inputs: Sequence[int] = ()):
        self.fw, self.bw = fw, bw
        self.token_inputs = tuple(token_inputs)
        phs = fw.graph.find_nodes(op="placeholder")
        self.fw_inputs: list[InputRef] = [p.meta["flexc_ref"] for p in phs]
        self._user_specs = {r.index: p.meta.get("val") for p, r in zip(phs, self.fw_inputs) if r.kind == "user"}
        out = fw.graph.find_nodes(op="output")[0]
        refs: list[OutputRef] = out.meta["flexc_ref"]
        names = [a.name if isinstance(a, fx.Node) else None for a in out.args[0]]
        self.user_idx = [i for i, r in enumerate(refs) if r.kind == "user"]
        self.saved_idx: list[int] = []
        self.bw_inputs: list[tuple[str, int]] = []
        self.bw_outputs: list[OutputRef] = []
        if bw is not None:
            for p in bw.graph.find_nodes(op="placeholder"):
                r: InputRef = p.meta["flexc_ref"]
                if r.kind == "tangent":
                    self.bw_inputs.append(("tangent", r.index))
                else:
                    self.bw_inputs.append(("saved", len(self.saved_idx)))
                    self.saved_idx.append(names.index(p.name))
            self.bw_outputs = bw.graph.find_nodes(op="output")[0].meta["flexc_ref"]

    def _check(self, args: Sequence[Any]) -> None:
        tokens = {int(args[i].shape[0]) for i in self.token_inputs if i < len(args)}
        if len(tokens) > 1:
            raise ValueError(f"token inputs of one region call disagree on the token count: {sorted(tokens)}")
        for i, spec in self._user_specs.items():
            a = args[i]
            if not isinstance(spec, torch.Tensor):
                continue
            if a.dtype != spec.dtype or a.dim() != spec.dim():
                raise ValueError(f"region input {i}: expected {spec.dtype} with {spec.dim()} dims, "
                                 f"got {a.dtype} {tuple(a.shape)}")
            for d, (want, got) in enumerate(zip(spec.shape, a.shape)):
                if isinstance(want, int) and want != got:
                    raise ValueError(f"region input {i}: dim {d} must be {want}, got {got}")

    def bind(self, module: nn.Module, args: Sequence[Any],
             overrides: Optional[Mapping[str, torch.Tensor]] = None) -> list[Any]:
        """Placeholder values: parameters/buffers of ``module`` by FQN, then the user arguments.

        ``overrides`` maps a parameter FQN (inside the region) to the tensor bound instead of the module's
        own, e.g. ``{"layer.self_attn.q_proj.lora_B.default.weight": other_adapters_B}`` (how the runtime
        runs one layer template with another adapter's weights).
        """
        vals = []
        for r in self.fw_inputs:
            if r.kind == "param":
                if overrides is not None and r.target in overrides:
                    vals.append(overrides[r.target])
                    continue
                vals.append(module.get_parameter(r.target))
            elif r.kind == "buffer":
                vals.append(module.get_buffer(r.target))
            else:
                vals.append(args[r.index])
        return vals

    @torch.no_grad()
    def forward(self, module: nn.Module, args: Sequence[Any],
                overrides: Optional[Mapping[str, torch.Tensor]] = None) -> tuple[list[Any], list[Any]]:
        """Run the forward graph: (region outputs, values saved for the backward); ``overrides`` as in bind."""
        self._check(args)
        outs = self.fw(*self.bind(module, args, overrides))
        return [outs[i] for i in self.user_idx], [outs[i] for i in self.saved_idx]

    @torch.no_grad()
    def backward(self, saved: Sequence[Any], tangents: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Run the backward graph: gradients by parameter FQN and ``input<i>`` for user inputs."""
        assert self.bw is not None, "forward-only region"
        ins = [saved[j] if kind == "saved" else tangents[j] for kind, j in self.bw_inputs]
        grads = self.bw(*ins)
        res: dict[str, torch.Tensor] = {}
        for g, r in zip(grads, self.bw_outputs):
            if g is None or r.kind != "grad":
                continue
            of = r.of
            res[of.target if of.kind == "param" else f"input{of.index}"] = g
        return res
