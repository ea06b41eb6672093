"""Starting the ranks of a tensor-parallel group and joining it.

Ranks come from ``torchrun`` (:func:`init_tp` reads its environment) or are
started here on 127.0.0.1 as local processes: :func:`start_workers` starts
ranks 1..tp-1 and the caller joins as rank 0 (what ``run_tp`` does), and
:func:`spawn` starts every rank as a child and waits for them (tests,
examples). The backend is gloo on CPU and NCCL on GPU; one tensor-parallel
group spans the world.
"""
from __future__ import annotations

import dataclasses
import os
import socket
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from flexc.ir.capture import forget_inherited_compile_workers

__all__ = ["ParallelDims", "init_tp", "spawn", "start_workers"]


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


def _rank_main(rank: int, fn: Callable, tp: int, port: int, backend: str, args: tuple, threads: int) -> None:
    forget_inherited_compile_workers()         # a forked rank of a parent that ran Inductor would hang compiling
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank))
    if threads:
        torch.set_num_threads(threads)
    dims = init_tp(tp, backend)
    try:
        fn(dims, *args)
    finally:
        dist.destroy_process_group()


def _start(fn: Callable[..., Any], tp: int, ranks: Iterable[int], args: tuple, backend: str, start_method: str,
           threads: int) -> tuple[int, list]:
    """Start ``fn(dims, *args)`` as local processes for ``ranks`` of a ``tp``-rank group; (port, processes)."""
    import torch.multiprocessing as mp
    port = _free_port()
    ctx = mp.get_context(start_method)
    procs = [ctx.Process(target=_rank_main, args=(r, fn, tp, port, backend, args, threads)) for r in ranks]
    for p in procs:
        p.start()
    return port, procs


def spawn(fn: Callable[..., Any], tp: int, *args: Any, backend: str = "gloo", start_method: str = "spawn",
          threads: int = 0) -> None:
    """Run ``fn(dims, *args)`` on ``tp`` local processes (127.0.0.1) and wait; a rank that fails is a RuntimeError
    naming it (its traceback is printed by the rank).

    ``start_method="fork"`` (CPU only) hands ``args`` to the ranks without pickling, e.g. a compiled
    model built once in the parent; ``threads`` sets each rank's intra-op threads (0: torch's default).
    """
    _, procs = _start(fn, tp, range(tp), args, backend, start_method, threads)
    for p in procs:
        p.join()
    failed = [r for r, p in enumerate(procs) if p.exitcode]
    if failed:
        raise RuntimeError(f"rank(s) {failed} of the tensor-parallel group failed (their traceback is above)")


def start_workers(fn: Callable[..., Any], tp: int, *args: Any, backend: str = "gloo", start_method: str = "spawn",
                  threads: int = 0) -> tuple[str, list]:
    """Start ranks 1..tp-1 of a local group (127.0.0.1) as processes running ``fn(dims, *args)``; this process
    then joins as rank 0 with ``init_tp(tp, backend, init_method)``. Returns (init_method, the processes)."""
    port, procs = _start(fn, tp, range(1, tp), args, backend, start_method, threads)
    return f"tcp://127.0.0.1:{port}", procs
