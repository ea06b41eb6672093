"""Running a region's captured graphs with real tensors.

The captured graphs take parameters, buffers and user inputs as placeholders
(identified by ``meta['flexc_ref']``); a :class:`RegionProgram` binds them from a
region module built around real weights (``LayerRegion(model.layers[i])``), so
one layer template runs every structurally identical layer.

The graphs carry no shape checks: the program checks dtypes and static sizes
of the user inputs and that every token input has the same length.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from flexc.ir.vocab import InputKind, InputRef, OutputKind, OutputRef

__all__ = ["RegionProgram", "bind_inputs"]


def bind_inputs(refs: Sequence[InputRef], module: nn.Module, other: Callable[[InputRef], Any],
                overrides: Optional[Mapping[str, torch.Tensor]] = None) -> list[Any]:
    """The value of every placeholder described by ``refs``: PARAM/BUFFER from ``module`` by FQN, everything
    else from ``other(ref)``.

    ``overrides`` maps a parameter FQN (inside the region) to the tensor bound instead of the module's own,
    e.g. ``{"layer.self_attn.q_proj.lora_B.default.weight": that_adapters_B}`` (how the backward of a
    finetuning sequence reads the adapter it trains).
    """
    vals = []
    for r in refs:
        if r.kind is InputKind.PARAM:
            vals.append(overrides[r.target] if overrides is not None and r.target in overrides
                        else module.get_parameter(r.target))
        elif r.kind is InputKind.BUFFER:
            vals.append(module.get_buffer(r.target))
        else:
            vals.append(other(r))
    return vals


class RegionProgram:
    """Executes one region's forward (and backward) graph.

    ``forward`` returns the region outputs and the values the backward needs
    (``saved``); ``backward(saved, tangents, module)`` returns gradients keyed by
    the parameter FQN inside the region and, for user inputs, by ``input<i>``.
    The weights the backward reads are bound from ``module`` (with ``overrides``,
    e.g. the adapter a finetuning sequence trains), not saved by the forward.
    """

    def __init__(self, fw: fx.GraphModule, bw: Optional[fx.GraphModule], token_inputs: Sequence[int] = ()):
        self.fw, self.bw = fw, bw
        self.token_inputs = tuple(token_inputs)
        phs = fw.graph.find_nodes(op="placeholder")
        self.fw_inputs: list[InputRef] = [p.meta["flexc_ref"] for p in phs]
        self._user_specs = {r.index: p.meta.get("val") for p, r in zip(phs, self.fw_inputs) if r.kind is InputKind.USER}
        out = fw.graph.find_nodes(op="output")[0]
        refs: list[OutputRef] = out.meta["flexc_ref"]
        names = [a.name if isinstance(a, fx.Node) else None for a in out.args[0]]
        self.user_idx = [i for i, r in enumerate(refs) if r.kind is OutputKind.USER]
        self.saved_idx: list[int] = []
        """Forward output index of each value the backward is passed (in the backward's order)."""
        self.bw_inputs: list[InputRef] = []
        """The backward's placeholders: SAVED (``index`` into the saved list), TANGENT or PARAM/BUFFER."""
        self.bw_outputs: list[OutputRef] = []
        if bw is not None:
            for p in bw.graph.find_nodes(op="placeholder"):
                r: InputRef = p.meta["flexc_ref"]
                if r.kind is InputKind.SAVED:
                    r = InputRef(InputKind.SAVED, target=r.target, index=len(self.saved_idx))
                    self.saved_idx.append(names.index(p.name))
                self.bw_inputs.append(r)
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
        """The forward's placeholder values: parameters/buffers of ``module``, then the user arguments."""
        return bind_inputs(self.fw_inputs, module, lambda r: args[r.index], overrides)

    @torch.no_grad()
    def forward(self, module: nn.Module, args: Sequence[Any],
                overrides: Optional[Mapping[str, torch.Tensor]] = None) -> tuple[list[Any], list[Any]]:
        """Run the forward graph: (region outputs, values saved for the backward); ``overrides`` as in bind."""
        self._check(args)
        outs = self.fw(*self.bind(module, args, overrides))
        return [outs[i] for i in self.user_idx], [outs[i] for i in self.saved_idx]

    @torch.no_grad()
    def backward(self, saved: Sequence[Any], tangents: Sequence[Any], module: nn.Module,
                 overrides: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """Run the backward graph: gradients by parameter FQN and ``input<i>`` for user inputs.

        ``module`` (with ``overrides``) provides the weights the backward reads, as in :meth:`bind`.
        """
        assert self.bw is not None, "forward-only region"
        ins = bind_inputs(self.bw_inputs, module,
                          lambda r: saved[r.index] if r.kind is InputKind.SAVED else tangents[r.index], overrides)
        grads = self.bw(*ins)
        res: dict[str, torch.Tensor] = {}
        for g, r in zip(grads, self.bw_outputs):
            if g is None or r.kind is not OutputKind.GRAD:
                continue
            of = r.of
            res[of.target if of.kind is InputKind.PARAM else f"input{of.index}"] = g
        return res
