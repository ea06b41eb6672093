"""The rank protocol of the serving engine on a tensor-parallel group.

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
from typing import Any, Optional

import torch.distributed as dist

from flexc.runtime.batch import SchedulerOutput
from flexc.runtime.launch import ParallelDims

__all__ = ["Op", "RankMessage", "broadcast_message", "broadcast_object"]


def broadcast_object(dims: ParallelDims, obj: Any) -> Any:
    """Rank 0's picklable object on every rank; the other ranks pass None and block until it comes."""
    box = [obj if dims.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    return broadcast_object(dims, msg)
