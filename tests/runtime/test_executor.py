"""Executor: one serving-graph call per layer per iteration for every kind of token, batch building, refusals,
multi-LoRA batches against PEFT, and each base projection computed once per iteration (dispatch counter)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flexc
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.adapters import AdapterRegistry
from flexc.runtime.batch import ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.dataset import TrainingSequence
from flexc.runtime.executor import Executor, make_kv_spec
from flexc.runtime.sequence import FinetuneSequence, make_layouts
from tests.runtime.utils import save_tiny_adapter, save_tiny_model
from tests.utils import rel_err, write_config


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("ex"), "llama", num_hidden_layers=2)
    src = resolve_model(path)
    compiled = flexc.compile(src, lora=None, dtype="fp32", builtin_passes=("serve",))
    return Executor(compiled, load_model(src, None, "fp32"), kv_spec=make_kv_spec(compiled, torch.float32, 4),
                    num_blocks=16)


def test_executor_uses_compiled_templates_and_samples_only_marked_rows(executor):
    """Layers run the template the compiler assigned them; only sequences marked sample get a token."""
    names = executor.compiled.graph.layer_regions
    fns = [call.fn for call in executor._layers]
    assert len(fns) == len(names) and len(set(map(id, fns))) == len(set(names))
    seqs = [ScheduledSequence(req_id="a", kind=SeqKind.PREFILL, adapter_id=None, token_ids=[5, 6, 7],
                              num_computed_tokens=0, block_ids=[3], sample=True),
            ScheduledSequence(req_id="b", kind=SeqKind.PREFILL, adapter_id=None, token_ids=[8, 9],
                              num_computed_tokens=0, block_ids=[7], sample=False)]
    out = executor.execute(SchedulerOutput(seqs=seqs, num_scheduled_tokens={"a": 3, "b": 2},
                                           total_num_scheduled_tokens=5))
    assert list(out.sampled_token_ids) == ["a"] and out.num_tokens == 5
    assert executor.k_caches[0][7, :2].abs().sum() > 0                 # b's K/V were written at its slots


def test_executor_refuses_finetune_and_unknown_adapter(executor):
    """Finetuning tokens without their finetuning state, and adapters on a base-only executor, are ValueErrors
    naming the sequence/adapter."""
    seq = ScheduledSequence(req_id="f", kind=SeqKind.FINETUNE, adapter_id=None, token_ids=[1],
                            num_computed_tokens=0, block_ids=[0], sample=False)
    with pytest.raises(ValueError, match="finetuning sequence f: no finetuning state"):
        executor.execute(SchedulerOutput(seqs=[seq], num_scheduled_tokens={"f": 1}, total_num_scheduled_tokens=1))
    seq = ScheduledSequence(req_id="g", kind=SeqKind.PREFILL, adapter_id="x", token_ids=[1],
                            num_computed_tokens=0, block_ids=[0], sample=True)
    with pytest.raises(ValueError, match="adapter 'x'"):
        executor.execute(SchedulerOutput(seqs=[seq], num_scheduled_tokens={"g": 1}, total_num_scheduled_tokens=1))


# ---------------------------------------------------------------- multi-LoRA: one layer call for every adapter
ADAPTERS = {"a": dict(seed=1), "b": dict(seed=2, targets=("q_proj", "v_proj")), "c": dict(seed=3, alpha=16)}


@pytest.fixture(scope="module")
def lora_executor(tmp_path_factory):
    """A 2-layer llama compiled with LoRA on all seven projections, three PEFT adapters on subsets of them (one
    with another alpha), resident in a registry, and an executor over them."""
    root = tmp_path_factory.mktemp("multi")
    d = save_tiny_model(root, "llama", num_hidden_layers=2)
    dirs = {name: save_tiny_adapter(d, str(root / name), **kw) for name, kw in ADAPTERS.items()}
    src = resolve_model(d)
    # NOTE: the spec of tests/runtime/test_policies.py (all seven projections): the Inductor cases of both files
    # compile the same serving graph, so the second loads the first's kernels from Inductor's cache
    spec = LoraSpec(r=4, alpha=8)
    cm = flexc.compile(src, lora=spec, dtype="fp32", seq_len=16)
    model = load_model(src, spec, "fp32")
    reg = AdapterRegistry(spec, model, max_adapters=4)
    for name, path in dirs.items():
        reg.load_peft_dir(name, path)
    ex = Executor(cm, model, kv_spec=make_kv_spec(cm, torch.float32, 4), num_blocks=64, adapters=reg)
    return d, dirs, ex


def _logits(ex, seqs):
    """Execute one batch; the sampled logits by request id (captured where the executor samples)."""
    got = {}
    sample = ex._sample
    ex._sample = lambda logits, ss: got.update(zip((s.req_id for s in ss), logits)) or sample(logits, ss)
    try:
        ex.execute(SchedulerOutput(seqs=seqs, num_scheduled_tokens={s.req_id: len(s.token_ids) for s in seqs},
                                   total_num_scheduled_tokens=sum(len(s.token_ids) for s in seqs)))
    finally:
        del ex._sample
    return got


def _seq(j, adapter, ids, start=0):
    return ScheduledSequence(req_id=f"r{j}", kind=SeqKind.PREFILL if start == 0 else SeqKind.DECODE,
                             adapter_id=adapter, token_ids=ids, num_computed_tokens=start,
                             block_ids=list(range(4 * j, 4 * j + 4)), sample=True)


def _peft_last_logits(model_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter_dir is not None:
        m = PeftModel.from_pretrained(m, adapter_dir).eval()
    with torch.no_grad():
        return m(input_ids=torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.xdist_group("tiny-inductor"))])
def test_mixed_adapters_run_each_layer_once_and_match_peft(lora_executor, backend):
    """Prefills and then decodes of requests for adapters a, b, c and none, interleaved in one batch, run each
    layer's graph ONCE per batch and give PEFT's logits for each request's adapter (1e-5, fp32), with the serving
    graphs run as captured or compiled by Inductor (the same adapters' stacks: one registry serves both)."""
    d, dirs, ex = lora_executor
    if backend == "inductor":
        ex = Executor(ex.compiled, ex.runner.model, kv_spec=ex.kv_spec, num_blocks=ex.num_blocks,
                      adapters=ex.adapters, backend="inductor")
    adapters = ["a", None, "b", "c", None, "a", "c"]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7, 1, 4)]
    calls = []
    forwards = [call.fn for call in ex._layers]
    for i, call in enumerate(ex._layers):
        call.fn = lambda *v, f=call.fn, i=i: calls.append(i) or f(*v)
    try:
        first = _logits(ex, [_seq(j, a, p) for j, (a, p) in enumerate(zip(adapters, prompts))])
        assert calls == [0, 1]
        nxt = {f"r{j}": int(first[f"r{j}"].argmax()) for j in range(len(prompts))}
        second = _logits(ex, [_seq(j, a, [nxt[f"r{j}"]], len(p)) for j, (a, p) in enumerate(zip(adapters, prompts))])
        assert calls == [0, 1, 0, 1]
    finally:
        for call, f in zip(ex._layers, forwards):
            call.fn = f
    for j, (a, p) in enumerate(zip(adapters, prompts)):
        ad = dirs[a] if a is not None else None
        assert rel_err(first[f"r{j}"], _peft_last_logits(d, ad, p)) < 1e-5, (j, a)
        assert rel_err(second[f"r{j}"], _peft_last_logits(d, ad, p + [nxt[f"r{j}"]])) < 1e-5, (j, a)
    assert rel_err(first["r0"], first["r1"]) > 1e-3          # the adapters change the logits (not vacuous)
    assert ex.graph_compiles == (backend == "inductor")      # one compile for the prefills and the decodes


def test_adapter_updates_are_seen_by_the_next_batch(lora_executor):
    """An in-place update of an adapter's tensors (what a finetuning step publishes) and a re-registration under
    the same name both reach the next batch; a removed adapter's tensors no longer alias its slot."""
    d, dirs, ex = lora_executor
    reg = ex.adapters
    p = [7, 8, 9, 10, 11]

    def run():
        return _logits(ex, [_seq(0, "a", p), _seq(1, "c", p)])
    before = run()
    original = {k: v.clone() for k, v in reg.get("a").weights.items()}
    with torch.no_grad():
        for k, w in reg.get("a").weights.items():
            w.copy_(reg.get("c").weights[k])
    now = run()
    assert rel_err(now["r0"], now["r1"]) < 1e-6 and rel_err(now["r0"], before["r0"]) > 1e-3
    version = reg.get("a").version
    reg.load_tensors("a", original)
    assert reg.get("a").version > version
    assert rel_err(run()["r0"], before["r0"]) < 1e-6

    old = reg.get("b")
    reg.remove("b")
    with torch.no_grad():
        for w in old.weights.values():
            w.fill_(float("nan"))                  # e.g. a job still holding the removed adapter's tensors
    reg.load_tensors("b", original)                # reuses the freed slot
    assert reg.get("b").slot == old.slot
    assert rel_err(_logits(ex, [_seq(0, "b", p)])["r0"], before["r0"]) < 1e-6


class _BaseMatmuls(TorchDispatchMode):
    """Counts matmuls whose weight operand is one of the given base weights (by storage)."""

    def __init__(self, weights):
        super().__init__()
        self.ptrs = {w.untyped_storage().data_ptr(): name for name, w in weights.items()}
        self.count: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            w = args[-1]
            name = self.ptrs.get(w.untyped_storage().data_ptr())
            if name is not None:
                self.count[name] = self.count.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_one_iteration_reads_each_base_projection_once(lora_executor):
    """An iteration holding decodes, a prefill chunk and finetuning chunks of two adapters computes every base
    projection of every layer exactly once (a dispatch counter over the forward), and each finetuning sequence
    receives its chunk's rows of every layer's saved values."""
    d, dirs, ex = lora_executor
    reg = ex.adapters
    model = ex.runner.model
    base = {n: p for n, p in model.named_parameters() if "base_layer" in n or (
        "layers." in n and n.endswith("proj.weight") and "lora_" not in n)}
    assert len(base) == 7 * 2
    g = torch.Generator().manual_seed(3)
    toks = lambda n: torch.randint(3, 256, (n,), generator=g).tolist()          # noqa: E731
    # the decodes' context first
    _logits(ex, [_seq(0, "a", toks(6)), _seq(1, None, toks(4))])
    layouts = make_layouts(ex.runner)
    fts = {}
    for j, name in ((5, "a"), (6, "b")):
        seq = TrainingSequence(tuple(toks(10)), tuple(toks(10)))
        fs = FinetuneSequence(seq, layouts, 0.1, f"f{j}", adapter=reg.get(name).weights)
        start, ids, _ = fs.next_chunk(7)
        fts[fs.seq_id] = fs
        fts[fs.seq_id + "/seq"] = ScheduledSequence(req_id=fs.seq_id, kind=SeqKind.FINETUNE, adapter_id=name,
                                                    token_ids=ids, num_computed_tokens=start,
                                                    block_ids=list(range(4 * j, 4 * j + 4)), sample=False)
    seqs = [_seq(0, "a", [5], 6), _seq(1, None, [9], 4), _seq(2, "c", toks(8)),
            fts["f5/seq"], fts["f6/seq"]]
    counter = _BaseMatmuls(base)
    with counter:
        ex.execute(SchedulerOutput(seqs=seqs, num_scheduled_tokens={s.req_id: len(s.token_ids) for s in seqs},
                                   total_num_scheduled_tokens=sum(len(s.token_ids) for s in seqs)),
                   {k: v for k, v in fts.items() if not k.endswith("/seq")})
    assert counter.count == {name: 1 for name in base}
    for sid in ("f5", "f6"):
        assert fts[sid].forward_done_pos == 7 and all(fts[sid].store._written[i] == 7 for i in range(2))


@pytest.mark.xdist_group("tiny-inductor")
def test_latency_profile_of_a_compiled_backend_times_no_compile(lora_executor):
    """The start-up latency profile of an Inductor executor compiles before it times anything: every sample is an
    iteration, none holds the compile (which would price a one-sequence decode at seconds)."""
    from flexc.runtime.kv_cache import KVCacheManager
    from flexc.runtime.profiling import profile_latency
    _, _, ex = lora_executor
    # NOTE: its own compiled model: graphs that another executor in this process compiled are not compiled again
    cm = flexc.compile(ex.compiled.source, lora=ex.compiled.lora, dtype="fp32", seq_len=16)
    ex = Executor(cm, ex.runner.model, kv_spec=ex.kv_spec, num_blocks=512, adapters=ex.adapters, backend="inductor")
    samples = profile_latency(ex, KVCacheManager(512, ex.kv_spec.block_size), 256, 64, repeats=1)
    assert ex.graph_compiles == 1 and ex.compile_seconds > 0
    assert samples and max(seconds for _, seconds in samples) < ex.compile_seconds
