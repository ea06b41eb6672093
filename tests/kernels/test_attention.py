"""The attention ops: the torch references against SDPA and autograd; the fused CPU backend and the Triton
kernels against the references; flexc::paged_attention's cache writes.

Sizes are tiny on purpose: the Triton kernels run in the CPU interpreter here.
"""
import pytest
import torch
import torch.nn.functional as F

from flexc.kernels import attention as attn
from flexc.kernels import attention_cpu as fast
from flexc.kernels import attention_ref as ref
from flexc.kernels import attention_triton as tri
from flexc.kernels._triton import triton_importable

requires_triton = pytest.mark.skipif(not triton_importable(), reason="triton is not importable")

# per-sequence query lengths: empty sequences, a single token, lengths around the 16-row tiles
LENS = [5, 0, 37, 1, 20, 0, 16]
# paged batch: cached tokens before this step and new tokens (prefill chunks, decode tokens, one empty)
CTX_LENS = [0, 9, 3, 12, 5, 30]
NEW_LENS = [6, 1, 0, 1, 9, 1]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.float64: dict(atol=1e-10, rtol=1e-10)}


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _qkv(lens, hq, hkv, d, dtype, device, seed=0):
    """q/k/v as ir/hf.py passes them: transposed views of [H, T, D] (token stride != H*D)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v = (torch.randn(h, T, d, generator=g, dtype=torch.float64).to(dtype).to(device).transpose(0, 1)
               for h in (hq, hkv, hkv))
    return q, k, v


def _plain_sequence(q, k, v, q_pos, k_pos, scale, window):
    """Independent attention of one sequence: SDPA with an explicit mask, lse from logsumexp.

    q: [n, Hq, D], k/v: [m, Hkv, D] -> out [n, Hq, D], lse [Hq, n]
    """
    g = q.shape[1] // k.shape[1]
    mask = k_pos[None, :] <= q_pos[:, None]
    if window > 0:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    qh, kh, vh = (t.transpose(0, 1) for t in (q, k, v))                        # [H, n|m, D]
    out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], attn_mask=mask, scale=scale,
                                         enable_gqa=True)[0].transpose(0, 1)
    scores = (qh @ kh.repeat_interleave(g, 0).transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    return out, lse


def _plain_varlen(q, k, v, lens, scale, window):
    outs, lses, s = [], [], 0
    for n in lens:
        pos = torch.arange(n, device=q.device)
        o, l = _plain_sequence(q[s:s + n], k[s:s + n], v[s:s + n], pos, pos, scale, window)
        outs.append(o)
        lses.append(l)
        s += n
    return torch.cat(outs), torch.cat(lses, 1)


def _paged_batch(hq, hkv, d, dtype, device, block_size=4, seed=0):
    """A paged batch whose block tables are scattered over a shuffled pool (not contiguous).

    Returns the keyword arguments of the paged functions plus the new k/v, slot_mapping and
    each sequence's full (cached + new) keys/values for the independent reference.
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)  # noqa: E731
    totals = [c + n for c, n in zip(CTX_LENS, NEW_LENS)]
    nblocks = [-(-t // block_size) for t in totals]
    pool = torch.randperm(sum(nblocks) + 7, generator=g)                       # 7 spare blocks
    k_cache, v_cache = rnd(len(pool), block_size, hkv, d), rnd(len(pool), block_size, hkv, d)
    block_tables = torch.full((len(totals), max(nblocks) + 2), -1, dtype=torch.int32)
    full_k, full_v, slots, p = [], [], [], 0
    for i, (c, t) in enumerate(zip(CTX_LENS, totals)):
        block_tables[i, :nblocks[i]] = pool[p:p + nblocks[i]].to(torch.int32)
        p += nblocks[i]
        kk, vv = rnd(t, hkv, d), rnd(t, hkv, d)
        seq_slots = [int(block_tables[i, j // block_size]) * block_size + j % block_size for j in range(t)]
        idx = torch.tensor(seq_slots[:c], dtype=torch.int64, device=device)
        k_cache.view(-1, hkv, d)[idx] = kk[:c]                                  # the cached prefix
        v_cache.view(-1, hkv, d)[idx] = vv[:c]
        full_k.append(kk)
        full_v.append(vv)
        slots += seq_slots[c:]
    q = rnd(sum(NEW_LENS), hq, d)
    new_k = torch.cat([kk[c:] for kk, c in zip(full_k, CTX_LENS)])
    new_v = torch.cat([vv[c:] for vv, c in zip(full_v, CTX_LENS)])
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables.to(device),
                context_lens=torch.tensor(CTX_LENS, dtype=torch.int32, device=device),
                cu_seqlens=_cu(NEW_LENS, device)), new_k, new_v, torch.tensor(slots, device=device), full_k, full_v


# ----------------------------------------------------------------- the reference
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)])
def test_varlen_ref_matches_sdpa_per_sequence(hq, hkv, window):
    """The varlen reference equals SDPA run sequence by sequence (and logsumexp of the scores)."""
    q, k, v = _qkv(LENS, hq, hkv, 8, torch.float64, "cpu")
    out, lse = ref.varlen_attention_ref(q, k, v, _cu(LENS, "cpu"), 0.3, window)
    want_out, want_lse = _plain_varlen(q, k, v, LENS, 0.3, window)
    torch.testing.assert_close(out, want_out, **TOL[torch.float64])
    torch.testing.assert_close(lse, want_lse, **TOL[torch.float64])


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)])
def test_varlen_backward_ref_matches_autograd(hq, hkv, window):
    """The reference backward (P recomputed from lse) equals autograd through SDPA, lse gradient included."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv(LENS, hq, hkv, 8, torch.float64, "cpu"))
    want_out, want_lse = _plain_varlen(q, k, v, LENS, 0.3, window)
    dout, dlse = torch.randn_like(want_out), torch.randn_like(want_lse)
    want = torch.autograd.grad((want_out * dout).sum() + (want_lse * dlse).sum(), (q, k, v))
    out, lse = ref.varlen_attention_ref(q, k, v, _cu(LENS, "cpu"), 0.3, window)
    got = ref.varlen_attention_backward_ref(dout, q, k, v, out, lse, _cu(LENS, "cpu"), dlse, 0.3, window)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_attention_op_gradcheck_fp64():
    """torch.autograd.gradcheck passes on flexc::attention (out and lse) in fp64, GQA 2."""
    lens = [3, 0, 4]
    q, k, v = (t.detach().contiguous().requires_grad_() for t in _qkv(lens, 4, 2, 4, torch.float64, "cpu"))
    cu = _cu(lens, "cpu")
    assert torch.autograd.gradcheck(lambda q, k, v: torch.ops.flexc.attention(q, k, v, cu, 0.5, 2), (q, k, v))


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)])
def test_paged_ref_matches_sdpa_over_full_sequences(hq, hkv, window):
    """After write_kv_ref, paged_attention_ref over scattered blocks equals SDPA over each full sequence."""
    kw, new_k, new_v, slots, full_k, full_v = _paged_batch(hq, hkv, 8, torch.float64, "cpu")
    ref.write_kv_ref(new_k, new_v, kw["k_cache"], kw["v_cache"], slots)
    out, lse = ref.paged_attention_ref(**kw, scale=0.3, window=window)
    s = 0
    for c, n, kk, vv in zip(CTX_LENS, NEW_LENS, full_k, full_v):
        o, l = _plain_sequence(kw["q"][s:s + n], kk, vv, torch.arange(c, c + n), torch.arange(c + n), 0.3, window)
        torch.testing.assert_close(out[s:s + n], o, **TOL[torch.float64])
        torch.testing.assert_close(lse[:, s:s + n], l, **TOL[torch.float64])
        s += n


def test_paged_op_writes_the_given_cache_then_attends():
    """flexc::paged_attention writes the new K/V into the cache it is given (and no other), then attends over
    it as the reference does; opcheck accepts its declared mutation of the caches."""
    kw, new_k, new_v, slots, full_k, _ = _paged_batch(2, 2, 8, torch.float32, "cpu")
    other = torch.zeros_like(kw["k_cache"])
    want_k, want_v = kw["k_cache"].clone(), kw["v_cache"].clone()
    ref.write_kv_ref(new_k, new_v, want_k, want_v, slots)
    want_out, want_lse = ref.paged_attention_ref(kw["q"], want_k, want_v, kw["block_tables"], kw["context_lens"],
                                                 kw["cu_seqlens"], 0.3)
    out, lse = torch.ops.flexc.paged_attention(kw["q"], new_k, new_v, kw["k_cache"], kw["v_cache"],
                                               kw["block_tables"], kw["context_lens"], slots, kw["cu_seqlens"],
                                               0.3, 0)
    assert torch.count_nonzero(other) == 0
    torch.testing.assert_close(kw["k_cache"], want_k)
    torch.testing.assert_close(kw["v_cache"], want_v)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    torch.library.opcheck(torch.ops.flexc.paged_attention.default,
                          (kw["q"], new_k, new_v, kw["k_cache"], kw["v_cache"], kw["block_tables"],
                           kw["context_lens"], slots, kw["cu_seqlens"], 0.3, 0))
    schema = torch.ops.flexc.paged_attention.default._schema
    assert [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write] == \
        ["k_cache", "v_cache"]


# ----------------------------------------------------------------- the fused CPU backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)])
def test_varlen_cpu_matches_ref_forward_and_backward(dtype, hq, hkv):
    """The fused CPU varlen attention and its backward equal the references (GQA, empty and 1-token
    sequences), without materialized scores."""
    q, k, v = _qkv(LENS, hq, hkv, 16, dtype, "cpu")
    cu = _cu(LENS, "cpu")
    out, lse = fast.varlen_attention_cpu(q, k, v, cu, 0.3)
    want_out, want_lse = ref.varlen_attention_ref(q, k, v, cu, 0.3)
    tol = TOL[torch.float32] if dtype == torch.float32 else dict(atol=6e-2, rtol=6e-2)   # bf16: 8-bit mantissa
    torch.testing.assert_close(out, want_out, **tol)
    torch.testing.assert_close(lse, want_lse.float(), **tol)
    dout = torch.randn_like(out)
    got = fast.varlen_attention_backward_cpu(dout, q, k, v, out, lse, cu, None, 0.3)
    want = ref.varlen_attention_backward_ref(dout, q, k, v, want_out, want_lse, cu, None, 0.3)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("decodes", [3, 21])
def test_paged_cpu_matches_ref_on_a_serving_batch(decodes):
    """A serving batch of decode tokens (one group, or several length groups), first chunks and later chunks
    over scattered blocks: the CPU backend equals the reference (fp32, GQA)."""
    g = torch.Generator().manual_seed(decodes)
    ctx = [int(x) for x in torch.randint(1, 40, (decodes,), generator=g)] + [0, 0, 11, 5]
    new = [1] * decodes + [7, 1, 9, 3]
    bs, hq, hkv, d = 4, 8, 2, 16
    nblk = [-(-(c + n) // bs) for c, n in zip(ctx, new)]
    pool = torch.randperm(sum(nblk) + 5, generator=g)
    bt = torch.full((len(ctx), max(nblk)), -1, dtype=torch.int32)
    slots, p = [], 0
    for i, (c, n) in enumerate(zip(ctx, new)):
        bt[i, :nblk[i]] = pool[p:p + nblk[i]].to(torch.int32)
        p += nblk[i]
        slots += [int(bt[i, j // bs]) * bs + j % bs for j in range(c, c + n)]
    kc, vc = torch.randn(len(pool), bs, hkv, d, generator=g), torch.randn(len(pool), bs, hkv, d, generator=g)
    T = sum(new)
    q, k, v = torch.randn(T, hq, d, generator=g), torch.randn(T, hkv, d, generator=g), torch.randn(T, hkv, d, generator=g)
    slots = torch.tensor(slots)
    ref.write_kv_ref(k, v, kc, vc, slots)
    args = (bt, torch.tensor(ctx, dtype=torch.int32), _cu(new, "cpu"), 0.3)
    out, lse = fast.paged_attention_cpu(q, k, v, kc, vc, *args)
    want_out, want_lse = ref.paged_attention_ref(q, kc, vc, *args)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, want_lse, **TOL[torch.float32])


def test_opcheck_attention_ops_reference():
    """torch.library.opcheck passes on flexc::attention and flexc::attention_backward with the torch reference."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv([3, 0, 5], 4, 2, 8, torch.float32, "cpu"))
    cu = _cu([3, 0, 5], "cpu")
    torch.library.opcheck(torch.ops.flexc.attention.default, (q, k, v, cu, 0.3, 0))
    out, lse = ref.varlen_attention_ref(q.detach(), k.detach(), v.detach(), cu, 0.3, 0)
    torch.library.opcheck(torch.ops.flexc.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, cu, None, 0.3, 0))


def test_dispatch_picks_the_fused_cpu_path_the_reference_or_triton(monkeypatch):
    """CPU tensors run the fused CPU backend, FLEXC_KERNELS=torch the references, FLEXC_KERNELS=triton Triton."""
    q = torch.zeros(2, 2, 8)
    assert attn.backend_for(q).name == "cpu"
    monkeypatch.setenv("FLEXC_KERNELS", "torch")
    assert attn.backend_for(q).name == "torch"
    if triton_importable():
        monkeypatch.setenv("FLEXC_KERNELS", "triton")
        assert attn.backend_for(q).name == "triton"
        assert attn.backend_for(q.double()).name == "cpu"



# ----------------------------------------------------------------- Triton kernels
@requires_triton
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_triton_matches_ref(dtype, hq, hkv, window, device):
    """The Triton varlen forward equals the reference (out and lse) on a ragged batch with empty sequences."""
    q, k, v = _qkv(LENS, hq, hkv, 16, dtype, device)
    cu = _cu(LENS, device)
    out, lse = tri.varlen_attention_triton(q, k, v, cu, 0.25, window)
    want_out, want_lse = ref.varlen_attention_ref(q, k, v, cu, 0.25, window)
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    torch.testing.assert_close(lse, want_lse, **TOL[torch.float32])


@requires_triton
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_backward_triton_matches_ref(dtype, hq, hkv, window, device):
    """The Triton FlashAttention-2 backward equals the reference backward (dq, dk, dv; lse gradient included)."""
    q, k, v = _qkv(LENS, hq, hkv, 16, dtype, device, seed=1)
    cu = _cu(LENS, device)
    out, lse = ref.varlen_attention_ref(q, k, v, cu, 0.25, window)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    got = tri.varlen_attention_backward_triton(dout, q, k, v, out, lse, cu, dlse, 0.25, window)
    want = ref.varlen_attention_backward_ref(dout, q, k, v, out, lse, cu, dlse, 0.25, window)
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@requires_triton
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_triton_matches_ref(dtype, hq, hkv, window, device):
    """The Triton paged forward (prefill chunks + decode tokens, scattered blocks) equals the reference."""
    kw, new_k, new_v, slots, _, _ = _paged_batch(hq, hkv, 16, dtype, device)
    ref.write_kv_ref(new_k, new_v, kw["k_cache"], kw["v_cache"], slots)
    out, lse = tri.paged_attention_triton(**kw, scale=0.25, window=window)
    want_out, want_lse = ref.paged_attention_ref(**kw, scale=0.25, window=window)
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    torch.testing.assert_close(lse, want_lse, **TOL[torch.float32])


@requires_triton
def test_paged_triton_all_decode_batch(device):
    """A batch of decode tokens only (one query per sequence, small tiles) equals the reference, GQA 4."""
    kw, new_k, new_v, slots, _, _ = _paged_batch(8, 2, 16, torch.float32, device)
    keep = [i for i, n in enumerate(NEW_LENS) if n == 1]
    starts = _cu(NEW_LENS, "cpu").tolist()
    rows = torch.tensor([starts[i] for i in keep], device=device)
    kw.update(q=kw["q"][rows], block_tables=kw["block_tables"][keep], context_lens=kw["context_lens"][keep],
              cu_seqlens=_cu([1] * len(keep), device))
    ref.write_kv_ref(new_k[rows], new_v[rows], kw["k_cache"], kw["v_cache"], slots[rows])
    out, lse = tri.paged_attention_triton(**kw, scale=0.25)
    want_out, want_lse = ref.paged_attention_ref(**kw, scale=0.25)
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, want_lse, **TOL[torch.float32])


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_triton_matches_ref(dtype, device):
    """The Triton KV write puts every new key/value into the same cache slots as the reference."""
    kw, new_k, new_v, slots, _, _ = _paged_batch(2, 2, 16, dtype, device)
    k_ref, v_ref = kw["k_cache"].clone(), kw["v_cache"].clone()
    ref.write_kv_ref(new_k, new_v, k_ref, v_ref, slots)
    tri.write_kv_triton(new_k, new_v, kw["k_cache"], kw["v_cache"], slots)
    assert torch.equal(kw["k_cache"], k_ref) and torch.equal(kw["v_cache"], v_ref)


@requires_triton
def test_op_with_triton_matches_reference_through_autograd(force_triton, device):
    """With Triton forced, flexc::attention and its autograd give the reference's outputs and gradients."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv(LENS, 8, 2, 16, torch.float32, device, seed=2))
    cu = _cu(LENS, device)
    out, lse = torch.ops.flexc.attention(q, k, v, cu, 0.25, 0)
    loss = out.square().sum() + lse.sum()
    got = torch.autograd.grad(loss, (q, k, v))
    want_out, want_lse = ref.varlen_attention_ref(q, k, v, cu, 0.25, 0)
    want = torch.autograd.grad(want_out.square().sum() + want_lse.sum(), (q, k, v))
    torch.testing.assert_close(out, want_out, **TOL[torch.float32])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@requires_triton
def test_opcheck_attention_ops_triton(force_triton, device):
    """torch.library.opcheck passes on flexc::attention when it dispatches to Triton."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv([3, 0, 5], 4, 2, 16, torch.float32, device))
    torch.library.opcheck(torch.ops.flexc.attention.default, (q, k, v, _cu([3, 0, 5], device), 0.3, 0))
