"""Profiling the latency model at start-up: a short grid of synthetic iterations timed on the real executor.

The samples (what each iteration computed, how long it took) fit the
:class:`~flexc.runtime.latency.LatencyModel` the co-serving policy plans with.
Every tensor-parallel rank runs the same grid, so their collectives pair up.

:func:`load_or_profile` is the start-up path: a saved profile is reused only
when it was measured in this context and its fit is sane
(:mod:`flexc.runtime.latency_checks`); otherwise the grid is profiled, an
implausible fit is profiled once more and then corrected (with a warning, and
not saved), and a sane one is saved with its context.

What the grid covers (``benchmarks/latency_fit.py`` measures the fit per kind of iteration in a served
load): every feature of :class:`~flexc.runtime.latency.IterationWork` varies on its own somewhere in it, the
finetuning sequences are a scratch job's on a scratch adapter (so a backward window is timed with the job's
gradient accumulation and, after a sequence's last window, its optimizer step), and the first window of each
runs the loss head. Known gap: iterations with prompt prefill chunks (rare in ``flexc run``'s load) took
1.2-1.3x the profile's prediction in the runs measured; the online refits and the drift rescaling correct it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch

from flexc.runtime.batch import ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.dataset import TrainingSequence
from flexc.runtime.latency import IterationWork, LatencyModel, iteration_work
from flexc.runtime.latency_checks import (FlopCosts, ProfileContext, check_fit, correct_fit,
                                          implausible_indices)
from flexc.runtime.sequence import FinetuneSequence, make_layouts

if TYPE_CHECKING:
    from flexc.runtime.executor import Executor
    from flexc.runtime.finetune import FinetuneJob
    from flexc.runtime.kv_cache import KVCacheManager

logger = logging.getLogger(__name__)

__all__ = ["profile_latency", "compile_serving_graphs", "load_or_profile", "PROFILE_ATTEMPTS"]

PROFILE_ATTEMPTS = 2
"""Profiles taken at most at start-up before an implausible fit is corrected instead."""

Samples = list[tuple[IterationWork, float]]


def load_or_profile(latency: LatencyModel, path: Optional[str], context: ProfileContext, costs: FlopCosts,
                    profile: Callable[[], Samples]) -> str:
    """Set ``latency``'s profile from ``path`` if it was saved in ``context`` and is sane, else from ``profile()``
    (at most :data:`PROFILE_ATTEMPTS` times, then corrected); a sane new profile is saved to ``path``. Installs
    the FLOP check for online refits. Returns (and stores as ``latency.source``) ``loaded``, ``profiled`` or
    ``corrected``."""
    latency.check = implausible_indices(costs)
    if path and os.path.isfile(path):
        saved, why = _saved_profile(path, context, costs)
        if saved is not None:
            latency.set_profile(saved.coef, saved.samples)
            latency.source = "loaded"
            logger.info("latency model loaded from %s", path)
            return latency.source
        logger.warning("latency profile %s not reused: %s; profiling again", path, why)
    for attempt in range(1, PROFILE_ATTEMPTS + 1):
        t0 = time.perf_counter()
        fresh = LatencyModel(latency.num_layers).fit(profile())
        problems = check_fit(fresh.coef, costs, len(fresh.samples), fresh.residual())
        logger.info("latency model profiled in %.1f s: %s", time.perf_counter() - t0, fresh.to_dict())
        if not problems:
            latency.set_profile(fresh.coef, fresh.samples)
            latency.source = "profiled"
            if path:
                latency.save(path, context.to_dict())
            return latency.source
        logger.warning("latency profile %d of %d is implausible: %s", attempt, PROFILE_ATTEMPTS, "; ".join(problems))
    coef = correct_fit(fresh.coef, costs)
    logger.warning("using a corrected latency model (per-token costs from the compiled graphs' FLOPs where the fit "
                   "was implausible; not saved): %s; it adapts to observed iterations",
                   [round(float(c), 8) for c in coef])
    latency.set_profile(coef, fresh.samples)
    latency.source = "corrected"
    return latency.source


def _saved_profile(path: str, context: ProfileContext,
                   costs: FlopCosts) -> tuple[Optional[LatencyModel], Optional[str]]:
    """The profile saved at ``path`` if it can be used here, else None and why not."""
    try:
        saved = LatencyModel.load(path)
    except ValueError as e:             # e.g. written by an older flexc with other features
        return None, str(e)
    why = context.differs(saved.saved_context)
    if why is not None:
        return None, why
    problems = check_fit(saved.coef, costs, len(saved.samples), saved.residual())
    return (None, f"its fit is implausible ({'; '.join(problems)})") if problems else (saved, None)


def _scratch_seq(kv: "KVCacheManager", rid: str, token_ids: list[int], n_ctx: int,
                 adapter: Optional[str] = None) -> ScheduledSequence:
    """An inference sequence on scratch KV blocks (the caller frees them): ``token_ids`` after ``n_ctx`` tokens."""
    if kv.allocate_slots(rid, n_ctx + len(token_ids)) is None:
        raise ValueError("the KV cache is too small for the start-up batches (the compile, the latency profile); "
                         "raise kv_cache_tokens")
    kind = SeqKind.DECODE if len(token_ids) == 1 else SeqKind.PREFILL
    return ScheduledSequence(req_id=rid, kind=kind, adapter_id=adapter, token_ids=token_ids,
                             num_computed_tokens=n_ctx, block_ids=list(kv.get_block_ids(rid)), sample=True)


def _batch(seqs: list[ScheduledSequence], backward: Optional[dict] = None) -> SchedulerOutput:
    return SchedulerOutput(seqs=seqs, num_scheduled_tokens={s.req_id: len(s.token_ids) for s in seqs},
                           total_num_scheduled_tokens=sum(len(s.token_ids) for s in seqs),
                           finetune_backward=backward or {})


def compile_serving_graphs(executor: "Executor", kv: "KVCacheManager", vocab_size: int) -> None:
    """Run the compiles of a compiled backend now (nothing to do eagerly): two scratch decode batches, of two
    sequences and of one (on tensor-parallel ranks, where the token count is not compiled unbacked, a batch of one
    token is a compile of its own). Seconds to a minute; the scratch KV blocks are freed after."""
    if executor.backend == "eager":
        return
    for d in (2, 1):
        seqs = []
        try:
            for j in range(d):
                seqs.append(_scratch_seq(kv, f"__compile_{j}", [j % vocab_size], 4))
            executor.execute(_batch(seqs))
        finally:
            for seq in seqs:
                kv.free(seq.req_id)


@contextlib.contextmanager
def _scratch_adapter(executor: "Executor") -> Iterator[Optional[str]]:
    """A throw-away adapter for the profile's LoRA rows (the cost of an adapter segment), removed after; None
    when the engine has no LoRA or no free slot."""
    reg = executor.adapters
    if reg is None or reg.spec is None or len(reg.adapters) >= reg.max_adapters:
        yield None
        return
    name = "__profile"
    reg.create_fresh(name)
    try:
        yield name
    finally:
        reg.remove(name)


def profile_latency(executor: "Executor", kv: "KVCacheManager", vocab_size: int, max_len: int,
                    repeats: int = 2, seed: int = 0,
                    new_job: Optional[Callable[[str, list[TrainingSequence]], "FinetuneJob"]] = None
                    ) -> list[tuple[IterationWork, float]]:
    """Time a short grid of synthetic iterations (decode, prefill, finetuning forward and backward, mixed)
    on the real executor; the samples fit a :class:`LatencyModel` at start-up.

    Every feature varies on its own somewhere in the grid: decodes with and without an adapter (the LoRA
    segment), prefill chunks with and without context (tokens apart from attention pairs), a finetuning
    sequence of a different length in every other repeat, whose first backward window runs the loss head (per
    token and per layer backward costs, and the head's, apart), and backward windows alone and beside decodes
    (the forward pass's fixed cost). An untimed first iteration takes the one-time costs. Uses scratch KV
    blocks and a scratch adapter (both freed afterwards). With ``new_job(adapter, data)`` (the engine's jobs) the
    finetuning sequences are a scratch job's on the scratch adapter, and each backward window is timed with the
    job's own per-window work (gradient accumulation, the optimizer step after a sequence's last window), as in
    a real iteration; without it, their gradients are thrown away.
    """
    grid = _Grid(executor, kv, vocab_size, seed)
    long_len = max(8, min(128, max_len // 2))
    ctx = max(4, min(32, max_len // 4))
    try:
        compile_serving_graphs(executor, kv, vocab_size)      # NOTE: a compile timed as an iteration ruins a fit
        with _scratch_adapter(executor) as adapter:
            grid.timed([grid.inference_seq(1, ctx)])
            grid.samples.clear()           # NOTE: the first iteration pays one-time costs (allocations, caches)
            for r in range(repeats):
                # NOTE: small batches, where a served load mostly is, get most of the decode samples
                for d in (1, 2, 4, 8, 32):
                    grid.timed([grid.inference_seq(1, ctx + j, adapter if d == 8 and r % 2 and j % 2 else None)
                                for j in range(d)])
                for p, c in ((long_len // 4, 0), (long_len, 0), (long_len // 4, long_len - long_len // 4)):
                    grid.timed([grid.inference_seq(p, c)])
                grid.finetuning(long_len if r % 2 == 0 else max(8, long_len // 3), ctx, adapter, new_job)
    finally:
        for rid in list(kv.req_to_blocks):
            if rid.startswith("__profile"):
                kv.free(rid)
    return grid.samples


class _Grid:
    """The profile's scratch sequences and timed iterations (:func:`profile_latency`)."""

    def __init__(self, executor: "Executor", kv: "KVCacheManager", vocab_size: int, seed: int):
        self.executor, self.kv, self.vocab_size = executor, kv, vocab_size
        self.runner = executor.runner
        self.num_layers = len(self.runner.layers)
        self.samples: list[tuple[IterationWork, float]] = []
        self._g = torch.Generator().manual_seed(seed)
        self._ids = iter(range(10**9))

    def toks(self, n: int) -> list[int]:
        return torch.randint(0, self.vocab_size, (n,), generator=self._g).tolist()

    def inference_seq(self, n_new: int, n_ctx: int, adapter: Optional[str] = None) -> ScheduledSequence:
        return _scratch_seq(self.kv, f"__profile_{next(self._ids)}", self.toks(n_new), n_ctx, adapter)

    def timed(self, seqs: list[ScheduledSequence], backward: Optional[dict] = None, ft: Optional[dict] = None,
              job: Optional["FinetuneJob"] = None) -> None:
        """Run one iteration (the forward of ``seqs``, then the ``backward`` windows) and record it."""
        batch = _batch(seqs, backward)
        work = iteration_work(batch, self.num_layers, ft or {})
        t0 = time.perf_counter()
        if seqs:
            self.executor.execute(batch, ft)
        for sid, k in (backward or {}).items():
            result = ft[sid].backward_window(self.runner, k)
            if job is not None:
                job.on_window(result)
        self.executor.synchronize()
        self.samples.append((work, time.perf_counter() - t0))
        for s in seqs:
            if s.kind is not SeqKind.FINETUNE:
                self.kv.free(s.req_id)

    def finetuning(self, seq_len: int, ctx: int, adapter: Optional[str],
                   new_job: Optional[Callable[[str, list[TrainingSequence]], "FinetuneJob"]]) -> None:
        """One finetuning sequence of ``seq_len`` tokens: two forward chunks (the second beside four decodes),
        then its backward: the window with the loss head and the next alone, the rest beside two decodes (the
        forward pass's fixed cost is the serving graphs'; a backward alone does not pay it)."""
        kv = self.kv
        seq = TrainingSequence(tuple(self.toks(seq_len)), tuple(self.toks(seq_len - 1)) + (-100,))
        job = new_job(adapter, [seq]) if new_job is not None and adapter is not None else None
        weights = self.executor.adapters.get(adapter).weights if adapter is not None else None
        fs = job.next_sequence() if job is not None else FinetuneSequence(
            seq, make_layouts(self.runner), 1.0 / seq_len, f"__profile_ft_{next(self._ids)}", adapter=weights)
        ftmap = {fs.seq_id: fs}
        for n in (seq_len // 4, seq_len - seq_len // 4):
            s = None
            if kv.allocate_slots(fs.seq_id, fs.forward_pos + n) is not None:
                start, tid, _ = fs.next_chunk(n)
                s = ScheduledSequence(req_id=fs.seq_id, kind=SeqKind.FINETUNE, adapter_id=adapter, token_ids=tid,
                                      num_computed_tokens=start, block_ids=list(kv.get_block_ids(fs.seq_id)),
                                      sample=False)
            extra = [self.inference_seq(1, ctx) for _ in range(4)] if n != seq_len // 4 else []
            self.timed(extra + ([s] if s is not None else []), ft=ftmap)
        if fs.in_backward:
            self.timed([], backward={fs.seq_id: 1}, ft=ftmap, job=job)
            self.timed([], backward={fs.seq_id: max(1, self.num_layers // 2)}, ft=ftmap, job=job)
            if not fs.done:
                self.timed([self.inference_seq(1, ctx), self.inference_seq(1, ctx + 1)],
                           backward={fs.seq_id: fs.next_backward_layer + 1}, ft=ftmap, job=job)
        kv.free(fs.seq_id)
