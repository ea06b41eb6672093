"""The region runner of one rank of a tensor-parallel group.

Every rank runs the sharded forward/backward graphs the ``parallelize`` pass
built (``report.sharded``), whose functional collectives
(``torch.ops._c10d_functional``) do the communication, with only its own shards
of the decoder-layer weights. The order of setting up one rank, as in
torchtitan's ``parallelize``:

1. join the process group (:func:`flexc.runtime.launch.init_tp`), one tensor-parallel group = the world;
2. bind the sharded graphs' collectives to that group (:func:`flexc.ir.sharded.bind_group`);
3. cut each layer's weights to this rank's shards (the plan's ``placements``, :mod:`flexc.runtime.sharding`);
4. run regions exactly as :class:`flexc.runtime.regions.RegionRunner` does.

Invariant (tests/runtime/test_distributed.py): logits and LoRA gradients on tp
ranks equal the single-process run's (each rank's gradient is its shard).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch.distributed as dist
from torch import nn

from flexc.ir.placements import Placement
from flexc.ir.program import RegionProgram
from flexc.ir.regions import TOKEN_INPUTS, LayerRegion, causal_lm_parts
from flexc.ir.sharded import bind_group
from flexc.runtime.launch import ParallelDims
from flexc.runtime.regions import RegionRunner
from flexc.runtime.sharding import ShardPlan, layer_shards, local_kv_heads

if TYPE_CHECKING:
    import torch.fx as fx

    from flexc.ir.artifact import CompiledModel

__all__ = ["TPRegionRunner"]


class TPRegionRunner(RegionRunner):
    """Runs a :class:`CompiledModel`'s sharded region graphs on one rank of a tensor-parallel group.

    ``model`` provides the weights; only this rank's shards of the decoder layers are kept
    (``self.layer_params``). Gradients come back as local shards, by the model's parameter names; everything
    else (forward_logits, train_step) is :class:`RegionRunner`'s, run with the sharded programs.
    """

    def __init__(self, compiled: "CompiledModel", model: nn.Module, dims: ParallelDims, sharded: bool = False):
        report = compiled.pass_report("parallelize")
        if report.tp != dims.tp:
            raise ValueError(f"compiled for tp={report.tp}, running on {dims.tp} ranks")
        self.dims, self.report = dims, report
        programs: dict[str, RegionProgram] = {}
        for name in compiled.regions:
            fw, bw = report.sharded[name]
            bind_group(fw, dims.group_name)
            if bw is not None:
                bind_group(bw, dims.group_name)
            programs[name] = RegionProgram(fw, bw, TOKEN_INPUTS[name.split(".")[0]])
        layers = causal_lm_parts(model).model.layers
        layer_regions = compiled.graph.layer_regions
        # NOTE: each rank keeps only its shards of the layer weights (replicated ones are shared, not copied);
        # a model from load_sharded_model already holds them (sharded=True)
        self.layer_params = [layer_shards(LayerRegion(layer), {} if sharded else report.placements[layer_regions[i]],
                                          dims.rank, dims.tp) for i, layer in enumerate(layers)]
        super().__init__(compiled, model, programs=programs, layer_modules=self.layer_params)
        self.shards = ShardPlan(compiled, model, dims, model_sharded=sharded)
        self.num_kv_heads = local_kv_heads(compiled, dims.tp)

    def serving_graphs(self) -> dict[str, "fx.GraphModule"]:
        """This rank's serving graphs (the serve pass's sharded ones), their collectives bound to the group."""
        report = self.compiled.pass_report("serve")
        return {name: bind_group(report.sharded[name], self.dims.group_name)
                for name in dict.fromkeys(self.compiled.graph.layer_regions)}

    unbacked_token_count = False
    """NOTE: torch 2.13: a rank that loads from Inductor's cache a serving graph (with collectives) that rank 0
    compiled with an unbacked token count fails at its first call (``NameError: name 's34' is not defined``), so
    on ranks the count stays an ordinary dynamic size; the first one-token batch compiles once more."""

    def compile_turn(self) -> tuple[Optional[Callable[[], None]], Optional[Callable[[], None]]]:
        """Rank 0 compiles each serving graph first and the other ranks wait for it (a barrier), then load its
        kernels from Inductor's on-disk cache: every rank's graph is the same, and ranks compiling the same
        kernels at once only share the cores (on this 2-core CPU: 36 s a rank). Ranks started by
        ``start_workers``, or by torchrun on one machine, share that cache; a rank on another machine compiles
        its own after rank 0 (correct, only later)."""
        return (None, dist.barrier) if self.dims.rank == 0 else (dist.barrier, None)

    def placement(self, param_name: str) -> Placement:
        """Placement of a model parameter (by ``model.named_parameters()`` name) in this plan."""
        return self.shards.placement(param_name)
