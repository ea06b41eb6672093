"""The serving engine on a tensor-parallel group: rank 0 drives, the other ranks mirror.

Every rank builds the same :class:`TPEngine` over its shards (a ``TPRegionRunner``,
the KV cache of its KV heads, the adapter registry of its adapter shards). Rank 0
is the engine a user talks to: it schedules, samples, keeps the metrics and runs
the finetuning jobs' bookkeeping, and before each thing that the other ranks
must repeat (an iteration's batch, an adapter loaded or saved, a job started)
broadcasts one :class:`~flexc.runtime.protocol.RankMessage` (the protocol
table is in :mod:`flexc.runtime.protocol`). Ranks 1..tp-1 sit in
:func:`run_worker`, applying the messages in order until ``STOP``.

:func:`run_tp` starts the group and hands rank 0's engine to a function::

    def drive(engine):                     # runs on rank 0, in this process
        engine.finetune(data, adapter="ft", optimizer="sgd", lr=0.1)
        out = engine.generate(["What is 2+2?"], adapter="ft", max_new_tokens=16)
        engine.save_adapter("ft", "out/ft")       # the whole adapter, the same files as at tp=1
        return out

    out = run_tp(drive, functools.partial(Engine.from_pretrained, "path/to/hf_model", lora=LoraSpec(r=8)), tp=2)

Invariant (tests/runtime/test_tp_engine.py): a co-serving run (generation and
optimizer steps) gives the same tokens and adapter weights at tp=2 as at tp=1.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from flexc.runtime.batch import ExecutorOutput, SchedulerOutput, SeqKind
from flexc.runtime.dataset import load_jsonl
from flexc.runtime.engine import Engine, EngineConfig
from flexc.runtime.finetune import FinetuneJob
from flexc.runtime.launch import ParallelDims, init_tp, start_workers
from flexc.runtime.protocol import Op, RankMessage, broadcast_message
from flexc.runtime.tp_runner import TPRegionRunner

if TYPE_CHECKING:
    from flexc.ir.artifact import CompiledModel
    from flexc.runtime.scheduler import SchedulingPolicy

logger = logging.getLogger(__name__)

__all__ = ["TPEngine", "run_worker", "serve_rank", "run_tp"]

T = TypeVar("T")


class _MirrorPolicy:
    """The other ranks' policy: they run rank 0's batches and never schedule (nor profile) themselves."""

    name = "mirror"
    runs_finetuning = True

    def schedule(self, sched: Any) -> list:
        raise RuntimeError("a tensor-parallel worker rank does not schedule; it runs rank 0's batches")


class TPEngine(Engine):
    """:class:`Engine` on one rank of a tensor-parallel group; on rank 0 every call that the other ranks must
    repeat is broadcast first (or right after it succeeded here, for calls that need no collective)."""

    profile_lazily = False
    """A default co-serving policy profiles at start-up: later, requests hold KV blocks the workers' scratch
    batches would overwrite."""

    def __init__(self, compiled: "CompiledModel", model: nn.Module, dims: ParallelDims, *, tokenizer: Any = None,
                 config: Optional[EngineConfig] = None, policy: Optional["SchedulingPolicy"] = None,
                 sharded: bool = False):
        """``model``: whole weights, or this rank's shards from ``load_sharded_model`` (``sharded=True``).
        The other ranks schedule nothing, so only rank 0 keeps ``policy``."""
        self.dims = dims
        self._stopped = False
        runner = TPRegionRunner(compiled, model, dims, sharded=sharded)
        super().__init__(compiled, model, tokenizer=tokenizer, config=config,
                         policy=policy if self.is_driver else _MirrorPolicy(), runner=runner)

    @property
    def is_driver(self) -> bool:
        """Rank 0: schedules, and tells the other ranks."""
        return self.dims.rank == 0

    def _tell(self, op: Op, batch: Optional[SchedulerOutput] = None, **args: Any) -> None:
        if self.is_driver:
            if self._stopped:
                raise RuntimeError("the tensor-parallel workers have stopped (close() was called)")
            broadcast_message(self.dims, RankMessage(op=op, batch=batch, args=args))

    def close(self) -> None:
        """Rank 0: send the other ranks out of :func:`run_worker` (idempotent)."""
        if self.is_driver and not self._stopped:
            self._tell(Op.STOP)
            self._stopped = True

    # ------------------------------------------------------------------ mirrored calls
    def _run_batch(self, batch: SchedulerOutput) -> tuple[ExecutorOutput, int]:
        self._tell(Op.STEP, batch=batch)         # NOTE: before executing: the graphs' collectives pair up
        return super()._run_batch(batch)

    def load_adapter(self, name: str, path: Optional[str] = None, *, seed: int = 0, init: str = "peft") -> None:
        super().load_adapter(name, path, seed=seed, init=init)
        self._tell(Op.LOAD_ADAPTER, name=name, path=path, seed=seed, init=init)

    def add_adapter_tensors(self, name: str, state: dict) -> None:
        super().add_adapter_tensors(name, state)
        self._tell(Op.ADD_ADAPTER_TENSORS, name=name, state={k: v.detach().cpu() for k, v in state.items()})

    def finetune(self, dataset: Any, **options: Any) -> FinetuneJob:
        """:meth:`Engine.finetune`; the other ranks get the dataset as sequences. Checkpoints are not written at
        tp > 1 yet (they would hold rank 0's shards only)."""
        if self.dims.tp > 1 and options.get("checkpoint_dir"):
            raise ValueError(f"checkpoint_dir is not supported at tp={self.dims.tp} yet; save the adapter with "
                             "save_adapter, or finetune at tp=1 to checkpoint")
        if self.is_driver and isinstance(dataset, str):
            dataset = load_jsonl(dataset, self.tokenizer, self.max_model_len)
        job = super().finetune(dataset, **options)
        self._tell(Op.FINETUNE, dataset=list(dataset), **options)
        return job

    def save_adapter(self, name: str, directory: str) -> None:
        """Gather adapter ``name``'s shards on every rank; rank 0 writes the PEFT directory (as at tp=1)."""
        if not self.is_driver:
            self.adapters.whole_weights(name)    # take part in the gather
            return
        self.adapters.get(name)                  # ValueError here, before the other ranks are told
        self._tell(Op.SAVE_ADAPTER, name=name, directory=directory)
        super().save_adapter(name, directory)

    def _profile_latency(self) -> list:
        """:meth:`Engine._profile_latency`; every rank times the same synthetic batches (each time rank 0
        profiles: a saved profile of another context, or an implausible fit, is profiled again)."""
        if self.kv.req_to_blocks:            # NOTE: the workers' scratch blocks would overwrite live K/V
            raise ValueError("at tp > 1 the latency model can only be profiled while no sequence holds KV "
                             "blocks (at start-up)")
        self._tell(Op.PROFILE)
        return super()._profile_latency()

    # ------------------------------------------------------------------ the worker side
    def mirror_step(self, batch: SchedulerOutput) -> None:
        """Run rank 0's batch here. A finetuning sequence this rank has not seen yet is the finetuning queue's
        next one (rank 0's scheduler took it from the same queue, in the same state)."""
        q = self.finetune_queue
        for sid in [s.req_id for s in batch.seqs if s.kind is SeqKind.FINETUNE] + list(batch.finetune_backward):
            if sid not in q.sequences:
                act = q.active()
                if act is None or act[1].seq_id != sid:
                    raise RuntimeError(f"rank {self.dims.rank}: finetuning sequence {sid} scheduled by rank 0 is "
                                       f"not this rank's next one ({act[1].seq_id if act else 'none'})")
        self._run_batch(batch)


_HANDLERS: dict[Op, Callable[[TPEngine, RankMessage], Any]] = {
    Op.STEP: lambda e, m: e.mirror_step(m.batch),
    Op.LOAD_ADAPTER: lambda e, m: e.load_adapter(**m.args),
    Op.ADD_ADAPTER_TENSORS: lambda e, m: e.add_adapter_tensors(**m.args),
    Op.FINETUNE: lambda e, m: e.finetune(**m.args),
    Op.SAVE_ADAPTER: lambda e, m: e.save_adapter(**m.args),
    Op.PROFILE: lambda e, m: super(TPEngine, e)._profile_latency(),     # the grid rank 0 times, without telling
}
"""What a worker does for each message (``STOP`` ends :func:`run_worker`)."""


def run_worker(engine: TPEngine) -> None:
    """Ranks 1..tp-1: apply rank 0's messages in order until ``STOP``."""
    assert not engine.is_driver, "rank 0 drives the engine"
    while True:
        msg = broadcast_message(engine.dims, None)
        if msg.op is Op.STOP:
            return
        try:
            _HANDLERS[msg.op](engine, msg)
        except Exception as e:
            raise RuntimeError(f"rank {engine.dims.rank}: {msg.op.value} failed: {type(e).__name__}: {e}") from e


def serve_rank(dims: ParallelDims, build: Callable[..., TPEngine], driver: Optional[Callable[[TPEngine], T]]
               ) -> Optional[T]:
    """One rank's whole life: build its engine (``build(dims=dims)``); rank 0 returns ``driver(engine)`` and then
    stops the others, the others run :func:`run_worker` and return None."""
    engine = build(dims=dims)
    if not engine.is_driver:
        run_worker(engine)
        return None
    assert driver is not None, "rank 0 needs a driver"
    try:
        return driver(engine)
    finally:
        engine.close()


def _worker_main(dims: ParallelDims, build: Callable[..., TPEngine]) -> None:
    serve_rank(dims, build, None)


def run_tp(driver: Callable[[Engine], T], build: Callable[..., Engine], tp: int, *, backend: Optional[str] = None,
           start_method: str = "spawn", threads: int = 0) -> Optional[T]:
    """Run ``driver(engine)`` with the rank-0 engine of a ``tp``-rank group and return its result.

    ``build(dims=...)`` makes one rank's engine, e.g. ``functools.partial(Engine.from_pretrained, "model",
    lora=...)`` (``dims=None`` at tp=1: a plain :class:`Engine`). Under ``torchrun`` (``WORLD_SIZE`` set) this
    process is one rank: rank 0 returns the driver's result, the others serve and return None. Otherwise this
    process is rank 0 and starts ranks 1..tp-1 on 127.0.0.1 (``start_method`` ``spawn``, or ``fork`` on CPU
    to hand them objects without pickling; ``threads``: their intra-op threads, 0 = torch's default).
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dims = init_tp(tp, backend)
        try:
            return serve_rank(dims, build, driver)
        finally:
            dist.destroy_process_group()
    if tp == 1:
        return driver(build(dims=None))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    init_method, procs = start_workers(_worker_main, tp, build, backend=backend, start_method=start_method,
                                       threads=threads)
    try:
        dims = init_tp(tp, backend, init_method)
        try:
            result = serve_rank(dims, build, driver)
        finally:
            dist.destroy_process_group()
    except BaseException as e:
        for p in procs:
            p.join(timeout=1.0)                  # a worker that crashed is what broke rank 0's collective
        crashed = [r for r, p in enumerate(procs, 1) if p.exitcode]
        for p in procs:                          # NOTE: the others may wait for a message that will never come
            if p.is_alive():
                p.terminate()
            p.join()
        if crashed and isinstance(e, Exception):
            raise RuntimeError(f"tensor-parallel rank(s) {crashed} failed (their traceback is above); "
                               f"rank 0 stopped with {type(e).__name__}: {e}") from e
        raise
    for p in procs:                              # they leave after STOP
        p.join()
    crashed = [r for r, p in enumerate(procs, 1) if p.exitcode]
    if crashed:
        raise RuntimeError(f"tensor-parallel rank(s) {crashed} exited with an error (their output is above)")
    return result
