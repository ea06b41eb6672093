"""Runs one flat batch through the compiled serving graphs with the paged KV cache.

For a :class:`~flexc.runtime.batch.SchedulerOutput` the executor builds ONE flat
batch of every scheduled sequence (decodes, prefill chunks, finetuning chunks;
sorted by adapter slot so that each adapter's tokens form one segment), the
paged-cache arguments (block tables, context lengths, slot of every new token)
and the rows of the finetuning tokens, then runs the embed region, each decoder
layer through its template's serving graph (built by the ``serve`` pass: one
call per layer per iteration, each base projection once for all rows, every
LoRA branch one ``flexc::lora`` over the resident adapters' stacks, paged
attention with the layer's cache as a mutated argument), and the logits region
only for the tokens that sample. The serving graph returns, besides the hidden
states, the values the backward needs for the finetuning rows; each finetuning
sequence receives its rows.

What it reads from the compiled artifact: the serving graphs and their
placeholders' kinds, which template each layer uses, the model shape; it
rewrites no graph. The binding of a layer's weights and adapter stacks is done
once; per iteration only the batch's tensors are filled in.

Backends: ``eager`` runs the graphs as they are; ``inductor`` hands each template's
serving graph to ``torch.compile`` (dynamic in the token count; C++ on the CPU),
compiled at the first batch that uses it.

Invariant (tests/runtime/test_engine.py, test_executor.py): greedy tokens equal
transformers ``generate(do_sample=False)`` (and PEFT's model for each adapter); a
batch mixing adapters and finetuning chunks gives each request PEFT's logits for
its adapter and each finetuning sequence the saved values of its full-sequence
forward.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch
import torch.fx as fx
from torch import nn

from flexc.ir.capture import DynamicallyCompiled, compile_dynamic
from flexc.ir.program import bind_inputs
from flexc.ir.regions import TOKEN_INPUTS
from flexc.ir.spec import KVCacheSpec
from flexc.ir.vocab import InputKind, InputRef
from flexc.kernels.lora_ref import make_segments
from flexc.runtime.batch import ExecutorOutput, ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.regions import RegionRunner

if TYPE_CHECKING:
    from flexc.ir.artifact import CompiledModel
    from flexc.runtime.adapters import AdapterRegistry
    from flexc.runtime.sequence import FinetuneSequence

logger = logging.getLogger(__name__)

__all__ = ["Executor", "make_kv_spec", "BACKENDS", "FlatBatch"]

BACKENDS = ("eager", "inductor")
"""How the serving graphs run: as they are, or compiled by ``torch.compile`` (Inductor)."""
_PER_CALL = (InputKind.USER, InputKind.SEG_STARTS, InputKind.SEG_ADAPTER, InputKind.K_CACHE, InputKind.V_CACHE,
             InputKind.BLOCK_TABLES, InputKind.CONTEXT_LENS, InputKind.SLOT_MAPPING, InputKind.TRAIN_ROWS)
"""Placeholder kinds filled in for every layer call (everything else is bound once)."""


def make_kv_spec(compiled: "CompiledModel", dtype: torch.dtype, block_size: int = 16,
                 num_kv_heads: Optional[int] = None) -> KVCacheSpec:
    """The paged cache shape of a compiled model; ``num_kv_heads``: the heads one rank holds at tp > 1
    (``TPRegionRunner.num_kv_heads``), default all."""
    return KVCacheSpec.of_model(compiled.graph.model, dtype, block_size, num_kv_heads)


class FlatBatch:
    """The tensors of one iteration's sequences, in flat-batch order (sorted by adapter slot).

    ``ids``/``pos`` [T]; ``cu`` int32 [N+1]; paged arguments ``block_tables`` int32 [N, B], ``context_lens``
    int32 [N], ``slot_mapping`` int64 [T]; ``train_rows`` int64 [Tf]: flat-batch rows of the finetuning tokens;
    ``seg_starts``/``seg_adapter``: the adapter segments; ``rows``: rows whose logits are sampled.
    """

    def __init__(self, seqs: list[ScheduledSequence], slots: list[int], block_size: int, device: torch.device):
        ids: list[int] = []
        pos: list[int] = []
        slot_map: list[int] = []
        train: list[int] = []
        cu = [0]
        rows: list[int] = []
        self.finetune: list[tuple[ScheduledSequence, tuple[int, int], tuple[int, int]]] = []
        """Per finetuning sequence: (sequence, its rows in the batch, its rows among ``train_rows``)."""
        for s in seqs:
            n, start = len(s.token_ids), s.num_computed_tokens
            ids.extend(s.token_ids)
            pos.extend(range(start, start + n))
            bids = s.block_ids
            slot_map.extend(bids[p // block_size] * block_size + p % block_size for p in range(start, start + n))
            if s.kind is SeqKind.FINETUNE:
                self.finetune.append((s, (cu[-1], cu[-1] + n), (len(train), len(train) + n)))
                train.extend(range(cu[-1], cu[-1] + n))
            cu.append(cu[-1] + n)
            if s.sample:
                rows.append(cu[-1] - 1)
        width = max(len(s.block_ids) for s in seqs)
        bt = torch.full((len(seqs), width), -1, dtype=torch.int32)
        for i, s in enumerate(seqs):
            bt[i, :len(s.block_ids)] = torch.tensor(s.block_ids, dtype=torch.int32)
        lens = torch.tensor([len(s.token_ids) for s in seqs])
        seg_starts, seg_adapter = make_segments(torch.repeat_interleave(torch.tensor(slots), lens))
        self.ids = torch.tensor(ids, dtype=torch.long, device=device)
        self.pos = torch.tensor(pos, dtype=torch.long, device=device)
        self.cu = torch.tensor(cu, dtype=torch.int32, device=device)
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.sample_seqs = [s for s in seqs if s.sample]
        self.per_call: dict[InputKind, torch.Tensor] = {
            InputKind.BLOCK_TABLES: bt.to(device),
            InputKind.CONTEXT_LENS: torch.tensor([s.num_computed_tokens for s in seqs], dtype=torch.int32,
                                                 device=device),
            InputKind.SLOT_MAPPING: torch.tensor(slot_map, dtype=torch.long, device=device),
            InputKind.TRAIN_ROWS: torch.tensor(train, dtype=torch.long, device=device),
            InputKind.SEG_STARTS: seg_starts.to(device),
            InputKind.SEG_ADAPTER: seg_adapter.to(device),
        }
        """The batch's per-call graph inputs by placeholder kind (the caches are per layer)."""


class _LayerCall:
    """One decoder layer's serving-graph call: the values bound once, and where the per-call ones go."""

    def __init__(self, fn: Callable[..., Any], refs: list[InputRef], values: list[Any],
                 caches: dict[InputKind, torch.Tensor]):
        self.fn, self.refs, self.values = fn, refs, values
        self.caches = caches
        """This layer's K and V cache (what its paged attention writes and reads)."""
        self.fill = [(j, r) for j, r in enumerate(refs) if r.kind in _PER_CALL]

    def __call__(self, user: tuple, per_call: Mapping[InputKind, Any]) -> tuple:
        v = self.values
        for j, r in self.fill:
            v[j] = user[r.index] if r.kind is InputKind.USER else per_call[r.kind]
        try:
            return self.fn(*v)
        finally:
            for j, _ in self.fill:         # NOTE: do not keep the batch's tensors alive between iterations
                v[j] = None


class Executor:
    """Owns the KV cache tensors and runs scheduled batches through the compiled serving graphs.

    ``model`` is the (PEFT-wrapped) model with real weights whose structure the compiled artifact describes;
    ``adapters`` the resident adapters (None: a base-model engine); ``runner`` runs the other regions (default
    a :class:`RegionRunner` of ``model``; on a tensor-parallel rank a ``TPRegionRunner``, whose sharded
    serving graphs attend over the rank's KV heads: ``kv_spec`` must hold those).
    """

    def __init__(self, compiled: "CompiledModel", model: nn.Module, *, kv_spec: KVCacheSpec, num_blocks: int,
                 adapters: Optional["AdapterRegistry"] = None, runner: Optional[RegionRunner] = None,
                 backend: str = "eager"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.compiled = compiled
        self.runner = runner if runner is not None else RegionRunner(compiled, model)
        self.device = next(model.parameters()).device
        """Where the weights, the KV cache and every batch tensor live (the model's device)."""
        if kv_spec.num_kv_heads != self.runner.num_kv_heads:
            raise ValueError(f"kv_spec holds {kv_spec.num_kv_heads} KV heads, the runner attends over "
                             f"{self.runner.num_kv_heads}")
        self.adapters = adapters
        self.kv_spec = kv_spec
        self.num_blocks = num_blocks
        self.backend = backend
        shape = (num_blocks, kv_spec.block_size, kv_spec.num_kv_heads, kv_spec.head_dim)
        self.k_caches = [torch.zeros(shape, dtype=kv_spec.dtype, device=self.device)
                         for _ in range(kv_spec.num_layers)]
        self.v_caches = [torch.zeros(shape, dtype=kv_spec.dtype, device=self.device)
                         for _ in range(kv_spec.num_layers)]
        report = compiled.pass_report("serve")
        graphs = self.runner.serving_graphs()
        self._has_lora = any(report.regions[name].lora_linears for name in graphs)
        fns = {name: self._callable(gm) for name, gm in graphs.items()}
        self._compiled = [fn for fn in fns.values() if isinstance(fn, DynamicallyCompiled)]
        self._layers = [self._bind_layer(i, graphs[name], fns[name])
                        for i, name in enumerate(compiled.graph.layer_regions)]
        self._generators: dict[str, torch.Generator] = {}
        self.compile_seconds = 0.0
        """Seconds spent compiling serving graphs (``inductor``: the first batch, which the engine runs when it is
        built)."""

    @property
    def graph_compiles(self) -> int:
        """How many times this executor compiled its serving graphs (``inductor``: once per layer template, whatever
        the batches; ``eager``: 0; graphs of a compiled model that another executor in this process already
        compiled are reused: 0)."""
        return sum(fn.compiles for fn in self._compiled)

    # ------------------------------------------------------------------ binding
    def _callable(self, gm: fx.GraphModule) -> Callable[..., Any]:
        if self.backend == "eager":
            return gm.forward
        refs = [p.meta["flexc_ref"] for p in gm.graph.find_nodes(op="placeholder")]
        tokens = [j for j, r in enumerate(refs) if r.kind is InputKind.USER and r.index in TOKEN_INPUTS["layer"]]
        before, after = self.runner.compile_turn()
        return compile_dynamic(gm, token_args=tokens if self.runner.unbacked_token_count else (),
                               before_first_call=before, after_first_compile=after)

    def _bind_layer(self, i: int, gm: fx.GraphModule, fn: Callable[..., Any]) -> _LayerCall:
        """Layer i's serving-graph call with its weights, adapter stacks and scalings bound (the stacks never
        move: the registry updates them in place)."""
        refs = [p.meta["flexc_ref"] for p in gm.graph.find_nodes(op="placeholder")]
        prefix = self.runner.layer_prefix(i)
        num_slots = self.adapters.max_adapters if self.adapters is not None else 0
        module = self.runner.layer_modules[i]

        def other(r: InputRef) -> Any:
            if r.kind in (InputKind.LORA_A_STACK, InputKind.LORA_B_STACK):
                return self._stack(module, f"{prefix}.{r.target.removeprefix('layer.')}", r.target)
            if r.kind is InputKind.LORA_SCALING:
                # NOTE: the same for every slot: the registry folds each adapter's own scaling into lora_B
                return torch.full((num_slots,), self.compiled.lora.alpha / self.compiled.lora.r,
                                  dtype=torch.float32, device=self.device)
            if r.kind in _PER_CALL:
                return None                    # filled in for every call
            raise ValueError(f"serving graph placeholder of unknown kind {r.kind!r}")
        return _LayerCall(fn, refs, bind_inputs(refs, module, other),
                          {InputKind.K_CACHE: self.k_caches[i], InputKind.V_CACHE: self.v_caches[i]})

    def _stack(self, module: Any, name: str, target: str) -> torch.Tensor:
        """The stacked adapters of LoRA parameter ``name`` (empty without a registry: no adapter can be asked)."""
        if self.adapters is not None:
            return self.adapters.stack(name)
        p = module.get_parameter(target)
        return p.new_zeros((0, *p.shape))

    def _slot(self, adapter_id: Optional[str]) -> int:
        """Stack index of a sequence's adapter; -1 for none. ValueError naming the adapter if it cannot run."""
        if adapter_id is None:
            return -1
        if not self._has_lora:
            raise ValueError(f"adapter {adapter_id!r} requested but the engine was compiled without LoRA")
        if self.adapters is None:
            raise ValueError(f"adapter {adapter_id!r} requested but this executor has no adapter registry")
        return self.adapters.slot(adapter_id)

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
        for s in batch.seqs:
            if s.kind is SeqKind.FINETUNE and (finetune is None or s.req_id not in finetune):
                raise ValueError(f"finetuning sequence {s.req_id}: no finetuning state was given for it")
        # NOTE: sorted by slot, so each adapter's tokens (inference and finetuning alike) form one segment
        slots = {s.req_id: self._slot(s.adapter_id) for s in batch.seqs}
        seqs = sorted(batch.seqs, key=lambda s: slots[s.req_id])
        fb = FlatBatch(seqs, [slots[s.req_id] for s in seqs], self.kv_spec.block_size, self.device)
        h = self._run_layers(fb, finetune or {})
        tokens: dict[str, int] = {}
        if len(fb.rows):
            logits = self.runner.logits(h.index_select(0, fb.rows))      # [S, V] fp32
            tokens = dict(zip((s.req_id for s in fb.sample_seqs), self._sample(logits, fb.sample_seqs)))
        return ExecutorOutput(sampled_token_ids=tokens, num_tokens=batch.total_num_scheduled_tokens)

    def _run_layers(self, fb: FlatBatch, finetune: Mapping[str, "FinetuneSequence"]) -> torch.Tensor:
        """Every decoder layer once over the whole flat batch; finetuning sequences get their saved rows."""
        h, cos, sin = self.runner.embed_forward(fb.ids, fb.pos)
        first = self.compile_seconds == 0.0 and self.backend == "inductor"
        t0 = time.perf_counter()
        for i, call in enumerate(self._layers):
            h, *saved = call((h, cos, sin, fb.cu), {**fb.per_call, **call.caches})
            if first and i == 0:
                self.compile_seconds = time.perf_counter() - t0
                logger.info("serving graph compiled by inductor in %.1f s", self.compile_seconds)
            for s, _, ft_rows in fb.finetune:
                finetune[s.req_id].record_layer(i, saved, ft_rows, s.num_computed_tokens)
            del saved
        for s, rows, _ in fb.finetune:
            finetune[s.req_id].record_output(h, rows, s.num_computed_tokens)
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
