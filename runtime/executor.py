"""Runs one flat batch through the compiled region graphs with the paged KV cache.

For a :class:`~flexc.runtime.batch.SchedulerOutput` the executor builds the
flat batch (token ids, positions, ``cu_seqlens``), the paged-attention context
(block tables, context lengths, slot of every new token) and runs, per adapter
group, the embed region, every decoder layer through the template the compiler
assigned it (``compiled.graph.layer_regions``) with that layer's weights, and
finally the logits region only for the tokens that sample.

Multi-LoRA: one batch may mix requests for different adapters and for none.
The captured layer template has the LoRA matmuls with ``lora_A``/``lora_B`` as
graph parameters, so this first version runs the template once per adapter
group of the flat batch, binding that adapter's tensors (zero ``lora_B`` for
"no adapter", which is exact). Attention only mixes tokens of one sequence, so
splitting the batch by adapter gives exactly the unsplit result. The follow-up
is the one-launch multi-LoRA op (``flexc::lora`` in ``kernels/lora.py``), which
selects the adapter per token inside a single template call.

What it reads from the compiled artifact: the region graphs and their calling
conventions (``RegionProgram``), which template each layer uses, the model
shape (``graph.model``); it re-derives nothing. For inference it runs a copy of
each forward graph that returns only the region outputs (no saved values) and,
with ``attention="batched"``, calls
:func:`~flexc.runtime.paged_attention.paged_attention_batched` where the graph
calls ``flexc::attention`` (same contract, one batched call for all decode
tokens on the CPU).

Invariant (tests/runtime/test_engine.py): greedy tokens equal transformers
``generate(do_sample=False)`` (and PEFT's model for each adapter).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
import torch.fx as fx
from torch import nn

from flexc.kernels.attention import paged_context
from flexc.runtime.batch import ExecutorOutput, ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.kv_cache import KVCacheSpec
from flexc.runtime.paged_attention import BatchedPagedContext, make_decode_groups, paged_attention_batched
from flexc.runtime.regions import RegionRunner

if TYPE_CHECKING:
    from flexc.compiler import CompiledModel
    from flexc.ir.program import RegionProgram
    from flexc.runtime.adapters import AdapterRegistry
    from flexc.runtime.sequence import FinetuneSequence

logger = logging.getLogger(__name__)

__all__ = ["Executor", "make_kv_spec", "ATTENTION_MODES"]

ATTENTION_MODES = ("batched", "op")
_LAYER_USER_INPUTS = 4   # (h, cos, sin, cu_seqlens)


def make_kv_spec(compiled: "CompiledModel", dtype: torch.dtype, block_size: int = 16,
                 num_kv_heads: Optional[int] = None) -> KVCacheSpec:
    """The paged cache shape of a compiled model (from the artifact's model summary); ``num_kv_heads``: the
    heads one rank holds at tp > 1 (``TPRegionRunner.num_kv_heads``), default all."""
    m = compiled.graph.model
    return KVCacheSpec(num_layers=m["num_layers"], num_kv_heads=num_kv_heads or m["num_kv_heads"],
                       head_dim=m["head_dim"], dtype=dtype, block_size=block_size)


def _inference_forward(program: "RegionProgram", batched_attention: bool) -> Callable[..., Any]:
    """A copy of the region's forward graph that returns only the region outputs (nothing saved for a
    backward), with ``flexc::attention`` calls pointed at the batched path if asked."""
    fw = program.fw
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in fw.graph.nodes:
        if n.op == "output":
            outs = n.args[0]
            g.output(tuple(env[outs[i]] for i in program.user_idx))
        else:
            env[n] = g.node_copy(n, lambda x: env[x])
    if batched_attention:
        for n in g.nodes:
            if n.op == "call_function" and n.target is torch.ops.flexc.attention.default:
                n.target = paged_attention_batched
    g.eliminate_dead_code()
    return fx.GraphModule(fw, g).forward


class _FlatBatch:
    """Tensors of one adapter group: ids/positions [T], cu_seqlens int32 [N+1], the paged context and the rows
    (token indices) whose logits are sampled."""

    def __init__(self, seqs: list[ScheduledSequence], block_size: int, k_caches, v_caches, batched: bool):
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
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.pos = torch.tensor(pos, dtype=torch.long)
        self.cu = torch.tensor(cu, dtype=torch.int32)
        self.rows = torch.tensor(rows, dtype=torch.long)
        self.sample_seqs = [s for s in seqs if s.sample]
        self.ctx = BatchedPagedContext(k_caches=k_caches, v_caches=v_caches, block_tables=bt, context_lens=ctx_lens,
                                       slot_mapping=torch.tensor(slots, dtype=torch.long))
        if batched:
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
        if kv_spec.num_kv_heads != self.runner.num_kv_heads:
            raise ValueError(f"kv_spec holds {kv_spec.num_kv_heads} KV heads, the runner attends over "
                             f"{self.runner.num_kv_heads}")
        self.adapters = adapters
        self.kv_spec = kv_spec
        self.num_blocks = num_blocks
        shape = (num_blocks, kv_spec.block_size, kv_spec.num_kv_heads, kv_spec.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=kv_spec.dtype) for _ in range(kv_spec.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=kv_spec.dtype) for _ in range(kv_spec.num_layers)]
        self.batched = attention == "batched"
        # NOTE: one inference graph per template; layers sharing a template share the callable
        self._forwards = {name: _inference_forward(self.runner.programs[name], self.batched)
                          for name in set(compiled.graph.layer_regions)}
        self._layer_forward = [self._forwards[name] for name in compiled.graph.layer_regions]
        self._bound: dict[Optional[str], tuple[int, list[list[Any]], list[list[int]]]] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._has_lora = any(".lora_B." in r.target for name in self._forwards
                             for r in self.runner.programs[name].fw_inputs if r.kind == "param")

    # ------------------------------------------------------------------ weights per adapter
    def _overrides(self, i: int, adapter_id: Optional[str]) -> Optional[dict[str, torch.Tensor]]:
        if not self._has_lora:
            if adapter_id is not None:
                raise ValueError(f"adapter {adapter_id!r} requested but the engine was compiled without LoRA")
            return None
        prog = self.runner.layer_program(i)
        prefix = self.runner._layer_prefix[i]
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

    def _bind(self, adapter_id: Optional[str]) -> tuple[list[list[Any]], list[list[int]]]:
        """Per layer: placeholder values with the adapter's tensors, and the positions of the user inputs."""
        version = self.adapters.get(adapter_id).version if adapter_id is not None and self.adapters else 0
        hit = self._bound.get(adapter_id)
        if hit is not None and hit[0] == version:
            return hit[1], hit[2]
        vals, user_pos = [], []
        for i in range(len(self.runner.layers)):
            prog = self.runner.layer_program(i)
            vals.append(prog.bind(self.runner.layer_modules[i], [None] * _LAYER_USER_INPUTS,
                                  self._overrides(i, adapter_id)))
            pos = [0] * _LAYER_USER_INPUTS
            for j, r in enumerate(prog.fw_inputs):
                if r.kind == "user":
                    pos[r.index] = j
            user_pos.append(pos)
        self._bound[adapter_id] = (version, vals, user_pos)
        return vals, user_pos

    def forget_adapter(self, adapter_id: str) -> None:
        """Drop the bound tensors of an adapter (after it was removed or replaced)."""
        self._bound.pop(adapter_id, None)

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
        groups: dict[Optional[str], list[ScheduledSequence]] = {}
        for s in batch.seqs:
            if s.kind is SeqKind.FINETUNE and (finetune is None or s.req_id not in finetune):
                raise ValueError(f"finetuning sequence {s.req_id}: no finetuning state was given for it")
            groups.setdefault(s.adapter_id, []).append(s)
        hs, sample_seqs = [], []
        for adapter_id, seqs in groups.items():
            fb = _FlatBatch(seqs, self.kv_spec.block_size, self.k_caches, self.v_caches, self.batched)
            if any(s.kind is SeqKind.FINETUNE for s in seqs):
                h = self._run_layers_saving(fb, adapter_id, seqs, finetune)
            else:
                h = self._run_layers(fb, adapter_id)
            if len(fb.rows):
                hs.append(h.index_select(0, fb.rows))
                sample_seqs.extend(fb.sample_seqs)
        tokens: dict[str, int] = {}
        if sample_seqs:
            logits = self.runner.logits(torch.cat(hs) if len(hs) > 1 else hs[0])      # [S, V] fp32
            tokens = dict(zip((s.req_id for s in sample_seqs), self._sample(logits, sample_seqs)))
        return ExecutorOutput(sampled_token_ids=tokens, num_tokens=batch.total_num_scheduled_tokens)

    def _run_layers(self, fb: _FlatBatch, adapter_id: Optional[str]) -> torch.Tensor:
        vals, user_pos = self._bind(adapter_id)
        ctx = fb.ctx
        with paged_context(ctx):
            h, cos, sin = self.runner.embed_forward(fb.ids, fb.pos)
            for i, fwd in enumerate(self._layer_forward):
                ctx.layer = i                       # NOTE: the attention op reads the layer's cache from here
                v = vals[i]
                p = user_pos[i]
                v[p[0]], v[p[1]], v[p[2]], v[p[3]] = h, cos, sin, fb.cu
                (h,) = fwd(*v)
            for v, p in zip(vals, user_pos):          # do not keep the batch's activations alive
                for j in p:
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
                rows[s.req_id] = ((int(fb.cu[j]), int(fb.cu[j + 1])), s.num_computed_tokens)
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
            probs = torch.softmax(row / sp.temperature, dim=-1)
            if sp.top_p < 1.0:
                sp_probs, idx = probs.sort(descending=True)
                keep = sp_probs.cumsum(0) - sp_probs < sp.top_p          # always keeps the top token
                probs = torch.zeros_like(probs).scatter_(0, idx[keep], sp_probs[keep])
            out.append(int(torch.multinomial(probs, 1, generator=gen)))
        return out
