"""The serving engine: submit requests, step the loop, stream tokens, generate.

One :meth:`Engine.step` is vLLM's ``EngineCore.step``: the scheduler builds one
flat batch, the executor runs it through the compiled regions, the scheduler
applies the sampled tokens. :meth:`Engine.generate` is that loop until the
given prompts finish; :meth:`Engine.submit` / :meth:`Engine.step` /
:meth:`Engine.stream` are the streaming API an HTTP server sits on.

    engine = flexc.Engine.from_pretrained("smollm2-135m", lora=flexc.LoraSpec(r=8), max_adapters=4)   # flexc/engine.py
    engine.load_adapter("math", "/path/to/peft_adapter_dir")
    out = engine.generate(["What is 2+2?", [1, 504, 33]], max_new_tokens=32, adapter="math")
    out[0].text, out[0].token_ids, out[0].ttft, out[0].tpot

Greedy at temperature 0 gives the tokens of transformers ``generate(do_sample=False)``.
The engine itself takes a compiled model and the model with its weights; the front door
(``flexc.Engine.from_pretrained``) compiles and loads them from a model name. On a tensor-parallel group
the same engine runs on every rank (:class:`~flexc.runtime.tp_engine.TPEngine`, launched by
:func:`flexc.runtime.tp_engine.run_tp`): rank 0 drives it, the others mirror it.
A bad request (empty prompt, prompt not shorter than the context, unknown
adapter, max_new_tokens <= 0, ...) raises ``ValueError`` from ``submit``; in
``generate`` it gets a result with ``error`` set while the others complete.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from flexc.runtime.adapter_training import OwnCoordinatesJob
from flexc.runtime.adapters import AdapterRegistry
from flexc.runtime.batch import ExecutorOutput, SamplingParams, SchedulerOutput, SeqKind
from flexc.runtime.checkpoint import save_peft_adapter
from flexc.runtime.dataset import load_jsonl
from flexc.runtime.finetune import FinetuneConfig, FinetuneJob, FinetuneQueue
from flexc.runtime.latency import LatencyModel, forward_work, iteration_work
from flexc.runtime.policies import InferenceOnlyPolicy, make_policy
from flexc.runtime.latency_checks import flop_costs, profile_context
from flexc.runtime.profiling import load_or_profile, profile_latency
from flexc.runtime.metrics import EngineMetrics, MetricsRecorder
from flexc.runtime.executor import BACKENDS, Executor, make_kv_spec
from flexc.runtime.kv_cache import KVCacheManager, make_num_blocks
from flexc.runtime.regions import RegionRunner
from flexc.runtime.scheduler import Request, RequestStatus, Scheduler, SchedulerConfig, SchedulingPolicy
from flexc.runtime.sequence import FinetuneSequence, make_layouts

if TYPE_CHECKING:
    from flexc.ir.artifact import CompiledModel

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "GenerationResult", "TokenEvent", "resolve_device"]

Prompt = Union[str, Sequence[int]]


@dataclasses.dataclass(kw_only=True)
class EngineConfig:
    """Serving limits of one engine."""

    kv_cache_tokens: Optional[int] = None
    """Tokens the paged KV cache holds (all sequences together); default 16384 unless kv_cache_bytes is given."""
    kv_cache_bytes: Optional[int] = None
    """Alternative to kv_cache_tokens: a memory budget in bytes for the cache."""
    block_size: int = 16
    """Tokens per KV block."""
    token_budget: int = 512
    """Tokens per iteration (decodes + prefill chunks)."""
    max_num_seqs: int = 256
    """Sequences per iteration."""
    max_adapters: int = 8
    """LoRA adapters resident at once."""
    backend: str = "eager"
    """How the serving graphs run: ``eager`` (as captured, op by op) or ``inductor`` (``torch.compile``, dynamic
    in the token count; compiled at the first batches, see ``executor.compile_seconds``)."""
    tpot_slo: float = 0.2
    """Target seconds per output token; the co-serving policy fills iterations with finetuning up to it."""
    ttft_slo: float = 5.0
    """Target seconds to the first token, queueing included (for SLO attainment)."""
    latency_profile: Optional[str] = None
    """JSON file of the fitted latency model: loaded if it exists, was measured in this context (model, dtype,
    threads, device, torch, backend, machine) and is sane, else profiled at start-up and written."""
    min_finetune_share: float = 0.05
    """The co-serving policy's floor: this fraction of each iteration's token budget (at least one backward layer)
    goes to finetuning while a job has work, even when the TPOT SLO cannot be met; 0 puts the SLO first."""

    def __post_init__(self) -> None:
        if self.kv_cache_tokens is not None and self.kv_cache_bytes is not None:
            raise ValueError("give kv_cache_tokens or kv_cache_bytes, not both")
        if self.kv_cache_tokens is None and self.kv_cache_bytes is None:
            self.kv_cache_tokens = 16384
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if not 0 <= self.min_finetune_share <= 1:
            raise ValueError(f"min_finetune_share must be a fraction in [0, 1], got {self.min_finetune_share}")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` (the current CUDA device when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but torch sees no CUDA device here; use 'cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


@dataclasses.dataclass(kw_only=True)
class GenerationResult:
    """One finished request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated tokens (EOS / the stop token included when it ended the request)."""
    text: str
    """Decoded generated text (cut before a stop string); '' without a tokenizer."""
    finish_reason: str
    """``stop`` (EOS, stop token or string), ``length`` (max_new_tokens or context), ``abort`` or ``error``."""
    ttft: float
    """Time to first token in seconds, from submission (queueing included)."""
    tpot: float
    """Time per output token after the first, in seconds (0 for a single token)."""
    adapter: Optional[str] = None
    num_preemptions: int = 0
    error: Optional[str] = None
    """Why the request was refused (then token_ids is empty)."""


@dataclasses.dataclass(kw_only=True)
class TokenEvent:
    """A token produced for a request by one step."""

    request_id: str
    token_id: int
    finished: bool
    finish_reason: Optional[str] = None


@dataclasses.dataclass
class _Tracked:
    req: Request
    submitted: float
    stop_strings: tuple[str, ...]
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    text_cut: Optional[int] = None


class Engine:
    """Continuous-batching inference over a compiled model with many resident LoRA adapters."""

    def __init__(self, compiled: "CompiledModel", model: nn.Module, *, tokenizer: Any = None,
                 config: Optional[EngineConfig] = None, policy: Union[None, str, SchedulingPolicy] = None,
                 runner: Optional["RegionRunner"] = None):
        """``policy``: a scheduling policy or its name (``coserve``, ``temporal``, ``inference_only``,
        ``finetune_only``); ``runner`` runs the regions (default: the whole ``model`` in this process; a
        ``TPRegionRunner`` for one rank of a tensor-parallel group, whose KV heads and adapter shards this
        engine then holds)."""
        self.config = config or EngineConfig()
        self.compiled = compiled
        self.model = model
        self.tokenizer = tokenizer
        hf_cfg = compiled.source.config
        self.max_model_len = int(getattr(hf_cfg, "max_position_embeddings", None) or compiled.seq_len)
        self.vocab_size = int(compiled.graph.model["vocab_size"])
        dtype = next(model.parameters()).dtype
        runner = runner if runner is not None else RegionRunner(compiled, model)
        kv_spec = make_kv_spec(compiled, dtype, self.config.block_size, num_kv_heads=runner.num_kv_heads)
        num_blocks = make_num_blocks(kv_spec, num_tokens=self.config.kv_cache_tokens,
                                     memory_budget=self.config.kv_cache_bytes)
        self.adapters = AdapterRegistry(compiled.lora, model, self.config.max_adapters, shards=runner.shards)
        self.executor = Executor(compiled, model, kv_spec=kv_spec, num_blocks=num_blocks, adapters=self.adapters,
                                 runner=runner, backend=self.config.backend)
        self.eos_token_ids = self._eos_ids(model)
        self._init_loop(KVCacheManager(num_blocks, kv_spec.block_size),
                        LatencyModel(len(compiled.graph.layer_regions)), policy)
        if getattr(self.scheduler.policy, "latency", None) is self.latency and compiled.lora is not None:
            self.fit_latency_model()
        logger.info("engine ready: %d KV blocks of %d tokens (%.1f MiB), token budget %d", num_blocks,
                    kv_spec.block_size, num_blocks * kv_spec.bytes_per_block / 2**20, self.config.token_budget)

    def _init_loop(self, kv: KVCacheManager, latency: LatencyModel, policy: Union[None, str, SchedulingPolicy],
                   clock: Optional[Callable[[], float]] = None) -> None:
        """The loop's state over any ``self.executor`` (the simulator's too): scheduler, finetuning queue, request
        tracking, metrics and the ``clock`` every timestamp reads (default ``time.perf_counter``); ``config`` and
        ``max_model_len`` set before."""
        self.kv = kv
        self.latency = latency
        if isinstance(policy, str):
            policy = make_policy(policy, latency, self.config.tpot_slo,
                                 min_finetune_share=self.config.min_finetune_share)
        self.scheduler = Scheduler(SchedulerConfig(token_budget=self.config.token_budget,
                                                   max_num_seqs=self.config.max_num_seqs,
                                                   max_model_len=self.max_model_len), kv, policy)
        self.clock = clock or time.perf_counter
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self.finetune_queue = FinetuneQueue()
        self.scheduler.finetune = self.finetune_queue
        self.recorder = MetricsRecorder(self.config.tpot_slo, self.config.ttft_slo, clock=clock)
        self._job_ids = itertools.count()

    @staticmethod
    def _eos_ids(model: nn.Module) -> frozenset:
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, int) else eos)

    # ------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: Optional[str] = None, *, seed: int = 0, init: str = "peft") -> None:
        """Make adapter ``name`` resident: from a PEFT directory, or fresh (``init`` 'peft' or 'random')."""
        if path is None:
            self.adapters.create_fresh(name, seed=seed, init=init)
        else:
            self.adapters.load_peft_dir(name, path)

    def add_adapter_tensors(self, name: str, state: dict) -> None:
        """Make adapter ``name`` resident from lora_A/lora_B tensors named as the model's parameters."""
        self.adapters.load_tensors(name, state)

    # ------------------------------------------------------------------ requests
    def _tokenize(self, prompt: Prompt, chat: bool, rid: str) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"request {rid}: a text prompt needs a tokenizer and this model has none; "
                                 "pass token ids")
            if chat:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            else:
                ids = self.tokenizer.encode(prompt) if prompt else []
            return [int(t) for t in ids]
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"request {rid}: prompt must be a string or a list of token ids, "
                             f"got {type(prompt).__name__}")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {rid}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return list(prompt)

    def submit(self, prompt: Prompt, *, max_new_tokens: int = 16, adapter: Optional[str] = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
               stop: Union[None, str, int, Sequence[Union[str, int]]] = None, chat: bool = False,
               ignore_eos: bool = False, request_id: Optional[str] = None) -> str:
        """Queue one request and return its id; raises ``ValueError`` naming what is wrong with it.

        ``stop``: strings end the request when the text contains them (cut from ``text``), ints are stop token
        ids. ``chat`` wraps a text prompt in the tokenizer's chat template.
        """
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ValueError(f"request {rid}: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if adapter is not None:
            self.adapters.get(adapter)                    # ValueError naming the loaded adapters
        sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
        ids = self._tokenize(prompt, chat, rid)
        if not ids:
            raise ValueError(f"request {rid}: the prompt is empty; give at least one token")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"request {rid}: the prompt has {len(ids)} tokens; the model's context is "
                             f"{self.max_model_len}, so prompts may have at most {self.max_model_len - 1}")
        stops = [] if stop is None else [stop] if isinstance(stop, (str, int)) else list(stop)
        bad = [s for s in stops if not isinstance(s, (str, int)) or s == ""]
        if bad:
            raise ValueError(f"request {rid}: stop entries must be non-empty strings or token ids, got {bad[0]!r}")
        stop_ids = frozenset(s for s in stops if isinstance(s, int)) | (frozenset() if ignore_eos
                                                                          else self.eos_token_ids)
        req = Request(req_id=rid, prompt_token_ids=ids, max_new_tokens=max_new_tokens, adapter_id=adapter,
                      sampling=sampling, stop_token_ids=stop_ids)
        self.scheduler.add_request(req)
        self._tracked[rid] = _Tracked(req=req, submitted=self.clock(),
                                      stop_strings=tuple(s for s in stops if isinstance(s, str)))
        return rid

    def abort(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        t = self._tracked.get(request_id)
        if t is not None and t.finish_reason is None:
            t.finish_reason = "abort"

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[TokenEvent]:
        """One iteration: schedule, execute (inference and finetuning forward tokens in one flat batch, then
        the scheduled backward windows), update. Returns the tokens it produced."""
        if not self.has_work():
            return []
        t0 = self.clock()
        batch = self.scheduler.schedule()
        if batch.empty:
            if self.scheduler.has_unfinished_requests():
                raise RuntimeError("no request could be scheduled although some are unfinished "
                                   f"({self.scheduler.num_waiting} waiting, {self.scheduler.num_running} running)")
            return []
        ft = self.finetune_queue.sequences      # NOTE: lengths before the bookkeeping drops finished sequences
        lengths = {sid: ft[sid].length if sid in ft else 0 for sid in batch.finetune_backward}
        result, ft_done = self._run_batch(batch)
        updates = self.scheduler.update_from_output(batch, result)
        self.executor.synchronize()             # NOTE: backward windows queue device work no token waits on
        now = self.clock()
        self._record(batch, lengths, t0, now - t0, len(updates), ft_done)
        events = []
        for u in updates:
            t = self._tracked[u.req_id]
            t.token_times.append(now)
            status = u.status
            if not u.finished and t.stop_strings and self._hit_stop_string(t):
                self.scheduler.finish_request(u.req_id, RequestStatus.FINISHED_STOPPED)
                status = RequestStatus.FINISHED_STOPPED
            finished = status.finished
            if finished:
                t.finish_reason = status.value
                times = t.token_times
                self.recorder.request_finished(times[0] - t.submitted,
                                               (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0)
            events.append(TokenEvent(request_id=u.req_id, token_id=u.new_token_ids[-1], finished=finished,
                                     finish_reason=t.finish_reason))
        return events

    def _run_batch(self, batch: SchedulerOutput) -> tuple[ExecutorOutput, int]:
        """Execute a scheduled batch: its forward tokens, then its backward windows (what every tensor-parallel
        rank repeats). Returns the sampled tokens and the finetuning tokens whose sequence finished."""
        ft = self.finetune_queue.sequences
        result = self.executor.execute(batch, ft) if batch.seqs else ExecutorOutput(sampled_token_ids={})
        return result, self._finetune_after_forward(batch)

    def _finetune_after_forward(self, batch) -> int:
        """Free the KV of finetuning sequences whose forward completed, run the scheduled backward windows and
        hand their gradients to the jobs. Returns the finetuning tokens whose sequence finished."""
        q = self.finetune_queue
        for s in batch.seqs:
            if s.kind is SeqKind.FINETUNE and q.sequences[s.req_id].in_backward:
                self.kv.free(s.req_id)       # the backward reads the stored activations, not the cache
        done = 0
        for sid, k in batch.finetune_backward.items():
            fs, job = q.sequences[sid], q.job_of(sid)
            try:
                job.on_window(fs.backward_window(self.executor.runner, k))
            except Exception as e:           # NOTE: a failing job never takes inference down with it
                logger.exception("finetuning job %s failed in its backward", job.job_id)
                job.fail(f"{type(e).__name__}: {e}")
            if fs.done or job.finished:
                q.release(sid)
                done += fs.length if fs.done else 0
        return done

    def _record(self, batch, lengths: dict[str, int], t0: float, seconds: float, generated: int,
                ft_done: int) -> None:
        work = iteration_work(batch, len(self.executor.runner.layers), lengths)
        policy = self.scheduler.policy
        model = getattr(policy, "latency", None) or self.latency        # the model the policy plans with
        predicted = inference = profiled = None
        if model.profiled is not None:          # NOTE: predictions before this iteration refines the model
            predicted = model.predict(work)
            inference = model.predict(forward_work([s for s in batch.seqs if s.kind is not SeqKind.FINETUNE]))
            profiled = float(model.profiled @ work.features(model.num_layers))
        if seconds > 0 and (work.ft_backward_layer_tokens or batch.seqs):
            self.latency.observe(work, seconds)
            if getattr(policy, "latency", None) is self.latency and hasattr(policy, "observe"):
                policy.observe(work, seconds)       # NOTE: a policy with a model of its own (tests) stays fixed
        self.recorder.iteration(t0, seconds, decode_tokens=work.decode_tokens, prefill_tokens=work.prefill_tokens,
                                ft_forward_tokens=work.ft_forward_tokens,
                                ft_backward_layers=sum(batch.finetune_backward.values()),
                                generated_tokens=generated, ft_tokens_done=ft_done, predicted_s=predicted,
                                predicted_inference_s=inference, profiled_s=profiled)

    # ------------------------------------------------------------------ finetuning
    def fit_latency_model(self) -> LatencyModel:
        """Load the latency model from ``config.latency_profile`` if it was measured in this context and is sane,
        else profile it now (and save it there); see :func:`~flexc.runtime.profiling.load_or_profile`."""
        param = next(self.model.parameters())
        context = profile_context(self.compiled, dtype=param.dtype, device=param.device, backend=self.config.backend)
        load_or_profile(self.latency, self.config.latency_profile, context, flop_costs(self.compiled, param.device),
                        self._profile_latency)
        return self.latency

    def _profile_latency(self) -> list:
        """One start-up profile's samples (a tensor-parallel engine has every rank time the same grid)."""
        return profile_latency(self.executor, self.kv, self.vocab_size, self.max_model_len)

    def finetune(self, dataset: Any, *, adapter: str = "default", init_adapter: Optional[str] = None,
                 optimizer: str = "adamw", lr: float = 1e-4, steps: Optional[int] = None, epochs: int = 1,
                 grad_accum: int = 1, seed: int = 0, checkpoint_dir: Optional[str] = None,
                 **options: Any) -> FinetuneJob:
        """Queue a finetuning job of adapter ``adapter`` (created fresh, or from the PEFT directory
        ``init_adapter``) on ``dataset`` (a JSONL path or a list of ``TrainingSequence``); its tokens ride in the
        co-serving iterations. Extra ``options`` go to :class:`FinetuneConfig` (schedule, warmup_steps,
        weight_decay, shuffle, checkpoint_every, max_nonfinite, ...)."""
        if self.compiled.lora is None:
            raise ValueError("this engine was compiled without LoRA; pass max_lora_rank= or lora= to from_pretrained")
        cfg = FinetuneConfig(optimizer=optimizer, lr=lr, steps=steps, epochs=epochs, grad_accum=grad_accum, seed=seed,
                             checkpoint_dir=checkpoint_dir, **options)
        data = load_jsonl(dataset, self.tokenizer, self.max_model_len) if isinstance(dataset, str) else list(dataset)
        if adapter not in self.adapters:
            if init_adapter is not None:
                self.load_adapter(adapter, init_adapter)
            else:
                self.load_adapter(adapter, seed=seed)
        layouts = make_layouts(self.executor.runner)
        shards = self.executor.runner.shards
        weights = self.adapters.get(adapter).weights      # NOTE: the live tensors (views of its stack slot)
        # NOTE: trained in the adapter's own coordinates (its rank, targets, scaling): PEFT's optimizer steps
        job = OwnCoordinatesJob(f"job-{next(self._job_ids)}", data, self.adapters, adapter, cfg,
                                lambda s, scale, sid: FinetuneSequence(s, layouts, scale, sid, adapter=weights),
                                all_ranks=shards.all_true if shards is not None else None)
        self.finetune_queue.add(job)
        return job

    def cancel_finetune(self, job: FinetuneJob, reason: str = "cancelled") -> None:
        """Stop ``job`` now (failed with ``reason``): its sequence frees its KV blocks, the queue forgets it."""
        if not job.finished:
            job.fail(reason)
        for sid in self.finetune_queue.drop(job):
            self.kv.free(sid)

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (ValueError if unknown); its slot is free for the next one."""
        self.adapters.remove(name)

    def save_adapter(self, name: str, directory: str) -> None:
        """Write adapter ``name`` as PEFT does: its own rank, alpha, targets (``peft.PeftModel.from_pretrained``)."""
        if self.compiled.lora is None:
            raise ValueError("this engine was compiled without LoRA: there is no adapter to save")
        save_peft_adapter(directory, self.adapters.whole_own_weights(name), "default",
                          self.adapters.get(name).shape.to_peft())

    def has_work(self) -> bool:
        """Requests unfinished, or finetuning left that the policy will run."""
        if self.scheduler.has_unfinished_requests():
            return True
        return self.finetune_queue.has_work and not isinstance(self.scheduler.policy, InferenceOnlyPolicy)

    def run_until_idle(self) -> None:
        """Step until every request and every finetuning job (that the policy runs) has finished."""
        while self.has_work():
            self.step()

    def metrics(self, with_history: bool = True) -> EngineMetrics:
        """SLO attainment, TTFT/TPOT percentiles, inference and finetuning tokens/s, per-iteration history."""
        return self.recorder.summary(with_history)

    def _hit_stop_string(self, t: _Tracked) -> bool:
        if self.tokenizer is None:
            return False
        text = self.tokenizer.decode(t.req.output_token_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in t.stop_strings if s in text]
        if cuts:
            t.text_cut = min(cuts)
            return True
        return False

    def stream(self, request_id: str) -> Iterator[TokenEvent]:
        """Yield ``request_id``'s tokens as they are produced, stepping the engine (all requests advance)."""
        t = self._tracked.get(request_id)
        if t is None:
            raise ValueError(f"unknown request id {request_id!r}")
        sent = 0
        while True:
            out = t.req.output_token_ids
            while sent < len(out):
                last = sent == len(out) - 1 and t.finish_reason is not None
                yield TokenEvent(request_id=request_id, token_id=out[sent], finished=last,
                                 finish_reason=t.finish_reason if last else None)
                sent += 1
            if t.finish_reason is not None:
                return
            self.step()

    def result(self, request_id: str) -> GenerationResult:
        """The finished request's tokens, text and timings (drops its record)."""
        t = self._tracked.get(request_id)
        if t is None:
            raise ValueError(f"unknown request id {request_id!r}")
        if t.finish_reason is None:
            raise ValueError(f"request {request_id} has not finished")
        del self._tracked[request_id]
        toks = list(t.req.output_token_ids)
        text = ""
        if self.tokenizer is not None:
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            if t.text_cut is not None:
                text = text[:t.text_cut]
        times = t.token_times
        ttft = times[0] - t.submitted if times else 0.0
        tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
        return GenerationResult(request_id=request_id, prompt_token_ids=list(t.req.prompt_token_ids),
                                token_ids=toks, text=text, finish_reason=t.finish_reason, ttft=ttft, tpot=tpot,
                                adapter=t.req.adapter_id, num_preemptions=t.req.num_preemptions)

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], *, max_new_tokens: Union[int, Sequence[int]] = 16,
                 adapter: Union[None, str, Sequence[Optional[str]]] = None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None,
                 stop: Union[None, str, int, Sequence[Union[str, int]]] = None,
                 chat: bool = False, ignore_eos: bool = False) -> list[GenerationResult]:
        """Run ``prompts`` (one or a list) to completion, all batched together; results in prompt order.

        ``max_new_tokens`` and ``adapter`` may be per prompt (lists). A refused request gets a result with
        ``finish_reason='error'`` and ``error`` set; the others complete.
        """
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        n = len(plist)
        news = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
        ads = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(news) != n or len(ads) != n:
            raise ValueError(f"got {n} prompts but {len(news)} max_new_tokens and {len(ads)} adapters")
        ids: list[Optional[str]] = []
        errors: dict[int, str] = {}
        for i, (p, m, a) in enumerate(zip(plist, news, ads)):
            try:
                ids.append(self.submit(p, max_new_tokens=m, adapter=a, temperature=temperature, top_p=top_p,
                                       seed=None if seed is None else seed + i, stop=stop, chat=chat,
                                       ignore_eos=ignore_eos))
            except ValueError as e:
                ids.append(None)
                errors[i] = str(e)
        pending = {r for r in ids if r is not None}
        while any(self._tracked[r].finish_reason is None for r in pending):
            self.step()
        out = []
        for i, rid in enumerate(ids):
            if rid is None:
                out.append(GenerationResult(request_id=f"rejected-{i}", prompt_token_ids=[], token_ids=[], text="",
                                            finish_reason="error", ttft=0.0, tpot=0.0, adapter=ads[i],
                                            error=errors[i]))
            else:
                out.append(self.result(rid))
        return out
