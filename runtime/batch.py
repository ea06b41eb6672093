"""What crosses between the scheduler, the executor and the engine each iteration.

One iteration runs ONE flat batch of tokens. Every token belongs to a
sequence; every sequence has a kind (inference prefill, inference decode, later
finetuning) and an adapter (or none). The scheduler describes the batch with
ids and counts only (:class:`SchedulerOutput`: no tensors, no objects of other
rooms); the executor turns it into tensors, runs the compiled regions and
answers with an :class:`ExecutorOutput` (as vLLM's ``SchedulerOutput`` /
``ModelRunnerOutput``).

Example: two requests, ``a`` decoding its 7th token and ``b`` prefilling the
first 5 of its 12 prompt tokens with adapter ``"math"``::

    SchedulerOutput(seqs=[
        ScheduledSequence(req_id="a", kind=SeqKind.DECODE, adapter_id=None, token_ids=[812],
                          num_computed_tokens=30, block_ids=[3, 9], sample=True, ...),
        ScheduledSequence(req_id="b", kind=SeqKind.PREFILL, adapter_id="math", token_ids=[1, 5, 7, 2, 9],
                          num_computed_tokens=0, block_ids=[4], sample=False, ...)],
        num_scheduled_tokens={"a": 1, "b": 5}, total_num_scheduled_tokens=6, ...)
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

__all__ = ["SeqKind", "SamplingParams", "ScheduledSequence", "SchedulerOutput", "ExecutorOutput"]


class SeqKind(str, enum.Enum):
    """What a sequence's tokens are for in this iteration."""

    PREFILL = "prefill"
    """Prompt tokens (or recomputed tokens after a preemption) entering the KV cache; a chunk may be partial."""
    DECODE = "decode"
    """One newly sampled token per iteration."""
    FINETUNE = "finetune"
    """A chunk of a finetuning sequence's forward: attends to its own cached K/V like a prefill chunk, samples
    nothing, and its rows of every saved tensor go to the sequence's activation store."""


@dataclasses.dataclass(kw_only=True, frozen=True)
class SamplingParams:
    """How a request's next token is chosen from the logits."""

    temperature: float = 0.0
    """0 is greedy (argmax, the same tokens as transformers ``generate(do_sample=False)``); > 0 samples."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to at least top_p, in (0, 1]."""
    seed: Optional[int] = None
    """Seed of the request's own random generator (reproducible sampling); None draws one."""

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(kw_only=True)
class ScheduledSequence:
    """One sequence's share of the flat batch."""

    req_id: str
    """The request this sequence belongs to."""
    kind: SeqKind
    """Prefill chunk, decode token or (later) finetuning tokens."""
    adapter_id: Optional[str]
    """Name of the LoRA adapter whose weights this sequence runs with; None for the base model."""
    token_ids: list[int]
    """The tokens scheduled this iteration, at positions num_computed_tokens .. num_computed_tokens+len-1."""
    num_computed_tokens: int
    """Tokens of the sequence already in the KV cache (the context the new tokens attend to)."""
    block_ids: list[int]
    """The sequence's block table: physical KV block of each logical block, enough for all its tokens."""
    sample: bool
    """Whether the last scheduled token's logits are sampled (a prefill chunk that does not finish the prompt
    is not)."""
    sampling: SamplingParams = SamplingParams()
    """How to sample (read only when ``sample``)."""


@dataclasses.dataclass(kw_only=True)
class SchedulerOutput:
    """The flat batch of one iteration: which tokens of which sequences run, and what changed."""

    seqs: list[ScheduledSequence]
    """Scheduled sequences; decodes first, then prefill chunks (the flat batch keeps this order per adapter)."""
    num_scheduled_tokens: dict[str, int]
    """Tokens scheduled per request id."""
    total_num_scheduled_tokens: int
    """Sum of num_scheduled_tokens; at most the scheduler's token budget."""
    preempted_req_ids: list[str] = dataclasses.field(default_factory=list)
    """Requests preempted while building this batch: their KV blocks were freed, they recompute later."""
    finished_req_ids: list[str] = dataclasses.field(default_factory=list)
    """Requests finished since the previous batch: the executor drops its per-request state (RNGs)."""
    finetune_backward: dict[str, int] = dataclasses.field(default_factory=dict)
    """Finetuning sequence id -> decoder layers whose backward runs this iteration (top-down window)."""

    @property
    def empty(self) -> bool:
        return not self.seqs and not self.finetune_backward


@dataclasses.dataclass(kw_only=True)
class ExecutorOutput:
    """What the executor returns for one :class:`SchedulerOutput`."""

    sampled_token_ids: dict[str, int]
    """The next token of every sequence scheduled with ``sample=True``, by request id."""
    num_tokens: int = 0
    """Tokens that ran through the model in this iteration."""
