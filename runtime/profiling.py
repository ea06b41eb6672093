"""Profiling the latency model at start-up: a short grid of synthetic iterations timed on the real executor.

The samples (what each iteration computed, how long it took) fit the
:class:`~flexc.runtime.latency.LatencyModel` the co-serving policy plans with.
Every tensor-parallel rank runs the same grid, so their collectives pair up.

:func:`load_or_profile` is the start-up path: a saved profile is reused only
when it was measured in this context and its fit is sane
(:mod:`flexc.runtime.latency_checks`); otherwise the grid is profiled, an
implausible fit is profiled once more and then corrected (with a warning, and
not saved), and a sane one is saved with its context.

Known gap (measured with ``benchmarks/latency_fit.py``): a sequence's first
backward window also runs the LM head's loss (forward and backward over the
whole sequence), and no feature of :class:`~flexc.runtime.latency.IterationWork`
carries it. On SmolLM2 at 1 thread the grid's first window (head + 1 layer, 128
tokens) took 0.54-0.55 s and the next (15 layers) 0.84-0.88 s: the head costs
about eight layers. The fit folds it into the fixed cost per iteration (0.29 s,
where a 1-decode iteration takes 0.19 s), so light iterations are over-predicted
and mixed ones under-predicted until the online refits and the drift rescaling
catch up. The grid also runs the layer windows only, not the job's per-window
gradient bookkeeping and optimizer steps (about 9% of a co-serving run's
backward time). A feature for the head's tokens (in the grid, the model, the
policies' window sizing and the simulator's roofline, whose cost model already
prices the head apart) was tried: it fitted the forward kinds better but not
decodes beside backward windows, which hold a cost not yet explained. Not built.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Callable, Optional

import torch

from flexc.runtime.batch import ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.dataset import TrainingSequence
from flexc.runtime.latency import IterationWork, LatencyModel, iteration_work
from flexc.runtime.latency_checks import (FlopCosts, ProfileContext, check_fit, correct_fit,
                                          implausible_indices)
from flexc.runtime.sequence import FinetuneSequence, make_layouts

if TYPE_CHECKING:
    from flexc.runtime.executor import Executor
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


def _scratch_seq(kv: "KVCacheManager", rid: str, token_ids: list[int], n_ctx: int) -> ScheduledSequence:
    """An inference sequence on scratch KV blocks (the caller frees them): ``token_ids`` after ``n_ctx`` tokens."""
    if kv.allocate_slots(rid, n_ctx + len(token_ids)) is None:
        raise ValueError("the KV cache is too small for the start-up batches (the compile, the latency profile); "
                         "raise kv_cache_tokens")
    kind = SeqKind.DECODE if len(token_ids) == 1 else SeqKind.PREFILL
    return ScheduledSequence(req_id=rid, kind=kind, adapter_id=None, token_ids=token_ids, num_computed_tokens=n_ctx,
                             block_ids=list(kv.get_block_ids(rid)), sample=True)


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


def profile_latency(executor: "Executor", kv: "KVCacheManager", vocab_size: int, max_len: int,
                    repeats: int = 2, seed: int = 0) -> list[tuple[IterationWork, float]]:
    """Time a short grid of synthetic iterations (decode, prefill, finetuning forward and backward, mixed)
    on the real executor; the samples fit a :class:`LatencyModel` at start-up.

    Uses scratch KV blocks (freed afterwards) and a throw-away finetuning sequence on the base weights.
    """
    g = torch.Generator().manual_seed(seed)
    runner = executor.runner
    num_layers = len(runner.layers)
    seq_len = max(8, min(128, max_len // 2))
    ctx = max(4, min(32, max_len // 4))
    samples: list[tuple[IterationWork, float]] = []
    ids = iter(range(10**9))

    def toks(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=g).tolist()

    def inference_seq(n_new: int, n_ctx: int) -> ScheduledSequence:
        return _scratch_seq(kv, f"__profile_{next(ids)}", toks(n_new), n_ctx)

    def timed(seqs, backward=None, ft=None) -> None:
        batch = _batch(seqs, backward)
        t0 = time.perf_counter()
        if seqs:
            executor.execute(batch, ft)
        for sid, k in (backward or {}).items():
            ft[sid].backward_window(runner, k)
        executor.synchronize()
        samples.append((iteration_work(batch, num_layers, {s: f.length for s, f in (ft or {}).items()}),
                        time.perf_counter() - t0))
        for s in seqs:
            if s.kind is not SeqKind.FINETUNE:
                kv.free(s.req_id)

    try:
        compile_serving_graphs(executor, kv, vocab_size)      # NOTE: a compile timed as an iteration ruins a fit
        for _ in range(repeats):
            for d in (1, 8, 32):
                timed([inference_seq(1, ctx) for _ in range(d)])
            for p in (seq_len // 4, seq_len):
                timed([inference_seq(p, 0)])
            seq = TrainingSequence(tuple(toks(seq_len)), tuple(toks(seq_len - 1)) + (-100,))
            fs = FinetuneSequence(seq, make_layouts(runner), 1.0 / seq_len, f"__profile_ft_{next(ids)}")
            ftmap = {fs.seq_id: fs}
            for n in (seq_len // 4, seq_len - seq_len // 4):
                s = None
                if kv.allocate_slots(fs.seq_id, fs.forward_pos + n) is not None:
                    start, tid, _ = fs.next_chunk(n)
                    s = ScheduledSequence(req_id=fs.seq_id, kind=SeqKind.FINETUNE, adapter_id=None, token_ids=tid,
                                          num_computed_tokens=start, block_ids=list(kv.get_block_ids(fs.seq_id)),
                                          sample=False)
                extra = [inference_seq(1, ctx) for _ in range(4)] if n != seq_len // 4 else []
                timed(extra + ([s] if s is not None else []), ft=ftmap)
            if fs.in_backward:
                timed([], backward={fs.seq_id: 1}, ft=ftmap)
                timed([], backward={fs.seq_id: max(1, num_layers // 2)}, ft=ftmap)
            kv.free(fs.seq_id)
    finally:
        for rid in list(kv.req_to_blocks):
            if rid.startswith("__profile"):
                kv.free(rid)
    return samples
