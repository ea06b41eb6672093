"""The simulated engine: :class:`~flexc.runtime.engine.Engine` with its executor swapped, nothing else.

What stays real: the engine's step (schedule, execute, update, then the
finetuning bookkeeping: free the K/V of a sequence whose forward completed, run
the scheduled backward windows, hand them to the job, count finished tokens),
the :class:`~flexc.runtime.scheduler.Scheduler` and the policy objects of
:mod:`flexc.runtime.policies`, the :class:`~flexc.runtime.kv_cache.KVCacheManager`
(sized by the memory plan), the :class:`~flexc.runtime.finetune.FinetuneQueue`
and :class:`~flexc.runtime.finetune.FinetuneJob` (gradient accumulation, step
counting), the latency model the co-serving policy fills iterations with, and
its online refinement from every iteration's (simulated) duration.

What is simulated: the :class:`SimulatedExecutor` computes nothing, it reports
finetuning chunks done and samples token 1 for every request that samples; the
:class:`SimulatedSequence` is a :class:`~flexc.runtime.sequence.SequenceProgress`
without tensors; the clock (:class:`~flexc.runtime.simulator.loop.SimClock`)
moves by the cost model's seconds for each iteration.

The policy's latency model: with the measured cost model it is that model; with
the roofline it is fitted, as the engine fits its own at start-up, from a
profile of synthetic iterations (:func:`profile_samples`), here priced by the
cost model instead of timed.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from flexc.runtime.batch import ExecutorOutput, SchedulerOutput, SeqKind
from flexc.runtime.latency import iteration_work
from flexc.runtime.engine import Engine, EngineConfig
from flexc.runtime.finetune import FinetuneConfig, FinetuneJob
from flexc.runtime.kv_cache import KVCacheManager
from flexc.runtime.latency import IterationWork, LatencyModel
from flexc.runtime.sequence import SequenceProgress, WindowResult
from flexc.runtime.simulator.cost import CostModel, IterationDetail, iteration_detail
from flexc.runtime.simulator.loop import SimClock

if TYPE_CHECKING:
    from flexc.runtime.scheduler import SchedulingPolicy
    from flexc.runtime.simulator.workload import SequenceShape

logger = logging.getLogger(__name__)

__all__ = ["SimulatedSequence", "SimulatedExecutor", "SimulatedEngine", "profile_samples", "fit_policy_latency"]

SAMPLED_TOKEN = 1
"""The token every simulated request samples (requests ignore EOS, so it never stops one)."""
_PROMPT_TOKEN = 0


class SimulatedSequence(SequenceProgress):
    """A finetuning sequence without tensors: the same progress through forward chunks and backward windows."""

    def chunk_token_ids(self, start: int, end: int) -> list[int]:
        return [_PROMPT_TOKEN] * (end - start)

    def backward_window(self, runner: Any, num_layers: int) -> WindowResult:
        """The head on the first call, then up to ``num_layers`` layers top-down (no gradients: none exist)."""
        if not self.in_backward:
            raise ValueError(f"sequence {self.seq_id}: forward covered {self.forward_done_pos}/{self.length} tokens")
        self.head_done = True
        top = self.next_backward_layer
        self.next_backward_layer = max(top - num_layers, -1)
        return WindowResult(grads={}, layers=list(range(top, self.next_backward_layer, -1)))


class SimulatedRunner:
    """What the engine reads of a region runner: the number of decoder layers."""

    def __init__(self, num_layers: int):
        self.layers = [None] * num_layers


class SimulatedExecutor:
    """The executor's interface (``execute``, ``synchronize``, ``runner``) without computation."""

    def __init__(self, num_layers: int):
        self.runner = SimulatedRunner(num_layers)

    def execute(self, batch: SchedulerOutput, finetune: Optional[dict] = None) -> ExecutorOutput:
        """Finetuning chunks are reported computed; every sequence that samples gets ``SAMPLED_TOKEN``."""
        sampled = {}
        for s in batch.seqs:
            if s.kind is SeqKind.FINETUNE:
                finetune[s.req_id].forward_completed(s.num_computed_tokens, len(s.token_ids))
            elif s.sample:
                sampled[s.req_id] = SAMPLED_TOKEN
        return ExecutorOutput(sampled_token_ids=sampled, num_tokens=batch.total_num_scheduled_tokens)

    def synchronize(self) -> None:
        pass


class SimulatedEngine(Engine):
    """The engine over a :class:`SimulatedExecutor` and a :class:`SimClock`; iteration seconds from ``cost``."""

    def __init__(self, *, num_layers: int, cost: CostModel, latency: LatencyModel,
                 policy: Union[str, "SchedulingPolicy"], config: EngineConfig, kv_blocks: int, max_model_len: int):
        """``latency``: the model the policy fills iterations with (refined online from the simulated
        iterations, as the engine refines its own); ``kv_blocks``: KV blocks of ``config.block_size`` tokens."""
        self.config = config
        self.compiled = None
        self.model = None
        self.tokenizer = None
        self.adapters = None
        self.max_model_len = max_model_len
        self.vocab_size = max(_PROMPT_TOKEN, SAMPLED_TOKEN) + 1
        self.eos_token_ids = frozenset()
        self.executor = SimulatedExecutor(num_layers)
        self.cost = cost
        self.sim_clock = SimClock()
        latency.log_drift = False            # NOTE: a drift here is the linear model against the cost model, no machine
        self._init_loop(KVCacheManager(kv_blocks, config.block_size), latency, policy, clock=self.sim_clock)

    def submit_spec(self, prompt_tokens: int, output_tokens: int, request_id: str) -> str:
        """Queue a request of ``prompt_tokens`` tokens that generates exactly ``output_tokens``."""
        return self.submit([_PROMPT_TOKEN] * prompt_tokens, max_new_tokens=output_tokens, ignore_eos=True,
                           request_id=request_id)

    def _run_batch(self, batch: SchedulerOutput) -> tuple[ExecutorOutput, int]:
        """The engine's own execution and bookkeeping, then the clock moves by the cost of the batch (priced
        before the bookkeeping drops sequences that finish in it)."""
        work = iteration_work(batch, len(self.executor.runner.layers), self.finetune_queue.sequences)
        detail = iteration_detail(batch)
        out = super()._run_batch(batch)
        self.sim_clock.advance(self.cost.seconds(work, detail))
        return out

    def finetune(self, dataset: Sequence["SequenceShape"], *, adapter: str = "default", optimizer: str = "sgd",
                 lr: float = 1e-3, steps: Optional[int] = None, epochs: int = 1, grad_accum: int = 1, seed: int = 0,
                 **options: Any) -> FinetuneJob:
        """Queue a finetuning job over sequence shapes (the real ``FinetuneJob``, without tensors)."""
        cfg = FinetuneConfig(optimizer=optimizer, lr=lr, steps=steps, epochs=epochs, grad_accum=grad_accum, seed=seed,
                             **options)
        num_layers = len(self.executor.runner.layers)
        job = FinetuneJob(f"job-{next(self._job_ids)}", list(dataset), {}, cfg,
                          lambda item, scale, sid: SimulatedSequence(item.length, num_layers, sid),
                          adapter_name=adapter)
        self.finetune_queue.add(job)
        return job

    def fit_latency_model(self) -> LatencyModel:
        raise NotImplementedError("the simulated engine's latency model is given (fit_policy_latency)")


def profile_samples(cost: CostModel, *, token_budget: int, seq_len: int, num_layers: int,
                    context: int = 1024) -> list[tuple[IterationWork, IterationDetail]]:
    """Synthetic iterations like the engine's start-up profile (decodes, prefill chunks, finetuning chunks alone
    and beside decodes, backward windows, the first one with the head), at the given scale."""
    out: list[tuple[IterationWork, IterationDetail]] = []
    for d in (1, 8, 32, 64, 128):
        for ctx in (context // 2, context * 2):
            out.append((IterationWork(decode_tokens=d),
                        IterationDetail(decode_context_tokens=d * (ctx + 1), sampled_tokens=d)))
    chunks = sorted({max(1, token_budget // 8), max(1, token_budget // 2), token_budget})
    for n in chunks:
        for ctx in (0, context):
            out.append((IterationWork(prefill_tokens=n, attention_pairs=n * (ctx + n)),
                        IterationDetail(chunk_context_tokens=ctx + n, sampled_tokens=1)))
        for pos in (0, seq_len // 2):
            for d in (0, 32):
                out.append((IterationWork(decode_tokens=d, ft_forward_tokens=n, attention_pairs=n * (pos + n)),
                            IterationDetail(decode_context_tokens=d * (context + 1), sampled_tokens=d,
                                            chunk_context_tokens=pos + n)))
    for length in (max(1, seq_len // 4), seq_len):
        for k, head in ((1, True), (1, False), (max(1, num_layers // 2), False)):
            out.append((IterationWork(ft_backward_layer_tokens=k * length, ft_backward_layers=k,
                                      ft_loss_tokens=length if head else 0), IterationDetail()))
    return out


def fit_policy_latency(cost: CostModel, *, num_layers: int, token_budget: int, seq_len: int) -> LatencyModel:
    """The latency model an engine on the simulated hardware would fit at start-up: the runtime's linear model
    over :func:`profile_samples`, priced by ``cost``."""
    samples = profile_samples(cost, token_budget=token_budget, seq_len=seq_len, num_layers=num_layers)
    return LatencyModel(num_layers).fit((w, cost.seconds(w, d)) for w, d in samples)
