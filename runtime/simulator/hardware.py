"""GPUs the roofline cost model knows: peak throughput, bandwidths, the fractions of them kernels reach.

Built in (dense bf16, no sparsity; datasheet numbers, sources in the README's Simulator section):

=============  ============  ==========  =============  ======
GPU            bf16 FLOP/s   HBM B/s     NVLink B/s     memory
=============  ============  ==========  =============  ======
a100-80gb      312e12        2.039e12    600e9          80 GB
h100           989e12        3.35e12     900e9          80 GB
h200           989e12        4.8e12      900e9          141 GB
=============  ============  ==========  =============  ======

Achievable fractions: large GEMMs reach about 70-75% of peak and small-batch
decode GEMMs 75-80% of memory bandwidth (Vidur's measured A100/H100 operator
tables); a ring all-reduce reaches about 240 GB/s bus bandwidth on A100 NVLink
and 470 GB/s on H100 (nccl-tests reference numbers), i.e. 0.40 / 0.52 of the
datasheet's bidirectional NVLink figure.

Other GPUs come from a JSON file: one object with the :class:`GPU` fields, or a
list of them, or ``{"gpus": [...]}``::

    [{"name": "l40s", "peak_flops": 362e12, "memory_bandwidth": 864e9, "interconnect_bandwidth": 64e9,
      "memory_bytes": 48e9}]
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
from typing import Mapping, Optional

__all__ = ["GPU", "BUILTIN_GPUS", "load_gpus", "resolve_gpu"]


@dataclasses.dataclass(kw_only=True, frozen=True)
class GPU:
    """One accelerator as the roofline model sees it (per GPU; a tensor-parallel instance has ``tp`` of them)."""

    name: str
    peak_flops: float
    """Dense bf16 FLOP/s from the datasheet (no sparsity)."""
    memory_bandwidth: float
    """HBM bytes/s from the datasheet."""
    interconnect_bandwidth: float
    """GPU-to-GPU bytes/s from the datasheet (NVLink, both directions together)."""
    memory_bytes: float
    """HBM capacity in bytes."""
    gemm_efficiency: float = 0.72
    """Fraction of ``peak_flops`` compute-bound kernels (large GEMMs, attention over long contexts) reach."""
    bandwidth_efficiency: float = 0.78
    """Fraction of ``memory_bandwidth`` memory-bound kernels (small-batch GEMMs, decode attention) reach."""
    link_efficiency: float = 0.40
    """Fraction of ``interconnect_bandwidth`` a ring all-reduce moves per rank (its bus bandwidth)."""
    kernel_overhead: float = 5e-6
    """Seconds of fixed cost per kernel (launch and tail), added to its roofline time."""
    collective_latency: float = 20e-6
    """Seconds of fixed cost per collective (the parallelize pass's default)."""
    memory_utilization: float = 0.9
    """Fraction of ``memory_bytes`` the engine may plan with (weights, adapters, activations, KV cache)."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a GPU needs a non-empty name, got {self.name!r}")
        for f in ("peak_flops", "memory_bandwidth", "interconnect_bandwidth", "memory_bytes"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"GPU {self.name}: {f} must be a positive number, got {v!r}")
        for f in ("gemm_efficiency", "bandwidth_efficiency", "link_efficiency", "memory_utilization"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"GPU {self.name}: {f} must be in (0, 1], got {v!r}")
        for f in ("kernel_overhead", "collective_latency"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"GPU {self.name}: {f} must be seconds >= 0, got {v!r}")

    @property
    def compute_rate(self) -> float:
        """FLOP/s a compute-bound kernel reaches."""
        return self.peak_flops * self.gemm_efficiency

    @property
    def memory_rate(self) -> float:
        """Bytes/s a memory-bound kernel reaches."""
        return self.memory_bandwidth * self.bandwidth_efficiency

    @property
    def link_rate(self) -> float:
        """Bytes/s one rank sends in a ring collective."""
        return self.interconnect_bandwidth * self.link_efficiency

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BUILTIN_GPUS: Mapping[str, GPU] = types.MappingProxyType({
    g.name: g for g in (
        GPU(name="a100-80gb", peak_flops=312e12, memory_bandwidth=2.039e12, interconnect_bandwidth=600e9,
            memory_bytes=80e9, link_efficiency=0.40),
        GPU(name="h100", peak_flops=989e12, memory_bandwidth=3.35e12, interconnect_bandwidth=900e9,
            memory_bytes=80e9, link_efficiency=0.52),
        GPU(name="h200", peak_flops=989e12, memory_bandwidth=4.8e12, interconnect_bandwidth=900e9,
            memory_bytes=141e9, link_efficiency=0.52),
    )
})
"""The built-in table (read-only)."""


def load_gpus(path: str) -> dict[str, GPU]:
    """GPUs from a JSON file (an object, a list of objects, or ``{"gpus": [...]}``), by name."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read GPU file {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from e
    items = data.get("gpus", data) if isinstance(data, dict) else data
    items = [items] if isinstance(items, dict) else items
    if not isinstance(items, list) or not items:
        raise ValueError(f"{path}: expected a GPU object, a list of them or {{'gpus': [...]}}")
    fields = {f.name for f in dataclasses.fields(GPU)}
    out: dict[str, GPU] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: entry {i} is not an object")
        unknown = sorted(set(item) - fields)
        if unknown:
            raise ValueError(f"{path}: entry {i} has unknown field(s) {', '.join(unknown)}; "
                             f"allowed: {', '.join(sorted(fields))}")
        try:
            gpu = GPU(**item)
        except TypeError as e:
            raise ValueError(f"{path}: entry {i}: {e}") from e
        out[gpu.name] = gpu
    return out


def resolve_gpu(name: str, gpu_file: Optional[str] = None) -> GPU:
    """A built-in GPU by name, or one from ``gpu_file`` (which may also override a built-in name)."""
    table = dict(BUILTIN_GPUS)
    if gpu_file is not None:
        table.update(load_gpus(gpu_file))
    key = name.lower() if name.lower() in table else name
    if key not in table:
        raise ValueError(f"unknown GPU {name!r}; allowed: {', '.join(sorted(table))}"
                         + ("" if gpu_file else " (or give --gpu-file with your own)"))
    return table[key]
