"""Executor pieces: the batched paged attention path against the op's reference, batch building, refusals."""
import pytest
import torch

import flexc
from flexc.kernels.attention import paged_attention_ref, paged_context, write_kv_ref
from flexc.models import load_model, resolve_model
from flexc.runtime.batch import ScheduledSequence, SchedulerOutput, SeqKind
from flexc.runtime.executor import Executor, make_kv_spec
from flexc.runtime.paged_attention import BatchedPagedContext, make_decode_groups, paged_attention_batched
from tests.utils import write_config


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
