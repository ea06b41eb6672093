"""Cost models: how long one iteration of the simulated engine takes.

One interface, the features the runtime's own latency model uses
(:class:`~flexc.runtime.latency.IterationWork`) plus what that linear model
leaves out and a roofline needs (:class:`IterationDetail`, read off the
scheduled batch). Two implementations:

* :class:`MeasuredCost`: the runtime's fitted latency model (``Engine.fit_latency_model`` or a saved profile):
  the simulator then replays the machine the profile was taken on;
* :class:`RooflineCost`: the compiled region graphs' FLOPs and bytes, kernel by kernel
  (:mod:`flexc.runtime.simulator.roofline`), on a GPU of the hardware table. An iteration is ONE forward pass
  over the weights for all its tokens (decodes, prefill chunks, finetuning chunks), then the backward windows
  scheduled in it: per kernel max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth) + a fixed overhead,
  attention priced from the batch's query x context pairs and K/V reads, plus the collectives of the
  tensor-parallel plan; the loss head of a finetuning sequence runs with its first backward window.

Example: on an A100-80GB, one decode iteration of 32 llama-3.1-8b requests with 1,000 tokens of context reads
the 16 GB of weights and 4.2 GB of K/V: about 13 ms.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol

from flexc.ir.spec import KVCacheSpec, parse_dtype
from flexc.runtime.batch import SchedulerOutput, SeqKind
from flexc.runtime.latency import IterationWork, LatencyModel
from flexc.runtime.simulator.hardware import GPU
from flexc.runtime.simulator.roofline import (AttentionCost, CollectiveTable, KernelTable,
                                              attention_cost, collective_table, kernel_table)

__all__ = ["IterationDetail", "CostModel", "MeasuredCost", "RooflineCost", "iteration_detail", "kv_bytes_per_token",
           "kv_capacity"]

@dataclasses.dataclass(frozen=True, kw_only=True)
class IterationDetail:
    """What a scheduled batch holds beyond :class:`IterationWork` (the roofline reads it; a measured model
    may ignore it)."""

    decode_context_tokens: int = 0
    """Sum over decode tokens of the context they attend to (the K/V they read from the cache)."""
    chunk_context_tokens: int = 0
    """Sum over prefill and finetuning chunks of context + new tokens (the K/V each chunk reads once)."""
    sampled_tokens: int = 0
    """Tokens whose logits are computed (decodes and the last chunk of each prompt)."""


def iteration_detail(batch: SchedulerOutput) -> IterationDetail:
    """The detail of ``batch`` (the loss heads it runs are :class:`IterationWork`'s ``ft_loss_tokens``)."""
    dec = chunk = sampled = 0
    for s in batch.seqs:
        n = len(s.token_ids)
        if s.kind is SeqKind.DECODE:
            dec += s.num_computed_tokens + n
        else:
            chunk += s.num_computed_tokens + n
        sampled += bool(s.sample)
    return IterationDetail(decode_context_tokens=dec, chunk_context_tokens=chunk, sampled_tokens=sampled)


class CostModel(Protocol):
    """Seconds of one iteration."""

    name: str

    def seconds(self, work: IterationWork, detail: IterationDetail = IterationDetail()) -> float:
        ...


class MeasuredCost:
    """The runtime's fitted latency model as a cost model (a copy: later refits of the engine's model from the
    simulated iterations do not move it)."""

    name = "measured"

    def __init__(self, latency: LatencyModel):
        if not any(c > 0 for c in latency.coef):
            raise ValueError("the measured cost model needs a fitted latency model (all coefficients are 0)")
        self.latency = LatencyModel(latency.num_layers, list(latency.coef))

    @classmethod
    def load(cls, path: str) -> "MeasuredCost":
        """From a latency profile JSON (``LatencyModel.save``, e.g. ``flexc run``'s ``latency.json``)."""
        return cls(LatencyModel.load(path))

    def seconds(self, work: IterationWork, detail: IterationDetail = IterationDetail()) -> float:
        return max(self.latency.predict(work), 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Template:
    """One decoder-layer template: how many layers run it and its kernels."""

    count: int
    forward: KernelTable
    attention: AttentionCost
    forward_comm: CollectiveTable
    backward: Optional[KernelTable]
    backward_comm: CollectiveTable


class RooflineCost:
    """Iteration seconds from the compiled graphs on ``tp`` GPUs of type ``gpu`` (see the module docstring)."""

    name = "roofline"

    def __init__(self, compiled: Any, gpu: GPU, tp: int = 1):
        """``compiled``: a ``CompiledModel`` (``flexc.compile``) at this ``tp``; its parallelize pass supplies the
        collectives and per-node placements when tp > 1."""
        model = compiled.graph.model
        if tp != int(compiled.options.get("tp", 1) or 1):
            raise ValueError(f"the model was compiled for tp={compiled.options.get('tp', 1)}, not tp={tp}")
        self.gpu = gpu
        self.tp = tp
        self.num_layers = int(model["num_layers"])
        regions = compiled.graph.regions
        sharded = _sharded_graphs(compiled)
        kv_layer = kv_bytes_per_token(compiled) / self.num_layers / tp
        templates = []
        for name, members in compiled.graph.layer_templates().items():
            r = regions[name]
            fw_sh, bw_sh = sharded.get(name, (None, None))
            templates.append(_Template(
                count=len(members), forward=kernel_table(r.fw, tp, keep_attention=False),
                attention=attention_cost(r.fw, tp, kv_layer), forward_comm=collective_table(fw_sh, tp),
                backward=kernel_table(r.bw, tp) if r.bw is not None else None,
                backward_comm=collective_table(bw_sh, tp)))
        self.templates = tuple(templates)
        self.trainable = all(t.backward is not None for t in templates) and regions.get("head") is not None \
            and regions["head"].bw is not None
        """Whether the graphs include the backward (compiled with LoRA)."""
        self.embed = kernel_table(regions["embed"].fw, tp)
        self.logits = kernel_table(regions["logits"].fw, tp)
        head = regions.get("head")
        self.head = (kernel_table(head.fw, tp), kernel_table(head.bw, tp)) if head is not None and head.bw is not None \
            else None
        self._cache: dict[str, dict] = {}

    def components(self, work: IterationWork, detail: IterationDetail = IterationDetail()) -> dict[str, float]:
        """Seconds by part: ``forward`` (the layers' matmuls and fused kernels, the embedding, the collectives),
        ``attention``, ``logits``, ``backward`` (layer windows), ``head``."""
        g = self.gpu
        tokens = work.decode_tokens + work.prefill_tokens + work.ft_forward_tokens
        out = dict.fromkeys(("forward", "attention", "logits", "backward", "head"), 0.0)
        if tokens:
            out["forward"] = self._memo("forward", (tokens, work.ft_forward_tokens), self._forward)
            pairs = work.attention_pairs + detail.decode_context_tokens
            kv = detail.decode_context_tokens + detail.chunk_context_tokens
            out["attention"] = sum(t.count * t.attention.seconds(pairs, kv, tokens, g.compute_rate, g.memory_rate,
                                                                   g.kernel_overhead) for t in self.templates)
        if detail.sampled_tokens:
            out["logits"] = self._memo("logits", detail.sampled_tokens, lambda n: self.logits.seconds(n, *self._rates))
        if work.ft_backward_layers:
            if not self.trainable:
                raise ValueError("this model was compiled without LoRA: it has no backward graphs to price")
            length = work.ft_backward_layer_tokens / work.ft_backward_layers
            out["backward"] = self._memo("backward", length, self._backward_layer) * work.ft_backward_layers
        if work.ft_loss_tokens:
            if self.head is None:
                raise ValueError("this model was compiled without LoRA: it has no loss head to price")
            out["head"] = self._memo("head", work.ft_loss_tokens,
                                     lambda n: sum(k.seconds(n, *self._rates) for k in self.head))
        return out

    def seconds(self, work: IterationWork, detail: IterationDetail = IterationDetail()) -> float:
        return sum(self.components(work, detail).values())

    @property
    def _rates(self) -> tuple[float, float, float]:
        return self.gpu.compute_rate, self.gpu.memory_rate, self.gpu.kernel_overhead

    def _forward(self, key: tuple[int, int]) -> float:
        tokens, saved = key
        g = self.gpu
        total = self.embed.seconds(tokens, *self._rates)
        for t in self.templates:
            total += t.count * (t.forward.seconds(tokens, *self._rates, saved_tokens=saved)
                                + t.forward_comm.seconds(tokens, g.link_rate, g.collective_latency))
        return total

    def _backward_layer(self, length: float) -> float:
        """Seconds of one layer's backward over a sequence of ``length`` tokens (averaged over templates)."""
        g = self.gpu
        return sum(t.count * (t.backward.seconds(length, *self._rates)
                              + t.backward_comm.seconds(length, g.link_rate, g.collective_latency))
                   for t in self.templates) / self.num_layers

    def _memo(self, part: str, key: Any, compute) -> float:
        # NOTE: an iteration's parts repeat (the same decode counts, the same sequence in backward for many
        # iterations): memoized per instance, bounded
        cache = self._cache.setdefault(part, {})
        v = cache.get(key)
        if v is None:
            if len(cache) > 200_000:
                cache.clear()
            v = cache[key] = compute(key)
        return v


def _sharded_graphs(compiled: Any) -> dict:
    """Region -> (forward, backward) sharded graphs of the parallelize pass (empty at tp 1)."""
    for rec in getattr(compiled, "passes", ()):
        if rec.name == "parallelize":
            return dict(getattr(rec.report, "sharded", {}) or {})
    return {}


def kv_bytes_per_token(compiled: Any) -> int:
    """K and V bytes of one token over all layers (the memory plan's and the engine's formula)."""
    return KVCacheSpec.of_model(compiled.graph.model, compiled.dtype).bytes_per_token


_PLANNED = ("base_weights", "adapter_weights", "adapter_grads", "optimizer", "activations", "transient")


def kv_capacity(compiled: Any, gpu: GPU, tp: int = 1) -> int:
    """KV-cache tokens an instance of ``tp`` GPUs holds: its usable memory less what the memory plan places
    beside the cache (base weights, adapter weights, gradients and optimizer state, one finetuning sequence's
    activations, the transient peak). The finetuning sequence's own K/V share the same paged pool."""
    usable = gpu.memory_bytes * gpu.memory_utilization * tp
    report = next((rec.report for rec in getattr(compiled, "passes", ()) if rec.name == "memory"), None)
    if report is not None:
        fixed = sum(int(report.breakdown.get(k, 0)) for k in _PLANNED)
    else:                                   # no memory plan (compiled without LoRA): the weights alone
        fixed = int(compiled.graph.model.get("parameters", 0)) * parse_dtype(compiled.dtype).itemsize
    tokens = int((usable - fixed) // kv_bytes_per_token(compiled))
    if tokens <= 0:
        raise ValueError(f"{compiled.source.name} does not fit {tp} x {gpu.name}: the plan needs "
                         f"{fixed / 1e9:.1f} GB of {usable / 1e9:.1f} GB usable; raise tp")
    return tokens
