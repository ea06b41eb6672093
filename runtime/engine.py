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

import itertools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

from torch import nn
from tqdm.auto import tqdm

from flexc.runtime.adapter_training import OwnCoordinatesJob
from flexc.runtime.adapters import AdapterRegistry
from flexc.runtime.batch import ExecutorOutput, SamplingParams, SchedulerOutput, SeqKind
from flexc.runtime.checkpoint import save_peft_adapter
from flexc.runtime.dataset import load_jsonl
from flexc.runtime.finetune import FinetuneConfig, FinetuneJob, FinetuneQueue
from flexc.runtime.latency import IterationWork, LatencyModel, forward_work, iteration_work
from flexc.runtime.latency_checks import flop_costs, profile_context
from flexc.runtime.policies import make_policy
from flexc.runtime.profiling import compile_serving_graphs, load_or_profile, profile_latency
from flexc.runtime.metrics import EngineMetrics, MetricsRecorder
from flexc.runtime.config import EngineConfig, resolve_device
from flexc.runtime.executor import Executor, make_kv_spec
from flexc.runtime.kv_cache import KVCacheManager, make_num_blocks
from flexc.runtime.regions import RegionRunner
from flexc.runtime.requests import GenerationResult, Prompt, RequestTracker, Stop, TokenEvent
from flexc.runtime.scheduler import RequestStatus, Scheduler, SchedulerConfig, SchedulingPolicy
from flexc.runtime.sequence import FinetuneSequence, make_layouts

if TYPE_CHECKING:
    from flexc.ir.artifact import CompiledModel

logger = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "GenerationResult", "TokenEvent", "resolve_device"]

class Engine:
    """Continuous-batching inference over a compiled model with many resident LoRA adapters."""

    profile_lazily = True
    """Whether a default-chosen co-serving policy profiles its latency model at the first ``finetune()`` (a
    tensor-parallel engine profiles at start-up: every rank must time the same batches together)."""
    stall_limit = 64
    """Iterations in a row without any scheduled work (while work is left) before :meth:`step` gives up."""

    def __init__(self, compiled: "CompiledModel", model: nn.Module, *, tokenizer: Any = None,
                 config: Optional[EngineConfig] = None, policy: Union[None, str, SchedulingPolicy] = None,
                 runner: Optional["RegionRunner"] = None):
        """``policy``: a scheduling policy or its name (``coserve``, ``temporal``, ``inference_only``,
        ``finetune_only``; default ``coserve`` with LoRA, decode-first inference without); ``runner`` runs the regions (default: the whole ``model`` in this process; a
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
        chosen = policy is not None
        if policy is None and compiled.lora is not None:
            policy = "coserve"
        self._init_loop(KVCacheManager(num_blocks, kv_spec.block_size),
                        LatencyModel(len(compiled.graph.layer_regions)), policy)
        # NOTE: a compiled backend compiles here, not at the first request (whose TTFT it would take)
        compile_serving_graphs(self.executor, self.kv, self.vocab_size)
        # NOTE: a co-serving policy picked by default profiles at the first finetune(): serving alone starts fast
        if self._needs_latency_fit() and (chosen or not self.profile_lazily):
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
        self.requests = RequestTracker(tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                                       max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
                                       clock=self.clock)
        self._stalled = 0
        self._latency_fitted = False
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
    def submit(self, prompt: Prompt, *, max_new_tokens: int = 16, adapter: Optional[str] = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: Optional[int] = None,
               stop: Stop = None, chat: bool = False, ignore_eos: bool = False,
               request_id: Optional[str] = None) -> str:
        """Queue one request and return its id; raises ``ValueError`` naming what is wrong with it.

        ``stop``: strings end the request when the text contains them (cut from ``text``), ints are stop token
        ids. ``chat`` wraps a text prompt in the tokenizer's chat template.
        """
        if adapter is not None:
            self.adapters.get(adapter)                    # ValueError naming the loaded adapters
        req, stop_strings = self.requests.new_request(
            prompt, max_new_tokens=max_new_tokens, adapter=adapter, stop=stop, chat=chat, ignore_eos=ignore_eos,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, seed=seed), request_id=request_id)
        self.scheduler.add_request(req)
        self.requests.track(req, stop_strings)
        rid = req.req_id
        return rid

    def abort(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        if request_id in self.requests:
            t = self.requests.get(request_id)
            if t.finish_reason is None:
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
            self._stalled += 1
            if self._stalled >= self.stall_limit:
                raise RuntimeError(self._stall_message())
            return []
        self._stalled = 0
        # NOTE: before it runs: the bookkeeping drops finished sequences, and a first window runs the loss head
        work = iteration_work(batch, len(self.executor.runner.layers), self.finetune_queue.sequences)
        result, ft_done = self._run_batch(batch)
        updates = self.scheduler.update_from_output(batch, result)
        self.executor.synchronize()             # NOTE: backward windows queue device work no token waits on
        now = self.clock()
        self._record(batch, work, t0, now - t0, len(updates), ft_done)
        events = []
        for u in updates:
            t = self.requests.get(u.req_id)
            t.token_times.append(now)
            status = u.status
            if not u.finished and self.requests.hit_stop_string(t):
                self.scheduler.finish_request(u.req_id, RequestStatus.FINISHED_STOPPED)
                status = RequestStatus.FINISHED_STOPPED
            finished = status.finished
            if finished:
                t.finish_reason = status.value
                self.recorder.request_finished(t.ttft, t.tpot)
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

    def _record(self, batch, work: IterationWork, t0: float, seconds: float, generated: int, ft_done: int) -> None:
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
    def _needs_latency_fit(self) -> bool:
        """Whether the policy plans with this engine's latency model (and there is LoRA to finetune)."""
        return getattr(self.scheduler.policy, "latency", None) is self.latency and self.compiled.lora is not None

    def fit_latency_model(self) -> LatencyModel:
        """Load the latency model from ``config.latency_profile`` if it was measured in this context and is sane,
        else profile it now (and save it there); see :func:`~flexc.runtime.profiling.load_or_profile`."""
        self._latency_fitted = True
        param = next(self.model.parameters())
        context = profile_context(self.compiled, dtype=param.dtype, device=param.device, backend=self.config.backend)
        load_or_profile(self.latency, self.config.latency_profile, context, flop_costs(self.compiled, param.device),
                        self._profile_latency)
        return self.latency

    def _profile_latency(self) -> list:
        """One start-up profile's samples (a tensor-parallel engine has every rank time the same grid)."""
        return profile_latency(self.executor, self.kv, self.vocab_size, self.max_model_len,
                               new_job=lambda adapter, data: self._new_job("__profile_job", data, adapter,
                                                                            FinetuneConfig()))

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
        if not _runs_finetuning(self.scheduler.policy):
            raise ValueError(f"the scheduling policy {_policy_name(self.scheduler.policy)!r} never runs finetuning; "
                             "build the engine with policy='coserve', 'temporal' or 'finetune_only'")
        cfg = FinetuneConfig(optimizer=optimizer, lr=lr, steps=steps, epochs=epochs, grad_accum=grad_accum, seed=seed,
                             checkpoint_dir=checkpoint_dir, **options)
        data = load_jsonl(dataset, self.tokenizer, self.max_model_len) if isinstance(dataset, str) else list(dataset)
        if self._needs_latency_fit() and not self._latency_fitted:     # NOTE: after the data checks: it takes seconds
            self.fit_latency_model()
        if adapter not in self.adapters:
            if init_adapter is not None:
                self.load_adapter(adapter, init_adapter)
            else:
                self.load_adapter(adapter, seed=seed)
        job = self._new_job(f"job-{next(self._job_ids)}", data, adapter, cfg)
        self.finetune_queue.add(job)
        return job

    def _new_job(self, job_id: str, data: list, adapter: str, cfg: FinetuneConfig) -> OwnCoordinatesJob:
        """A job training resident adapter ``adapter`` on ``data`` (not queued)."""
        layouts = make_layouts(self.executor.runner)
        shards = self.executor.runner.shards
        weights = self.adapters.get(adapter).weights      # NOTE: the live tensors (views of its stack slot)
        # NOTE: trained in the adapter's own coordinates (its rank, targets, scaling): PEFT's optimizer steps
        return OwnCoordinatesJob(job_id, data, self.adapters, adapter, cfg,
                                 lambda s, scale, sid: FinetuneSequence(s, layouts, scale, sid, adapter=weights),
                                 all_ranks=shards.all_true if shards is not None else None)

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
        return self.finetune_queue.has_work and _runs_finetuning(self.scheduler.policy)

    def _stall_message(self) -> str:
        sched, pol = self.scheduler, _policy_name(self.scheduler.policy)
        stuck = []
        if sched.has_unfinished_requests():
            stuck.append(f"{sched.num_waiting} requests waiting and {sched.num_running} running "
                         f"({self.kv.num_free_blocks} free KV blocks)")
        act = self.finetune_queue.active()
        if act is not None:
            job, fs = act
            stuck.append(f"finetuning job {job.job_id} (adapter {job.adapter_name!r}, step {job.step} of "
                         f"{job.total_steps}, sequence {fs.seq_id} at token {fs.forward_pos} of {fs.length})")
        return (f"no progress in {self._stalled} iterations: the scheduling policy {pol!r} scheduled nothing for "
                f"{' and '.join(stuck) or 'the work left'}")

    def run_until_idle(self, *, progress: Optional[bool] = None) -> None:
        """Step until every request and every finetuning job (that the policy runs) has finished.

        ``progress``: a progress bar on stderr (requests finished and optimizer steps taken, with the loss);
        default: shown when stderr is a terminal and the call takes more than two seconds."""
        jobs = [j for j in self.finetune_queue.jobs if not j.finished] if _runs_finetuning(self.scheduler.policy) \
            else []
        reqs = self.scheduler.num_waiting + self.scheduler.num_running
        total = reqs + sum(j.total_steps - j.step for j in jobs)
        with tqdm(total=total, disable=None if progress is None else not progress, delay=0 if progress else 2,
                  unit="step" if jobs else "req", desc="co-serving" if jobs and reqs else
                  "finetuning" if jobs else "serving", leave=bool(progress)) as bar:
            steps = sum(j.step for j in jobs)
            while self.has_work():
                finished = sum(1 for ev in self.step() if ev.finished)
                now = sum(j.step for j in jobs)
                losses = [j.loss_history[-1] for j in jobs if j.loss_history]
                if losses:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update(finished + now - steps)
                steps = now

    def metrics(self, with_history: bool = True) -> EngineMetrics:
        """SLO attainment, TTFT/TPOT percentiles, inference and finetuning tokens/s, per-iteration history."""
        return self.recorder.summary(with_history)

    def stream(self, request_id: str) -> Iterator[TokenEvent]:
        """Yield ``request_id``'s tokens as they are produced, stepping the engine (all requests advance)."""
        t = self.requests.get(request_id)
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

    def result(self, request_id: str, *, release: bool = False) -> GenerationResult:
        """The finished request's tokens, text and timings; readable any number of times until released
        (``release=True`` or :meth:`release`)."""
        res = self.requests.result(request_id)
        if release:
            self.requests.release(request_id)
        return res

    def release(self, request_id: str) -> None:
        """Forget a request's record (aborting it first if it is still running)."""
        if request_id in self.requests and self.requests.get(request_id).finish_reason is None:
            self.abort(request_id)
        self.requests.release(request_id)

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]], *, max_new_tokens: Union[int, Sequence[int]] = 16,
                 adapter: Union[None, str, Sequence[Optional[str]]] = None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: Optional[int] = None, stop: Stop = None, chat: bool = False,
                 ignore_eos: bool = False) -> list[GenerationResult]:
        """Run ``prompts`` (one or a list) to completion, all batched together; results in prompt order.

        ``max_new_tokens`` and ``adapter`` may be per prompt (lists). An invalid request raises ``ValueError`` as
        :meth:`submit` does (``prompt i: ...``), before any runs.
        """
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                              and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        n = len(plist)
        news = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * n
        ads = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(news) != n or len(ads) != n:
            raise ValueError(f"got {n} prompts but {len(news)} max_new_tokens and {len(ads)} adapters")
        ids: list[str] = []
        try:
            for i, (p, m, a) in enumerate(zip(plist, news, ads)):
                try:
                    ids.append(self.submit(p, max_new_tokens=m, adapter=a, temperature=temperature, top_p=top_p,
                                           seed=None if seed is None else seed + i, stop=stop, chat=chat,
                                           ignore_eos=ignore_eos))
                except ValueError as e:
                    raise ValueError(f"prompt {i}: {e}" if n > 1 else str(e)) from None
            while self.requests.unfinished(ids):
                self.step()
            return [self.result(rid) for rid in ids]
        finally:
            for rid in ids:
                self.release(rid)


def _runs_finetuning(policy: Any) -> bool:
    """Whether a scheduling policy ever schedules finetuning work (policies say so with ``runs_finetuning``)."""
    return getattr(policy, "runs_finetuning", True)


def _policy_name(policy: Any) -> str:
    return getattr(policy, "name", type(policy).__name__)
