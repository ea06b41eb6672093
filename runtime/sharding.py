"""Cutting tensors into one rank's shards and gathering them back, by the parallelize pass's plan.

The ``parallelize`` pass gives every parameter of a layer template a placement
(``Replicate`` or ``Shard(dim)``). Here that plan meets real tensors:
:func:`shard_tensor` cuts a whole tensor, :func:`layer_shards` cuts a layer's
weights held in memory, :func:`load_sharded_model` reads only this rank's
slices from safetensors files, and :class:`ShardPlan` maps model parameter
names to placements and moves adapter tensors between whole and sharded
(``gather`` and ``all_true`` are collectives: every rank calls them in the
same order). Embedding and head stay replicated.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from flexc.ir.graph import NODE_INFO
from flexc.ir.placements import Placement, Replicate, Shard
from flexc.ir.regions import causal_lm_parts, layer_prefixes
from flexc.runtime.launch import ParallelDims

if TYPE_CHECKING:
    from flexc.ir.artifact import CompiledModel

__all__ = ["shard_tensor", "layer_shards", "load_sharded_model", "ShardPlan", "local_kv_heads"]


def shard_tensor(t: torch.Tensor, placement: Placement, rank: int, tp: int) -> torch.Tensor:
    """Rank ``rank``'s part of a whole tensor (a copy with its own storage for shards, the tensor itself if
    replicated). NOTE: a copy even where the slice is already contiguous (rows of a row-major weight): a view
    would start at a different storage offset on every rank, and a graph compiled for one rank would not be
    the same graph on the next (Inductor's cache then compiles it again on every rank)."""
    if isinstance(placement, Shard):
        if t.shape[placement.dim] % tp:
            raise ValueError(f"dim {placement.dim} of size {t.shape[placement.dim]} does not split over {tp} ranks")
        return t.chunk(tp, placement.dim)[rank].clone(memory_format=torch.contiguous_format)
    return t


class _LocalParams:
    """What :meth:`RegionProgram.bind` needs from a module: parameters and buffers by FQN."""

    def __init__(self, params: dict[str, torch.Tensor], buffers: Optional[dict[str, torch.Tensor]] = None):
        self.params, self.buffers = params, buffers or {}

    def get_parameter(self, name: str) -> torch.Tensor:
        return self.params[name]

    def get_buffer(self, name: str) -> torch.Tensor:
        return self.buffers[name]


def layer_shards(region: nn.Module, placements: dict[str, Placement], rank: int, tp: int) -> _LocalParams:
    """This rank's shards of one region module's parameters (FQN inside the region -> tensor)."""
    params = {}
    for name, p in region.named_parameters():
        params[name] = shard_tensor(p.detach(), placements.get(name, Replicate()), rank, tp)
    buffers = {name: b for name, b in region.named_buffers()}
    return _LocalParams(params, buffers)


def _shard_slices(shape: Sequence[int], placement: Placement, rank: int, tp: int) -> tuple:
    if not isinstance(placement, Shard):
        return tuple(slice(None) for _ in shape)
    size = shape[placement.dim] // tp
    return tuple(slice(rank * size, (rank + 1) * size) if d == placement.dim else slice(None)
                 for d in range(len(shape)))


def load_sharded_model(compiled: "CompiledModel", path: str, dims: ParallelDims,
                       adapter_state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The PEFT model with this rank's shards only: decoder-layer base weights are read slice by slice from
    the safetensors files of the Hugging Face directory ``path`` (``safe_open(...).get_slice``), everything
    else whole; adapter weights come from ``adapter_state`` (PEFT parameter name -> whole tensor) and are cut.

    Pass the result to :class:`TPRegionRunner` with ``sharded=True``.
    """
    import glob
    from peft import get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"{path}: no .safetensors files to load shards from")
    where = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            where.update({k: f for k in sf.keys()})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(compiled.source.config, dtype=dtype)
        model = get_peft_model(model, compiled.lora.to_peft()) if compiled.lora is not None else model
    plan = ShardPlan(compiled, model, dims)
    for name, p in list(model.named_parameters()):
        placement = plan.placement(name)
        if name in adapter_state:
            t = shard_tensor(adapter_state[name].to(p.dtype), placement, dims.rank, dims.tp)
        else:
            key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            if key not in where:
                raise ValueError(f"{path}: no tensor {key!r} for parameter {name!r}")
            with safe_open(where[key], framework="pt") as sf:
                sl = sf.get_slice(key)
                t = sl[_shard_slices(sl.get_shape(), placement, dims.rank, dims.tp)].to(p.dtype)
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        mod._parameters[attr] = nn.Parameter(t.contiguous(), requires_grad=p.requires_grad)
    rotary = causal_lm_parts(model).model
    rotary.rotary_emb = type(rotary.rotary_emb)(config=compiled.source.config)   # its tables: computed, not loaded
    return model


class ShardPlan:
    """Where each model parameter (by ``model.named_parameters()`` name) lives in a compiled TP plan, and the
    moves between a whole tensor and this rank's shard.

    ``shard`` cuts a whole tensor (an adapter file, a fresh init); ``gather`` rebuilds it from every rank's
    shard and ``all_true`` agrees on a flag: both are collectives, so every rank calls them in the same order.
    ``model`` may hold whole tensors or, from :func:`load_sharded_model`, this rank's shards
    (``model_sharded=True``); :meth:`whole_shape` gives the whole shape either way.
    """

    def __init__(self, compiled: "CompiledModel", model: nn.Module, dims: Optional[ParallelDims] = None,
                 model_sharded: bool = False):
        self.compiled = compiled
        self.report = compiled.pass_report("parallelize")
        self.rank, self.tp = (dims.rank, dims.tp) if dims is not None else (0, self.report.tp)
        self.model_sharded = model_sharded
        self.layer_prefix = layer_prefixes(model)

    def placement(self, param_name: str) -> Placement:
        for i, pre in enumerate(self.layer_prefix):
            if param_name.startswith(pre + "."):
                fqn = "layer." + param_name[len(pre) + 1:]
                return self.report.placements[self.compiled.graph.layer_regions[i]].get(fqn, Replicate())
        return Replicate()

    def shard(self, param_name: str, whole: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole tensor of parameter ``param_name``."""
        return shard_tensor(whole, self.placement(param_name), self.rank, self.tp)

    def gather(self, param_name: str, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor from every rank's shard (collective; a replicated tensor comes back as is)."""
        p = self.placement(param_name)
        if not isinstance(p, Shard):
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, p.dim)

    def whole_shape(self, param_name: str, shape: Sequence[int]) -> tuple[int, ...]:
        """The whole shape of a parameter whose tensor in ``model`` has ``shape``."""
        p = self.placement(param_name)
        out = list(shape)
        if self.model_sharded and isinstance(p, Shard):
            out[p.dim] *= self.tp
        return tuple(out)

    def local_shape(self, param_name: str, whole_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of this rank's part of a parameter whose whole tensor has ``whole_shape``."""
        p = self.placement(param_name)
        out = list(whole_shape)
        if isinstance(p, Shard):
            out[p.dim] //= self.tp
        return tuple(out)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (collective)."""
        t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())


def local_kv_heads(compiled: "CompiledModel", tp: int) -> int:
    """KV heads one rank attends over (what its paged cache holds): the attention op's key input as the
    parallelize pass placed it, Shard on the head dim -> num_kv_heads / tp."""
    heads = compiled.graph.model["num_kv_heads"]
    region = compiled.regions[compiled.graph.layer_regions[0]]
    for n in region.fw.graph.find_nodes(op="call_function", target=torch.ops.flexc.attention.default):
        key = n.args[1].meta[NODE_INFO]          # k: [T, num_kv_heads, head_dim]
        return heads // tp if isinstance(key.placement, Shard) and key.placement.dim == 1 else heads
    return heads
