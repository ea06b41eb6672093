"""Continuous batching: which tokens of which requests run in the next iteration.

The model (once): requests wait in a FCFS queue and run in a list ordered by
admission. Every iteration the scheduler builds ONE flat batch of at most
``token_budget`` tokens; a policy object decides which tokens, the scheduler
provides the mechanism (KV allocation, preemption, bookkeeping):

* :class:`DecodeFirstPolicy` (the default, vLLM's chunked-prefill order):
  every running request that is decoding gets its one token first, then
  partially prefilled requests continue their prompt (chunked prefill), then
  waiting requests are admitted first come first served while the budget and
  free KV blocks allow;
* when a running request needs a KV block and none is free, the newest running
  request is preempted: its blocks are freed and it goes back to the front of
  the waiting queue with its generated tokens, to be recomputed (prefilled
  again over prompt + output) later. A request is never dropped.

The co-serving issue adds an SLO-aware policy (finetuning tokens up to what
the latency model allows) beside this one, through the same
:class:`SchedulingPolicy` interface.

``update_from_output`` applies the executor's sampled tokens: it advances each
request, appends its token and finishes it on EOS, a stop token, max_new_tokens
or the model's context length. Tests drive it with hand-built
:class:`ExecutorOutput` objects (no model).
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import logging
from typing import TYPE_CHECKING, Optional, Protocol

from flexc.runtime.batch import ExecutorOutput, SamplingParams, ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.kv_cache import KVCacheManager

if TYPE_CHECKING:
    from flexc.runtime.finetune import FinetuneQueue
    from flexc.runtime.sequence import FinetuneSequence

logger = logging.getLogger(__name__)

__all__ = ["RequestStatus", "Request", "RequestUpdate", "SchedulerConfig", "SchedulingPolicy", "DecodeFirstPolicy",
           "Scheduler"]


class RequestStatus(str, enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    """EOS or a stop token/string."""
    FINISHED_LENGTH = "length"
    """max_new_tokens reached, or the model's context length."""
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclasses.dataclass(kw_only=True)
class Request:
    """One generation request and its progress."""

    req_id: str
    prompt_token_ids: list[int]
    max_new_tokens: int
    """Tokens to generate at most (> 0)."""
    adapter_id: Optional[str] = None
    """LoRA adapter the request runs with; None for the base model."""
    sampling: SamplingParams = SamplingParams()
    stop_token_ids: frozenset = frozenset()
    """Tokens that end the request (EOS and the request's stop ids); the stop token is kept in the output."""
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache; reset to 0 by a preemption."""
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:                  # NOTE: decodes: no copy of the whole prompt
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]


@dataclasses.dataclass(kw_only=True)
class RequestUpdate:
    """What one iteration did to one request (the engine turns it into stream events)."""

    req_id: str
    new_token_ids: list[int]
    finished: bool
    status: RequestStatus


@dataclasses.dataclass(kw_only=True, frozen=True)
class SchedulerConfig:
    """Limits of one iteration."""

    token_budget: int = 512
    """Tokens per iteration (decodes + prefill chunks); larger amortizes weight reads, smaller bounds latency."""
    max_num_seqs: int = 256
    """Sequences per iteration."""
    max_model_len: int = 2048
    """The model's context length: a request stops when prompt + output reach it."""

    def __post_init__(self) -> None:
        for name in ("token_budget", "max_num_seqs", "max_model_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


class SchedulingPolicy(Protocol):
    """Chooses the next batch using the scheduler's mechanism (``schedule_tokens``, ``admit``, queues)."""

    def schedule(self, sched: "Scheduler") -> list[ScheduledSequence]:
        ...


class DecodeFirstPolicy:
    """Decodes first, then chunked prefill of running requests, then FCFS admission (see the module docstring)."""

    name = "decode_first"
    runs_finetuning = False
    """Inference only: the engine refuses finetuning jobs under this policy."""

    def schedule(self, sched: "Scheduler", budget: Optional[int] = None) -> list[ScheduledSequence]:
        """``budget``: tokens these sequences may take (default the whole token budget; a co-serving policy
        reserves some for finetuning)."""
        total = sched.config.token_budget if budget is None else budget
        budget = total
        seqs: list[ScheduledSequence] = []
        # NOTE: decodes first: a decode is 1 token and holds up a user already waiting for output
        for phase in (SeqKind.DECODE, SeqKind.PREFILL):
            for req in list(sched.running):
                if budget == 0 or len(seqs) >= sched.config.max_num_seqs:
                    return seqs
                if req.status is not RequestStatus.RUNNING or sched.next_kind(req) is not phase:
                    continue            # preempted earlier in this loop, or the other phase
                before = len(seqs)
                seq = sched.schedule_tokens(req, min(budget, req.num_tokens - req.num_computed_tokens), seqs)
                if len(seqs) != before:   # a preemption took already scheduled sequences out again
                    budget = total - sum(len(s.token_ids) for s in seqs)
                if seq is not None:
                    seqs.append(seq)
                    budget -= len(seq.token_ids)
        while sched.waiting and budget > 0 and len(seqs) < sched.config.max_num_seqs:
            seq = sched.admit(sched.waiting[0], budget)
            if seq is None:
                break                   # FCFS: no overtaking when the head does not fit
            seqs.append(seq)
            budget -= len(seq.token_ids)
        return seqs


class Scheduler:
    """Queues, KV block accounting and preemption around a pluggable :class:`SchedulingPolicy`."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, policy: Optional[SchedulingPolicy] = None):
        self.config = config
        self.kv = kv
        self.policy = policy or DecodeFirstPolicy()
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        """Admitted requests, oldest first; preemption takes from the end."""
        self.requests: dict[str, Request] = {}
        self._finished_since_step: list[str] = []
        self._preempted: list[str] = []
        self.finetune: Optional["FinetuneQueue"] = None
        """The finetuning jobs co-served with the requests (set by the engine); policies read it."""
        self._backward: dict[str, int] = {}

    # ------------------------------------------------------------------ requests
    def add_request(self, req: Request) -> None:
        """Queue a request (validated by the caller; this only checks what the cache imposes)."""
        if req.req_id in self.requests:
            raise ValueError(f"request id {req.req_id!r} is already in use")
        need = self.kv.num_blocks_for(min(len(req.prompt_token_ids) + req.max_new_tokens, self.config.max_model_len))
        if need > self.kv.num_blocks:
            raise ValueError(f"request {req.req_id!r} needs {need} KV blocks (prompt {len(req.prompt_token_ids)} + "
                             f"max_new_tokens {req.max_new_tokens} tokens) but the whole cache has "
                             f"{self.kv.num_blocks}; raise kv_cache_tokens or lower max_new_tokens")
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def abort_request(self, req_id: str) -> None:
        req = self.requests.get(req_id)
        if req is not None and not req.status.finished:
            self._finish(req, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, req_id: str, status: RequestStatus) -> None:
        """End a request from outside (the engine's stop strings)."""
        req = self.requests[req_id]
        if not req.status.finished:
            self._finish(req, status)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ mechanism for policies
    @staticmethod
    def next_kind(req: Request) -> SeqKind:
        """DECODE when only the last sampled token lacks K/V, else PREFILL (prompt or recompute)."""
        return SeqKind.DECODE if req.output_token_ids and req.num_computed_tokens == req.num_tokens - 1 \
            else SeqKind.PREFILL

    def schedule_tokens(self, req: Request, num_tokens: int,
                        scheduled: list[ScheduledSequence]) -> Optional[ScheduledSequence]:
        """Allocate KV for the next ``num_tokens`` tokens of running ``req``, preempting the newest running
        requests while blocks are missing; None if ``req`` itself had to be preempted.

        A victim already in ``scheduled`` is taken out of it again (its tokens return to the budget).
        """
        while self.kv.allocate_slots(req.req_id, req.num_computed_tokens + num_tokens) is None:
            victim = self.running[-1]
            self.preempt(victim)
            for i, s in enumerate(scheduled):
                if s.req_id == victim.req_id:
                    del scheduled[i]
                    break
            if victim is req:
                return None
        return self._make_seq(req, num_tokens)

    def admit(self, req: Request, budget: int) -> Optional[ScheduledSequence]:
        """Move the head of the waiting queue to running with its first chunk, if its blocks are free."""
        num_tokens = min(budget, req.num_tokens - req.num_computed_tokens)
        if self.kv.allocate_slots(req.req_id, req.num_computed_tokens + num_tokens) is None:
            return None
        self.waiting.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return self._make_seq(req, num_tokens)

    def preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and requeue it at the front; it recomputes prompt + output later."""
        self.kv.free(req.req_id)
        self.running.remove(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        self._preempted.append(req.req_id)
        logger.debug("preempted %s (%d tokens to recompute)", req.req_id, req.num_tokens)

    def _make_seq(self, req: Request, num_tokens: int) -> ScheduledSequence:
        start = req.num_computed_tokens
        return ScheduledSequence(
            req_id=req.req_id, kind=self.next_kind(req), adapter_id=req.adapter_id,
            token_ids=req.token_ids(start, start + num_tokens), num_computed_tokens=start,
            block_ids=list(self.kv.get_block_ids(req.req_id)), sample=start + num_tokens == req.num_tokens,
            sampling=req.sampling)

    def schedule_finetune_forward(self, fs: "FinetuneSequence", adapter_id: str,
                                  num_tokens: int) -> Optional[ScheduledSequence]:
        """The next ``num_tokens`` forward tokens of a finetuning sequence, if its KV blocks fit (finetuning
        never preempts inference: None when the cache is full)."""
        num_tokens = min(num_tokens, fs.forward_remaining)
        if num_tokens <= 0 or self.kv.allocate_slots(fs.seq_id, fs.forward_pos + num_tokens) is None:
            return None
        start, ids, _ = fs.next_chunk(num_tokens)
        return ScheduledSequence(req_id=fs.seq_id, kind=SeqKind.FINETUNE, adapter_id=adapter_id, token_ids=ids,
                                 num_computed_tokens=start, block_ids=list(self.kv.get_block_ids(fs.seq_id)),
                                 sample=False)

    def schedule_finetune_backward(self, fs: "FinetuneSequence", num_layers: int) -> None:
        """Run the backward of the next ``num_layers`` layers of ``fs`` in this iteration."""
        if num_layers > 0:
            self._backward[fs.seq_id] = num_layers

    # ------------------------------------------------------------------ the iteration
    def schedule(self) -> SchedulerOutput:
        """The next flat batch (possibly empty when nothing is runnable)."""
        self._preempted = []
        self._backward = {}
        seqs = self.policy.schedule(self)
        num = {s.req_id: len(s.token_ids) for s in seqs}
        assert sum(num.values()) <= self.config.token_budget
        finished, self._finished_since_step = self._finished_since_step, []
        return SchedulerOutput(seqs=seqs, num_scheduled_tokens=num, total_num_scheduled_tokens=sum(num.values()),
                               preempted_req_ids=list(self._preempted), finished_req_ids=finished,
                               finetune_backward=dict(self._backward))

    def update_from_output(self, out: SchedulerOutput, result: ExecutorOutput) -> list[RequestUpdate]:
        """Advance the scheduled requests by what ran and what was sampled."""
        updates = []
        for seq in out.seqs:
            if seq.kind is SeqKind.FINETUNE:
                continue                # finetuning progress lives in its FinetuneSequence
            req = self.requests.get(seq.req_id)
            if req is None or req.status is not RequestStatus.RUNNING:
                continue                # aborted meanwhile
            req.num_computed_tokens += len(seq.token_ids)
            if not seq.sample:
                continue
            tok = result.sampled_token_ids[seq.req_id]
            req.output_token_ids.append(tok)
            status = self._stop_status(req, tok)
            if status is not None:
                self._finish(req, status)
            updates.append(RequestUpdate(req_id=req.req_id, new_token_ids=[tok], finished=status is not None,
                                         status=req.status))
        return updates

    def _stop_status(self, req: Request, tok: int) -> Optional[RequestStatus]:
        if tok in req.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if len(req.output_token_ids) >= req.max_new_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.req_id)
        req.status = status
        self._finished_since_step.append(req.req_id)
        del self.requests[req.req_id]
