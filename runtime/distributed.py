"""Tensor-parallel execution of the compiled region graphs on torch.distributed.

Ranks are started by ``torchrun`` (:func:`init_tp` reads its environment) or,
for tests and examples, by :func:`spawn` (torch.multiprocessing on 127.0.0.1).
The backend is gloo on CPU and NCCL on GPU. Rank 0 schedules and sends each
batch to the others (:func:`broadcast_batch`); every rank runs the sharded
forward/backward graphs the ``parallelize`` pass built (``report.sharded``),
whose functional collectives (``torch.ops._c10d_functional``) do the
communication, with only its own shards of the decoder-layer weights
(:func:`load_sharded_model` reads just those slices from safetensors files;
:func:`layer_shards` cuts them from a model in memory; embedding and head stay
replicated).

The order of setting up one rank, as in torchtitan's ``parallelize``:

1. init the process group (:func:`init_tp`), one tensor-parallel group = the world;
2. bind the sharded graphs' collectives to that group (:func:`flexc.ir.parallel.bind_group`);
3. cut each layer's weights to this rank's shards (the plan's ``placements``);
4. run regions exactly as :class:`flexc.runtime.regions.RegionRunner` does.

Invariant (tests/runtime/test_distributed.py): logits and LoRA gradients on tp
ranks equal the single-process run's (each rank's gradient is its shard).

The serving engine on the group (:mod:`flexc.runtime.tp_engine`, started by
``run_tp`` or under ``torchrun``) keeps one scheduler, on rank 0; the other
ranks mirror it through one small protocol. Rank 0 broadcasts a
:class:`RankMessage` (:func:`broadcast_message`) for every event that touches
what all ranks hold, in the order it happens, and the others apply each in
turn (``run_worker``). A message is an :class:`Op` and its arguments (ids,
counts, sequences, adapter tensors being registered), never model weights or
activations:

========================  ========================================================================
``STEP`` (batch)          the iteration's :class:`~flexc.runtime.batch.SchedulerOutput`: run its
                          forward tokens and its backward windows (``batch.finetune_backward``);
                          a finetuning sequence id not seen before is the queue's next one
``LOAD_ADAPTER``          ``Engine.load_adapter(name, path, seed, init)``: each rank reads the
                          directory (or draws the same fresh tensors) and keeps its shards
``ADD_ADAPTER_TENSORS``   ``Engine.add_adapter_tensors(name, state)``, the whole tensors inline
``FINETUNE``              ``Engine.finetune(dataset, **options)`` with the dataset as sequences
``SAVE_ADAPTER``          ``Engine.save_adapter(name, directory)``: every rank joins the gather
                          of the shards, rank 0 writes the PEFT directory
``PROFILE``               every rank times the latency model's synthetic batches (start-up)
``STOP``                  leave the worker loop
========================  ========================================================================

Sampling needs no message back: the logits are replicated, so rank 0's sampled
tokens are the result. Adapter weights, gradients, fp32 masters and optimizer
state are each rank's shards (:class:`ShardPlan` cuts and gathers them); the
optimizer's update is elementwise, so the shards stay the shards of the
single-process update.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from flexc.ir.graph import NODE_INFO
from flexc.ir.parallel import Placement, Replicate, Shard
from flexc.ir.sharded import bind_group
from flexc.ir.program import RegionProgram
from flexc.ir.regions import TOKEN_INPUTS, LayerRegion, causal_lm_parts
from flexc.runtime.batch import SchedulerOutput
from flexc.runtime.regions import RegionRunner

if TYPE_CHECKING:
    from flexc.compiler import CompiledModel

logger = logging.getLogger(__name__)

__all__ = ["ParallelDims", "init_tp", "spawn", "start_workers", "broadcast_batch", "shard_tensor", "layer_shards",
           "TPRegionRunner", "load_sharded_model", "ShardPlan", "Op", "RankMessage", "broadcast_message"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """Layout of this process in the tensor-parallel group (tp spans the world for now)."""

    tp: int
    """Tensor-parallel degree = number of ranks."""
    rank: int
    """This process's rank in the group, 0..tp-1."""
    backend: str
    """``gloo`` (CPU) or ``nccl`` (GPU)."""
    group_name: str
    """Name of the process group the graphs' collectives use."""

    def __post_init__(self) -> None:
        if self.tp < 1 or not 0 <= self.rank < self.tp:
            raise ValueError(f"rank {self.rank} is not in a tensor-parallel group of {self.tp}")


def init_tp(tp: Optional[int] = None, backend: Optional[str] = None,
            init_method: Optional[str] = None) -> ParallelDims:
    """Join (or create) the default process group from the torchrun environment; tp must equal the world size.

    ``init_method`` (from :func:`start_workers`): join that local group of ``tp`` ranks as rank 0 instead.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":   # NOTE: pick the device before the group exists, so NCCL binds to it
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0))))
    if not dist.is_initialized():
        if init_method is not None:
            dist.init_process_group(backend, init_method=init_method, rank=0, world_size=tp)
        else:
            dist.init_process_group(backend)
    world = dist.get_world_size()
    if tp is not None and tp != world:
        raise ValueError(f"tp={tp} but the world has {world} ranks; flexc runs tensor parallelism over the world")
    return ParallelDims(tp=world, rank=dist.get_rank(), backend=dist.get_backend(),
                        group_name=dist.group.WORLD.group_name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, fn: Callable, tp: int, port: int, backend: str, args: tuple, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    dims = init_tp(tp, backend)
    try:
        fn(dims, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], tp: int, *args: Any, backend: str = "gloo", start_method: str = "spawn",
          threads: int = 0) -> None:
    """Run ``fn(dims, *args)`` on ``tp`` local processes (127.0.0.1); an exception in any rank is re-raised.

    ``start_method="fork"`` (CPU only) hands ``args`` to the ranks without pickling, e.g. a compiled
    model built once in the parent; ``threads`` sets each rank's intra-op threads (0: torch's default).
    """
    import torch.multiprocessing as mp
    mp.start_processes(_spawn_entry, args=(fn, tp, _free_port(), backend, args, threads), nprocs=tp, join=True,
                       start_method=start_method)


def _broadcast_object(dims: ParallelDims, obj: Any) -> Any:
    box = [obj if dims.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def start_workers(fn: Callable[..., Any], tp: int, *args: Any, backend: str = "gloo", start_method: str = "spawn",
                  threads: int = 0) -> tuple[str, list]:
    """Start ranks 1..tp-1 of a local group (127.0.0.1) as processes running ``fn(dims, *args)``; this process
    then joins as rank 0 with ``init_tp(tp, backend, init_method)``. Returns (init_method, the processes)."""
    import torch.multiprocessing as mp
    port = _free_port()
    ctx = mp.get_context(start_method)
    procs = [ctx.Process(target=_spawn_entry, args=(r, fn, tp, port, backend, args, threads)) for r in range(1, tp)]
    for p in procs:
        p.start()
    return f"tcp://127.0.0.1:{port}", procs


def broadcast_batch(dims: ParallelDims, batch: Optional[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rank 0's batch description (a dict of CPU tensors) on every rank; other ranks pass None."""
    return _broadcast_object(dims, batch)


class Op(str, enum.Enum):
    """What a :class:`RankMessage` asks the other ranks to do (the table in the module docstring)."""

    STEP = "step"
    LOAD_ADAPTER = "load_adapter"
    ADD_ADAPTER_TENSORS = "add_adapter_tensors"
    FINETUNE = "finetune"
    SAVE_ADAPTER = "save_adapter"
    PROFILE = "profile"
    STOP = "stop"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankMessage:
    """One event rank 0 broadcasts; every other rank applies it before the next one."""

    op: Op
    batch: Optional[SchedulerOutput] = None
    """For ``STEP``: the iteration's batch description (ids and counts, no tensors)."""
    args: dict = dataclasses.field(default_factory=dict)
    """For the engine calls: the keyword arguments rank 0's call was made with (data and whole adapter
    tensors inline, so no rank needs rank 0's files or tokenizer for them)."""


def broadcast_message(dims: ParallelDims, msg: Optional[RankMessage]) -> RankMessage:
    """Rank 0's message on every rank; other ranks pass None and block until it comes."""
    return _broadcast_object(dims, msg)


def shard_tensor(t: torch.Tensor, placement: Placement, rank: int, tp: int) -> torch.Tensor:
    """Rank ``rank``'s part of a whole tensor (a contiguous copy for shards, the tensor itself if replicated)."""
    if isinstance(placement, Shard):
        if t.shape[placement.dim] % tp:
            raise ValueError(f"dim {placement.dim} of size {t.shape[placement.dim]} does not split over {tp} ranks")
        return t.chunk(tp, placement.dim)[rank].contiguous()
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
        self.report = _parallel_report(compiled)
        self.rank, self.tp = (dims.rank, dims.tp) if dims is not None else (0, self.report.tp)
        self.model_sharded = model_sharded
        lm = causal_lm_parts(model)
        prefix = {id(m): n for n, m in model.named_modules()}
        self.layer_prefix = [prefix[id(layer)] for layer in lm.model.layers]

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


def _parallel_report(compiled: "CompiledModel") -> Any:
    for rec in compiled.passes:
        if rec.name == "parallelize":
            return rec.report
    raise ValueError("the compiled model has no 'parallelize' pass record; compile with tp>1 and the pass")


def _local_kv_heads(compiled: "CompiledModel", tp: int) -> int:
    """KV heads one rank attends over (what its paged cache holds): the attention op's key input as the
    parallelize pass placed it, Shard on the head dim -> num_kv_heads / tp."""
    heads = compiled.graph.model["num_kv_heads"]
    region = compiled.regions[compiled.graph.layer_regions[0]]
    for n in region.fw.graph.find_nodes(op="call_function", target=torch.ops.flexc.attention.default):
        key = n.args[1].meta[NODE_INFO]          # k: [T, num_kv_heads, head_dim]
        return heads // tp if isinstance(key.placement, Shard) and key.placement.dim == 1 else heads
    return heads


class TPRegionRunner(RegionRunner):
    """Runs a :class:`CompiledModel`'s sharded region graphs on one rank of a tensor-parallel group.

    ``model`` provides the weights; only this rank's shards of the decoder layers are kept
    (``self.layer_params``). Gradients come back as local shards, by the model's parameter names; everything
    else (forward_logits, train_step) is :class:`RegionRunner`'s, run with the sharded programs.
    """

    def __init__(self, compiled: "CompiledModel", model: nn.Module, dims: ParallelDims, sharded: bool = False):
        report = _parallel_report(compiled)
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
        self.num_kv_heads = _local_kv_heads(compiled, dims.tp)

    def placement(self, param_name: str) -> Placement:
        """Placement of a model parameter (by ``model.named_parameters()`` name) in this plan."""
        return self.shards.placement(param_name)
