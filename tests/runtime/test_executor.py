"""Executor pieces: the batched paged attention path against the op's reference, batch building, refusals,
multi-LoRA batches against PEFT."""
import pytest
import torch

import flexc
from flexc.kernels.attention import paged_attention_ref, paged_context, write_kv_ref
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.adapters import AdapterRegistry
from flexc.runtime.batch import ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.executor import Executor, make_kv_spec
from flexc.runtime.paged_attention import BatchedPagedContext, make_decode_groups, paged_attention_batched
from tests.runtime.utils import save_tiny_adapter, save_tiny_model
from tests.utils import rel_err, write_config


def _paged_setup(q_lens, ctx_lens, block_size=4, hq=4, hkv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    nb_per = [-(-(c + q) // block_size) for c, q in zip(ctx_lens, q_lens)]
    perm = torch.randperm(sum(nb_per) + 3, generator=g).tolist()        # scattered physical blocks
    tables, i = [], 0
    for n in nb_per:
        tables.append(perm[i:i + n])
        i += n
    width = max(nb_per)
    bt = torch.full((len(q_lens), width), -1, dtype=torch.int32)
    for r, t in enumerate(tables):
        bt[r, :len(t)] = torch.tensor(t, dtype=torch.int32)
    kc = torch.randn(len(perm), block_size, hkv, d, generator=g)
    vc = torch.randn(len(perm), block_size, hkv, d, generator=g)
    T = sum(q_lens)
    q = torch.randn(T, hq, d, generator=g)
    k = torch.randn(T, hkv, d, generator=g)
    v = torch.randn(T, hkv, d, generator=g)
    slots = [tables[s][p // block_size] * block_size + p % block_size
             for s, (c, n) in enumerate(zip(ctx_lens, q_lens)) for p in range(c, c + n)]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, kc, vc, bt, torch.tensor(ctx_lens, dtype=torch.int32), torch.tensor(slots), cu


@pytest.mark.parametrize("window,group_size", [(0, 16), (3, 16), (0, 2)])
def test_batched_paged_attention_matches_reference(window, group_size):
    """paged_attention_batched (decodes batched in length groups, prefills fused or by the reference) equals
    write_kv_ref + paged_attention_ref on a mixed batch over scattered blocks, with and without a sliding window."""
    q_lens, ctx_lens = [1, 5, 1, 1, 3], [6, 0, 13, 2, 4]
    q, k, v, kc, vc, bt, cl, slots, cu = _paged_setup(q_lens, ctx_lens)
    kc2, vc2 = kc.clone(), vc.clone()
    write_kv_ref(k, v, kc2, vc2, slots)
    want, want_lse = paged_attention_ref(q, kc2, vc2, bt, cl, cu, 0.3, window)

    ctx = BatchedPagedContext(k_caches=[kc], v_caches=[vc], block_tables=bt, context_lens=cl, slot_mapping=slots)
    dec = torch.tensor([0, 2, 3])
    ctx.decode_groups = make_decode_groups(cu[:-1].long()[dec], bt[dec], cl[dec], group_size=group_size)
    pre = torch.tensor([1, 4])
    ctx.prefill_idx = torch.cat([torch.arange(1, 6), torch.arange(8, 11)])
    ctx.prefill_block_tables, ctx.prefill_context_lens = bt[pre], cl[pre]
    ctx.prefill_cu_seqlens = torch.tensor([0, 5, 8], dtype=torch.int32)
    with paged_context(ctx):
        out, lse = paged_attention_batched(q, k, v, cu, 0.3, window)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)          # the new K/V were written to the cache


def test_batched_attention_without_context_is_the_op():
    """Outside a serving context the batched path is plain flexc::attention (varlen causal)."""
    q, k, v, *_, cu = _paged_setup([3, 4], [0, 0])
    out, _ = paged_attention_batched(q, k, v, cu, 0.5, 0)
    ref, _ = torch.ops.flexc.attention(q, k, v, cu, 0.5, 0)
    torch.testing.assert_close(out, ref)


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    path = write_config(tmp_path_factory.mktemp("ex"), "llama", num_hidden_layers=2)
    src = resolve_model(path)
    compiled = flexc.compile(src, lora=None, dtype="fp32", builtin_passes=())
    return Executor(compiled, load_model(src, None, "fp32"), kv_spec=make_kv_spec(compiled, torch.float32, 4),
                    num_blocks=16)


def test_executor_uses_compiled_templates_and_samples_only_marked_rows(executor):
    """Layers run the template the compiler assigned them; only sequences marked sample get a token."""
    names = executor.compiled.graph.layer_regions
    assert len(executor._layer_forward) == len(names) and len(set(map(id, executor._layer_forward))) == len(set(names))
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
    """A 2-layer llama, three PEFT adapters (one on a subset of the targets, one with another alpha), resident in
    a registry, and an executor over them."""
    root = tmp_path_factory.mktemp("multi")
    d = save_tiny_model(root, "llama", num_hidden_layers=2)
    dirs = {name: save_tiny_adapter(d, str(root / name), **kw) for name, kw in ADAPTERS.items()}
    src = resolve_model(d)
    spec = LoraSpec(r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
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


def test_mixed_adapters_run_each_layer_once_and_match_peft(lora_executor):
    """Prefills and then decodes of requests for adapters a, b, c and none, interleaved in one batch, run each
    layer's graph ONCE per batch and give PEFT's logits for each request's adapter (1e-5, fp32)."""
    d, dirs, ex = lora_executor
    adapters = ["a", None, "b", "c", None, "a", "c"]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7, 1, 4)]
    calls = []
    forwards = list(ex._layer_forward)
    ex._layer_forward = [lambda *v, f=f, i=i: calls.append(i) or f(*v) for i, f in enumerate(forwards)]
    try:
        first = _logits(ex, [_seq(j, a, p) for j, (a, p) in enumerate(zip(adapters, prompts))])
        assert calls == [0, 1]
        nxt = {f"r{j}": int(first[f"r{j}"].argmax()) for j in range(len(prompts))}
        second = _logits(ex, [_seq(j, a, [nxt[f"r{j}"]], len(p)) for j, (a, p) in enumerate(zip(adapters, prompts))])
        assert calls == [0, 1, 0, 1]
    finally:
        ex._layer_forward = forwards
    for j, (a, p) in enumerate(zip(adapters, prompts)):
        ad = dirs[a] if a is not None else None
        assert rel_err(first[f"r{j}"], _peft_last_logits(d, ad, p)) < 1e-5, (j, a)
        assert rel_err(second[f"r{j}"], _peft_last_logits(d, ad, p + [nxt[f"r{j}"]])) < 1e-5, (j, a)
    assert rel_err(first["r0"], first["r1"]) > 1e-3          # the adapters change the logits (not vacuous)


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
