"""Runs one flat batch through the compiled region graphs with the paged KV cache.

For a :class:`~flexc.runtime.batch.SchedulerOutput` the executor builds the
flat batch (token ids, positions, ``cu_seqlens``), the paged-attention context
(block tables, context lengths, slot of every new token) and runs the embed
region, every decoder layer through the template the compiler assigned it
(``compiled.graph.layer_regions``) with that layer's weights, and finally the
logits region only for the tokens that sample.

Multi-LoRA: one batch may mix requests for different adapters and for none.
All inference sequences (prefill and decode) run together: each layer's
inference graph is called ONCE per iteration for them. That graph is a copy of
the layer template in which every LoRA branch is one ``flexc::lora`` call
(:mod:`flexc.passes.multi_lora`) reading the registry's stacked adapter tensors
(:class:`~flexc.runtime.adapters.AdapterRegistry`); the sequences are sorted by
adapter slot so that each adapter's tokens form one segment (``seg_starts``,
``seg_adapter``, built once per iteration; -1 = no adapter). The sampled rows
are kept paired with their sequences, so the order does not leak out.

Finetuning chunks (``SeqKind.FINETUNE``) still run apart, one call per layer
per finetuning adapter: they need the full forward graph, which returns the
values the backward reads, with that adapter's live tensors bound (the views
of its stack slot). Attention only mixes tokens of one sequence, so running
them apart gives exactly the result of running them with the rest.

What it reads from the compiled artifact: the region graphs and their calling
conventions (``RegionProgram``), which template each layer uses, the model
shape (``graph.model``); it re-derives nothing. For inference it runs a copy of
each forward graph that returns only the region outputs (no saved values),
calls ``flexc::lora``'s body directly (:func:`~flexc.kernels.lora.lora_forward`:
no op wrapper under ``no_grad``) and, with ``attention="batched"``, calls
:func:`~flexc.runtime.paged_attention.paged_attention_batched` where the graph
calls ``flexc::attention`` (same contract, one batched call for all decode
tokens on the CPU).

Invariant (tests/runtime/test_engine.py, test_executor.py): greedy tokens equal
transformers ``generate(do_sample=False)`` (and PEFT's model for each adapter);
a batch mixing adapters gives each request PEFT's logits for its adapter.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
import torch.fx as fx
from torch import nn

from flexc.kernels.attention import paged_context
from flexc.kernels.lora import lora_forward, make_segments
from flexc.passes.multi_lora import (A_STACK, B_STACK, SCALING, SEG_ADAPTER, SEG_STARTS, MultiLoraReport,
                                     rewrite_multi_lora)
from flexc.runtime.batch import ExecutorOutput, ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.kv_cache import KVCacheSpec
from flexc.runtime.paged_attention import BatchedPagedContext, make_decode_groups, paged_attention_batched
from flexc.runtime.regions import RegionRunner

if TYPE_CHECKING:
    from flexc.ir.artifact import CompiledModel
    from flexc.ir.vocab import InputRef
    from flexc.ir.program import RegionProgram
    from flexc.runtime.adapters import AdapterRegistry
    from flexc.runtime.sequence import FinetuneSequence

logger = logging.getLogger(__name__)

__all__ = ["Executor", "make_kv_spec", "ATTENTION_MODES"]

ATTENTION_MODES = ("auto", "batched", "op")
"""``batched``: the CPU fast path (one batched call for all decode tokens); ``op``: ``flexc::attention`` as
captured (Triton on CUDA); ``auto``: ``batched`` on the CPU, ``op`` elsewhere."""
_CALL_INPUTS = (0, 1, 2, 3, SEG_STARTS, SEG_ADAPTER)
"""What each layer call fills in: user inputs 0-3 (h, cos, sin, cu_seqlens) and the multi-LoRA segments."""


def make_kv_spec(compiled: "CompiledModel", dtype: torch.dtype, block_size: int = 16,
                 num_kv_heads: Optional[int] = None) -> KVCacheSpec:
    """The paged cache shape of a compiled model (from the artifact's model summary); ``num_kv_heads``: the
    heads one rank holds at tp > 1 (``TPRegionRunner.num_kv_heads``), default all."""
    m = compiled.graph.model
    return KVCacheSpec(num_layers=m["num_layers"], num_kv_heads=num_kv_heads or m["num_kv_heads"],
                       head_dim=m["head_dim"], dtype=dtype, block_size=block_size)


@dataclasses.dataclass(frozen=True)
class _InferenceGraph:
    """A layer template's inference graph: the callable, what each placeholder is bound to, the LoRA rewrite."""

    forward: Callable[..., Any]
    inputs: list[InputRef]
    """``meta['flexc_ref']`` of every placeholder, in order (param/buffer/user and the multi-LoRA kinds)."""
    lora: MultiLoraReport


def _inference_graph(program: "RegionProgram", batched_attention: bool) -> _InferenceGraph:
    """A copy of the region's forward graph that returns only the region outputs (nothing saved for a
    backward), with every LoRA branch replaced by one ``flexc::lora`` call
    (:func:`~flexc.passes.multi_lora.rewrite_multi_lora`), that op called as :func:`lora_forward`, and
    ``flexc::attention`` calls pointed at the batched path if asked."""
    fw = program.fw
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in fw.graph.nodes:
        if n.op == "output":
            outs = n.args[0]
            g.output(tuple(env[outs[i]] for i in program.user_idx))
        else:
            env[n] = g.node_copy(n, lambda x: env[x])
    g.eliminate_dead_code()
    report = rewrite_multi_lora(g)       # NOTE: after the dead code is gone: the branches' saved values were users
    # inference runs under no_grad: flexc::lora's body is called without the op's wrapper (see lora_forward)
    direct = {torch.ops.flexc.lora.default: lora_forward}
    if batched_attention:
        direct[torch.ops.flexc.attention.default] = paged_attention_batched
    for n in g.nodes:
        if n.op == "call_function" and n.target in direct:
            n.target = direct[n.target]
    inputs = [p.meta["flexc_ref"] for p in g.find_nodes(op="placeholder")]
    return _InferenceGraph(forward=fx.GraphModule(fw, g).forward, inputs=inputs, lora=report)


class _FlatBatch:
    """Tensors of the sequences run together: ids/positions [T], cu_seqlens int32 [N+1], the paged context and
    the rows (token indices) whose logits are sampled."""

    def __init__(self, seqs: list[ScheduledSequence], block_size: int, k_caches, v_caches, batched: bool,
                 device: torch.device):
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        cu = [0]
        rows: list[int] = []
        for s in seqs:
            n = len(s.token_ids)
            start = s.num_computed_tokens
            ids.extend(s.token_ids)
            pos.extend(range(start, start + n))
            bids = s.block_ids
            slots.extend(bids[p // block_size] * block_size + p % block_size for p in range(start, start + n))
            cu.append(cu[-1] + n)
            if s.sample:
                rows.append(cu[-1] - 1)
        width = max(len(s.block_ids) for s in seqs)
        bt = torch.full((len(seqs), width), -1, dtype=torch.int32)
        for i, s in enumerate(seqs):
            bt[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
        ctx_lens = torch.tensor([s.num_computed_tokens for s in seqs], dtype=torch.int32)
        self.cu_list = cu
        """Sequence bounds in the flat batch, on the host."""
        self.lens = torch.tensor([len(s.token_ids) for s in seqs])
        """Tokens per sequence, on the host."""
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.pos = torch.tensor(pos, dtype=torch.long, device=device)
        self.cu = torch.tensor(cu, dtype=torch.int32, device=device)
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.sample_seqs = [s for s in seqs if s.sample]
        self.ctx = BatchedPagedContext(k_caches=k_caches, v_caches=v_caches, block_tables=bt.to(device),
                                       context_lens=ctx_lens.to(device),
                                       slot_mapping=torch.tensor(slots, dtype=torch.long, device=device))
        if batched:                     # NOTE: the batched path runs on the CPU only (checked by the executor)
            self._plan(seqs, block_size)

    def _plan(self, seqs: list[ScheduledSequence], block_size: int) -> None:
        ctx = self.ctx
        dec = [i for i, s in enumerate(seqs) if len(s.token_ids) == 1]
        if not dec:
            ctx.prefill_block_tables, ctx.prefill_context_lens = ctx.block_tables, ctx.context_lens
            ctx.prefill_cu_seqlens = self.cu
            return
        di = torch.tensor(dec, dtype=torch.long)
        ctx.decode_groups = make_decode_groups(self.cu[:-1].long()[di], ctx.block_tables[di], ctx.context_lens[di])
        ctx.all_decode = len(dec) == len(seqs) and len(ctx.decode_groups) == 1
        pre = [i for i, s in enumerate(seqs) if len(s.token_ids) > 1]
        if pre:
            pi = torch.tensor(pre, dtype=torch.long)
            lens = [len(seqs[i].token_ids) for i in pre]
            ctx.prefill_idx = torch.cat([torch.arange(int(self.cu[i]), int(self.cu[i + 1])) for i in pre])
            ctx.prefill_block_tables = ctx.block_tables[pi]
            ctx.prefill_context_lens = ctx.context_lens[pi]
            ctx.prefill_cu_seqlens = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()),
                                                  dtype=torch.int32)


class Executor:
    """Owns the KV cache tensors and runs scheduled batches through the compiled regions.

    ``model`` is the (PEFT-wrapped) model with real weights whose structure the compiled artifact describes;
    ``adapters`` the resident adapters (None: a base-model engine); ``runner`` runs the regions (default a
    :class:`RegionRunner` of ``model``; on a tensor-parallel rank a ``TPRegionRunner``, whose sharded graphs
    attend over the rank's KV heads: ``kv_spec`` must hold those).
    """

    def __init__(self, compiled: "CompiledModel", model: nn.Module, *, kv_spec: KVCacheSpec, num_blocks: int,
                 adapters: Optional["AdapterRegistry"] = None, attention: str = "batched",
                 runner: Optional[RegionRunner] = None):
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.compiled = compiled
        self.runner = runner if runner is not None else RegionRunner(compiled, model)
        self.device = next(model.parameters()).device
        """Where the weights, the KV cache and every batch tensor live (the model's device)."""
        if attention == "auto":
            attention = "batched" if self.device.type == "cpu" else "op"
        if attention == "batched" and self.device.type != "cpu":
            raise ValueError(f"attention='batched' is the CPU path; the model is on {self.device}: use 'op' or "
                             "'auto'")
        if kv_spec.num_kv_heads != self.runner.num_kv_heads:
            raise ValueError(f"kv_spec holds {kv_spec.num_kv_heads} KV heads, the runner attends over "
                             f"{self.runner.num_kv_heads}")
        self.adapters = adapters
        self.kv_spec = kv_spec
        self.num_blocks = num_blocks
        shape = (num_blocks, kv_spec.block_size, kv_spec.num_kv_heads, kv_spec.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=kv_spec.dtype, device=self.device)
                         for _ in range(kv_spec.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=kv_spec.dtype, device=self.device)
                         for _ in range(kv_spec.num_layers)]
        self.batched = attention == "batched"
        # NOTE: one inference graph per template; layers sharing a template share the callable
        self._graphs = {name: _inference_graph(self.runner.programs[name], self.batched)
                        for name in set(compiled.graph.layer_regions)}
        self._layer_forward = [self._graphs[name].forward for name in compiled.graph.layer_regions]
        self._has_lora = any(g.lora.modified for g in self._graphs.values())
        self._vals, self._input_pos = self._bind_layers()
        self._generators: dict[str, torch.Generator] = {}

    # ------------------------------------------------------------------ weights
    def _bind_layers(self) -> tuple[list[list[Any]], list[list[Optional[int]]]]:
        """Per layer: the inference graph's placeholder values (weights, adapter stacks, scalings; None where
        :data:`_CALL_INPUTS` go) and the positions of those call inputs. The stacks never move (the registry
        updates them in place), so this is done once."""
        num_slots = self.adapters.max_adapters if self.adapters is not None else 0
        scalings: dict[float, torch.Tensor] = {}          # one fp32 [num_slots] tensor per distinct value
        vals, positions = [], []
        for i, name in enumerate(self.compiled.graph.layer_regions):
            module, prefix, graph = self.runner.layer_modules[i], self.runner.layer_prefix(i), self._graphs[name]
            v: list[Any] = []
            pos: list[Optional[int]] = [None] * len(_CALL_INPUTS)
            for j, r in enumerate(graph.inputs):
                if r.kind == "param":
                    v.append(module.get_parameter(r.target))
                elif r.kind == "buffer":
                    v.append(module.get_buffer(r.target))
                elif r.kind in (A_STACK, B_STACK):
                    v.append(self._stack(module, f"{prefix}.{r.target.removeprefix('layer.')}", r.target))
                elif r.kind == SCALING:
                    # NOTE: the same for every slot: the registry folds each adapter's own scaling into lora_B
                    value = graph.lora.scaling[r.target]
                    if value not in scalings:
                        scalings[value] = torch.full((num_slots,), value, dtype=torch.float32, device=self.device)
                    v.append(scalings[value])
                else:
                    pos[_CALL_INPUTS.index(r.index if r.kind == "user" else r.kind)] = j
                    v.append(None)
            vals.append(v)
            positions.append(pos)
        return vals, positions

    def _stack(self, module: nn.Module, name: str, target: str) -> torch.Tensor:
        """The stacked adapters of LoRA parameter ``name`` (empty without a registry: no adapter can be asked)."""
        if self.adapters is not None:
            return self.adapters.stack(name)
        p = module.get_parameter(target)
        return p.new_zeros((0, *p.shape))

    def _slot(self, adapter_id: Optional[str]) -> int:
        """Stack index of a request's adapter; -1 for none. ValueError naming the adapter if it cannot run."""
        if adapter_id is None:
            return -1
        if not self._has_lora:
            raise ValueError(f"adapter {adapter_id!r} requested but the engine was compiled without LoRA")
        if self.adapters is None:
            raise ValueError(f"adapter {adapter_id!r} requested but this executor has no adapter registry")
        return self.adapters.slot(adapter_id)

    def _overrides(self, i: int, adapter_id: Optional[str]) -> Optional[dict[str, torch.Tensor]]:
        """The finetuning path's binding: adapter ``adapter_id``'s live tensors for the full forward graph."""
        if not self._has_lora:
            return None
        prog = self.runner.layer_program(i)
        prefix = self.runner.layer_prefix(i)
        ov = {}
        weights = self.adapters.get(adapter_id).weights if adapter_id is not None else None
        for r in prog.fw_inputs:
            if r.kind != "param" or (".lora_A." not in r.target and ".lora_B." not in r.target):
                continue
            full = f"{prefix}.{r.target.removeprefix('layer.')}"
            if weights is not None:
                ov[r.target] = weights[full]
            elif ".lora_B." in r.target:
                p = self.runner.layer_modules[i].get_parameter(r.target)
                ov[r.target] = torch.zeros_like(p)      # no adapter: B = 0 makes the LoRA branch add exactly 0
        return ov

    def synchronize(self) -> None:
        """Wait for the device's queued work (for timing an iteration; nothing to do on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ one iteration
    @torch.no_grad()
    def execute(self, batch: SchedulerOutput,
                finetune: Optional[Mapping[str, "FinetuneSequence"]] = None) -> ExecutorOutput:
        """Run the scheduled tokens; sample the next token of every sequence with ``sample=True``.

        ``finetune`` maps the id of every FINETUNE sequence in the batch to its state, which receives the
        chunk's rows of each layer's saved values and of the final hidden states.
        """
        for rid in batch.finished_req_ids:
            self._generators.pop(rid, None)
        if not batch.seqs:
            return ExecutorOutput(sampled_token_ids={})
        inference: list[ScheduledSequence] = []
        finetuning: dict[Optional[str], list[ScheduledSequence]] = {}
        for s in batch.seqs:
            if s.kind is not SeqKind.FINETUNE:
                inference.append(s)
            elif finetune is None or s.req_id not in finetune:
                raise ValueError(f"finetuning sequence {s.req_id}: no finetuning state was given for it")
            else:
                finetuning.setdefault(s.adapter_id, []).append(s)
        hs, sample_seqs = [], []
        for adapter_id, seqs in finetuning.items():
            fb = _FlatBatch(seqs, self.kv_spec.block_size, self.k_caches, self.v_caches, self.batched, self.device)
            h = self._run_layers_saving(fb, adapter_id, seqs, finetune)
            if len(fb.rows):
                hs.append(h.index_select(0, fb.rows))
                sample_seqs.extend(fb.sample_seqs)
        if inference:
            # NOTE: sorted by slot, so each adapter's tokens form one segment of the flexc::lora calls
            slots = {s.req_id: self._slot(s.adapter_id) for s in inference}
            seqs = sorted(inference, key=lambda s: slots[s.req_id])
            fb = _FlatBatch(seqs, self.kv_spec.block_size, self.k_caches, self.v_caches, self.batched, self.device)
            h = self._run_layers(fb, [slots[s.req_id] for s in seqs])
            if len(fb.rows):
                hs.append(h.index_select(0, fb.rows))
                sample_seqs.extend(fb.sample_seqs)
        tokens: dict[str, int] = {}
        if sample_seqs:
            logits = self.runner.logits(torch.cat(hs) if len(hs) > 1 else hs[0])      # [S, V] fp32
            tokens = dict(zip((s.req_id for s in sample_seqs), self._sample(logits, sample_seqs)))
        return ExecutorOutput(sampled_token_ids=tokens, num_tokens=batch.total_num_scheduled_tokens)

    def _run_layers(self, fb: _FlatBatch, slots: list[int]) -> torch.Tensor:
        """All inference sequences through each layer's inference graph once; ``slots``: adapter slot per
        sequence of ``fb`` (-1: none)."""
        seg_starts, seg_adapter = make_segments(torch.repeat_interleave(torch.tensor(slots), fb.lens))
        seg_starts, seg_adapter = seg_starts.to(self.device), seg_adapter.to(self.device)
        ctx = fb.ctx
        with paged_context(ctx):
            h, cos, sin = self.runner.embed_forward(fb.ids, fb.pos)
            for i, fwd in enumerate(self._layer_forward):
                ctx.layer = i                       # NOTE: the attention op reads the layer's cache from here
                v = self._vals[i]
                for j, x in zip(self._input_pos[i], (h, cos, sin, fb.cu, seg_starts, seg_adapter)):
                    if j is not None:
                        v[j] = x
                (h,) = fwd(*v)
            for v, pos in zip(self._vals, self._input_pos):     # do not keep the batch's activations alive
                for j in pos:
                    if j is not None:
                        v[j] = None
        return h

    def _run_layers_saving(self, fb: _FlatBatch, adapter_id: Optional[str], seqs: list[ScheduledSequence],
                           finetune: Mapping[str, "FinetuneSequence"]) -> torch.Tensor:
        """Run a group holding finetuning chunks through the full forward graphs (which return the values the
        backward needs) and hand each finetuning sequence its rows."""
        runner = self.runner
        rows = {}
        for j, s in enumerate(seqs):
            if s.kind is SeqKind.FINETUNE:
                rows[s.req_id] = ((fb.cu_list[j], fb.cu_list[j + 1]), s.num_computed_tokens)
        ctx = fb.ctx
        with paged_context(ctx):
            h, cos, sin = runner.embed_forward(fb.ids, fb.pos)
            for i in range(len(runner.layers)):
                ctx.layer = i
                (h,), saved = runner.layer_program(i).forward(runner.layer_modules[i], (h, cos, sin, fb.cu),
                                                              self._overrides(i, adapter_id))
                for sid, (r, start) in rows.items():
                    finetune[sid].record_layer(i, saved, r, start)
                del saved
        for sid, (r, start) in rows.items():
            finetune[sid].record_output(h, r, start)
        return h

    # ------------------------------------------------------------------ sampling
    def _sample(self, logits: torch.Tensor, seqs: list[ScheduledSequence]) -> list[int]:
        # logits: [S, V] fp32, one row per sequence in seqs
        if all(s.sampling.greedy for s in seqs):
            return logits.argmax(-1).tolist()
        out = []
        for row, s in zip(logits, seqs):
            sp = s.sampling
            if sp.greedy:
                out.append(int(row.argmax()))
                continue
            gen = self._generators.get(s.req_id)
            if gen is None:
                gen = torch.Generator()
                gen.manual_seed(sp.seed if sp.seed is not None else int(torch.randint(0, 2**62, ()).item()))
                self._generators[s.req_id] = gen
            probs = torch.softmax(row.cpu() / sp.temperature, dim=-1)     # the generator is a host one
            if sp.top_p < 1.0:
                sp_probs, idx = probs.sort(descending=True)
                keep = sp_probs.cumsum(0) - sp_probs < sp.top_p          # always keeps the top token
                probs = torch.zeros_like(probs).scatter_(0, idx[keep], sp_probs[keep])
            out.append(int(torch.multinomial(probs, 1, generator=gen)))
        return out
