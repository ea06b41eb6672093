"""Multi-LoRA and ragged attention kernels at llama-3.1-8b shapes: Triton vs reference vs the obvious alternative.

LoRA (r=16 on down_proj, 14336 -> 4096, 256 tokens per batch as in the paper):
  triton       flexc::lora's Triton path (one shrink + one expand launch)
  reference    the torch reference (a loop over segments)
  per-adapter  a Python loop over adapters with boolean masks (PEFT's mixed-batch way)
Attention (32/8 heads, head_dim 128):
  triton       the Triton kernels (varlen prefill, paged decode, mixed batch, backward)
  reference    the torch reference (a loop over sequences)
  sdpa-padded  pad the ragged batch (or gather the paged cache), one SDPA call, unpad

Time is the median of several runs; GB/s counts the bytes a perfect kernel must move
(inputs read once, outputs written once), TFLOP/s the useful FLOPs (causal pairs only).
On a CPU only the reference runs, at reduced token counts (the summary says so).
Prints a one-screen summary and writes JSON (--out). Nothing is asserted.

    python benchmarks/kernels.py [--out FILE] [--repeat N]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from flexc.kernels import attention as attn
from flexc.kernels import lora as lora_mod
from flexc.kernels._triton import triton_importable

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, RANK = 4096, 14336, 32, 8, 128, 16
BLOCK_SIZE = 16


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def _triton_version() -> Optional[str]:
    if not triton_importable():
        return None
    import triton
    return triton.__version__


def _timeit(fn: Callable[[], object], dev: torch.device, repeat: int) -> float:
    """Median milliseconds of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _max_err(got: object, want: object) -> Optional[float]:
    if want is None:
        return None
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    return max(float((g.float() - w.float()).abs().max()) for g, w in zip(got, want) if g.numel())


def _measure(case: str, shape: str, methods: dict, nbytes: float, flops: float, dev: torch.device,
             repeat: int) -> list[dict]:
    """Time every method of one case; error is the max |difference| to the reference's output."""
    rows, want = [], None
    if "reference" in methods:
        want = methods["reference"]()
    for name, fn in methods.items():
        ms = _timeit(fn, dev, repeat)
        rows.append({"case": case, "shape": shape, "method": name, "ms": round(ms, 4),
                     "gb_s": round(nbytes / ms / 1e6, 1), "tflop_s": round(flops / ms / 1e9, 3),
                     "max_err_vs_reference": None if name == "reference" else _max_err(fn(), want)})
    return rows


# ----------------------------------------------------------------- LoRA
def _per_adapter_loop(x, base_out, A_stack, B_stack, token_adapters, scaling):
    """The obvious alternative: one masked gather, two matmuls and a scatter per adapter."""
    out = base_out.clone()
    for a in range(A_stack.shape[0]):
        idx = (token_adapters == a).nonzero().squeeze(1)
        if idx.numel():
            delta = (x[idx] @ A_stack[a].T) @ B_stack[a].T
            out.index_add_(0, idx, (delta * scaling[a]).to(out.dtype))
    return out


def bench_lora(dev, dtype, tokens, use_triton, repeat) -> list[dict]:
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for num_adapters in (8, 16, 32):
        A = torch.randn(num_adapters, RANK, INTERMEDIATE, device=dev, dtype=dtype, generator=g) * 0.01
        B = torch.randn(num_adapters, HIDDEN, RANK, device=dev, dtype=dtype, generator=g) * 0.01
        scaling = torch.ones(num_adapters, device=dev)
        x = torch.randn(tokens, INTERMEDIATE, device=dev, dtype=dtype, generator=g)
        base = torch.randn(tokens, HIDDEN, device=dev, dtype=dtype, generator=g)
        layouts = {
            # decode: one token per request, adapters in arrival order (a gather per token)
            "decode": torch.randint(0, num_adapters, (tokens,), device=dev, generator=g),
            # prefill / finetuning chunks: tokens grouped by adapter, ragged segment lengths
            "chunks": torch.sort(torch.randint(0, num_adapters, (tokens,), device=dev, generator=g)).values,
        }
        for layout, token_adapters in layouts.items():
            if layout == "decode":
                seg_starts = torch.arange(tokens + 1, dtype=torch.int32, device=dev)
                seg_adapter = token_adapters.to(torch.int32)
            else:
                seg_starts, seg_adapter = lora_mod.make_segments(token_adapters)
            args = (x, base, A, B, seg_starts, seg_adapter, scaling)
            used = int(token_adapters.unique().numel())
            esz = x.element_size()
            nbytes = esz * (tokens * INTERMEDIATE + 2 * tokens * HIDDEN + used * RANK * (INTERMEDIATE + HIDDEN))
            flops = 2 * tokens * RANK * (INTERMEDIATE + HIDDEN)
            methods = {"reference": lambda: lora_mod.lora_ref(*args)}
            if use_triton:
                methods["triton"] = lambda: lora_mod.lora_triton(*args)
                methods["per-adapter"] = lambda: _per_adapter_loop(x, base, A, B, token_adapters, scaling)
            shape = f"T={tokens} {INTERMEDIATE}->{HIDDEN} r={RANK} adapters={num_adapters}"
            rows += _measure(f"lora fwd {layout}", shape, methods, nbytes, flops, dev, repeat)
    # finetuning backward: one adapter, all tokens
    A, B = A[:1].contiguous(), B[:1].contiguous()
    one = (torch.zeros(1, dtype=torch.int32, device=dev), torch.ones(1, device=dev))
    seg_starts = torch.tensor([0, tokens], dtype=torch.int32, device=dev)
    bargs = (base, x, A, B, seg_starts, one[0], one[1])
    methods = {"reference": lambda: lora_mod.lora_backward_ref(*bargs)}
    if use_triton:
        methods["triton"] = lambda: lora_mod.lora_backward_triton(*bargs)
    esz = x.element_size()
    nbytes = esz * (2 * tokens * INTERMEDIATE + tokens * HIDDEN + 2 * RANK * (INTERMEDIATE + HIDDEN))
    rows += _measure("lora bwd", f"T={tokens} {INTERMEDIATE}->{HIDDEN} r={RANK} adapters=1", methods, nbytes,
                     3 * 2 * tokens * RANK * (INTERMEDIATE + HIDDEN), dev, repeat)
    return rows


# ----------------------------------------------------------------- attention
def _cu(lens, dev):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)


def _pad(t, lens, max_len):
    """[T, H, D] ragged -> [N, H, max_len, D] zero-padded."""
    out = t.new_zeros((len(lens), t.shape[1], max_len, t.shape[2]))
    s = 0
    for i, n in enumerate(lens):
        out[i, :, :n] = t[s:s + n].transpose(0, 1)
        s += n
    return out


def _sdpa_padded_varlen(q, k, v, lens, scale):
    max_len = max(lens)
    o = F.scaled_dot_product_attention(_pad(q, lens, max_len), _pad(k, lens, max_len), _pad(v, lens, max_len),
                                       is_causal=True, scale=scale, enable_gqa=True)
    return torch.cat([o[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)])


def _sdpa_padded_decode(q, k_cache, v_cache, block_tables, totals, scale):
    """Gather each sequence's cache into a padded batch and run one masked SDPA call (one query each)."""
    nb = -(-max(totals) // BLOCK_SIZE)
    blocks = block_tables[:, :nb].clamp(min=0).long()
    kk = k_cache[blocks].flatten(1, 2).transpose(1, 2)                          # [N, Hkv, L, D]
    vv = v_cache[blocks].flatten(1, 2).transpose(1, 2)
    mask = torch.arange(kk.shape[2], device=q.device)[None, :] < totals[:, None]
    o = F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask[:, None, None], scale=scale,
                                       enable_gqa=True)
    return o[:, :, 0]


def _paged_batch(ctx_lens, new_lens, dev, dtype, g):
    totals = [c + n for c, n in zip(ctx_lens, new_lens)]
    nblocks = [-(-t // BLOCK_SIZE) for t in totals]
    pool = torch.randperm(sum(nblocks), device=dev, generator=g).to(torch.int32)   # scattered blocks
    bt = torch.full((len(totals), max(nblocks)), -1, dtype=torch.int32, device=dev)
    p = 0
    for i, n in enumerate(nblocks):
        bt[i, :n] = pool[p:p + n]
        p += n
    cache = lambda: torch.randn(len(pool), BLOCK_SIZE, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype,  # noqa: E731
                                generator=g)
    q = torch.randn(sum(new_lens), HEADS, HEAD_DIM, device=dev, dtype=dtype, generator=g)
    return q, cache(), cache(), bt, torch.tensor(ctx_lens, dtype=torch.int32, device=dev), _cu(new_lens, dev)


def bench_attention(dev, dtype, scale_tokens, use_triton, repeat) -> list[dict]:
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    esz = torch.empty((), dtype=dtype).element_size()
    sm = HEAD_DIM ** -0.5
    # ragged prefill / finetuning sequences (no cache)
    lens = [max(1, int(n * scale_tokens)) for n in torch.randint(64, 2048, (8,), generator=gen).tolist()]
    T = sum(lens)
    q = torch.randn(T, HEADS, HEAD_DIM, device=dev, dtype=dtype, generator=g)
    k, v = (torch.randn(T, KV_HEADS, HEAD_DIM, device=dev, dtype=dtype, generator=g) for _ in range(2))
    cu = _cu(lens, dev)
    pairs = sum(n * (n + 1) // 2 for n in lens)
    io = esz * T * HEAD_DIM * (2 * HEADS + 2 * KV_HEADS)
    methods = {"reference": lambda: attn.varlen_attention_ref(q, k, v, cu, sm)[0]}
    if use_triton:
        methods["triton"] = lambda: attn.varlen_attention_triton(q, k, v, cu, sm)[0]
        methods["sdpa-padded"] = lambda: _sdpa_padded_varlen(q, k, v, lens, sm)
    shape = f"{len(lens)} seqs, T={T}, max {max(lens)}"
    rows += _measure("attn prefill varlen", shape, methods, io, 4 * pairs * HEADS * HEAD_DIM, dev, repeat)
    # backward of the same batch
    out, lse = attn.varlen_attention_ref(q, k, v, cu, sm)
    dout = torch.randn_like(out)
    bwd = (dout, q, k, v, out, lse, cu, None, sm)
    methods = {"reference": lambda: attn.varlen_attention_backward_ref(*bwd)}
    if use_triton:
        methods["triton"] = lambda: attn.varlen_attention_backward_triton(*bwd)
    rows += _measure("attn backward varlen", shape, methods, io * 2, 10 * pairs * HEADS * HEAD_DIM, dev, repeat)
    # decode: one new token per sequence over a scattered paged cache
    ctx_lens = [max(1, int(n * scale_tokens)) for n in torch.randint(128, 4096, (64,), generator=gen).tolist()]
    q, kc, vc, bt, cl, cu = _paged_batch(ctx_lens, [1] * len(ctx_lens), dev, dtype, g)
    totals = cl.long() + 1
    keys = int(totals.sum())
    nbytes = esz * (2 * keys * KV_HEADS * HEAD_DIM + 2 * len(ctx_lens) * HEADS * HEAD_DIM)
    methods = {"reference": lambda: attn.paged_attention_ref(q, kc, vc, bt, cl, cu, sm)[0]}
    if use_triton:
        methods["triton"] = lambda: attn.paged_attention_triton(q, kc, vc, bt, cl, cu, sm)[0]
        methods["sdpa-padded"] = lambda: _sdpa_padded_decode(q, kc, vc, bt, totals, sm)
    rows += _measure("attn decode paged", f"{len(ctx_lens)} seqs, ctx {min(ctx_lens)}..{max(ctx_lens)}", methods,
                     nbytes, 4 * keys * HEADS * HEAD_DIM, dev, repeat)
    # a mixed serving batch: 4 prefill chunks of 256 on cached prefixes + 60 decode tokens, one launch
    chunk = max(1, int(256 * scale_tokens))
    new_lens = [chunk] * 4 + [1] * (len(ctx_lens) - 4)
    q, kc, vc, bt, cl, cu = _paged_batch(ctx_lens, new_lens, dev, dtype, g)
    keys = sum(c + n for c, n in zip(ctx_lens, new_lens))
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in zip(ctx_lens, new_lens))
    nbytes = esz * (2 * keys * KV_HEADS * HEAD_DIM + 2 * sum(new_lens) * HEADS * HEAD_DIM)
    methods = {"reference": lambda: attn.paged_attention_ref(q, kc, vc, bt, cl, cu, sm)[0]}
    if use_triton:
        methods["triton"] = lambda: attn.paged_attention_triton(q, kc, vc, bt, cl, cu, sm)[0]
    shape = f"4 chunks of {chunk} + {len(new_lens) - 4} decode, T={sum(new_lens)}"
    rows += _measure("attn mixed paged", shape, methods, nbytes, 4 * pairs * HEADS * HEAD_DIM, dev, repeat)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<device>.json)")
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per method (default 20 GPU, 3 CPU)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_triton = dev.type == "cuda" and triton_importable()
    repeat = args.repeat or (20 if dev.type == "cuda" else 3)
    # the CPU runs the reference only, at 1/8 of the token counts (the model dimensions stay)
    dtype, tokens, scale_tokens = (torch.bfloat16, 256, 1.0) if dev.type == "cuda" else (torch.float32, 32, 0.125)
    rows = bench_lora(dev, dtype, tokens, use_triton, repeat) + bench_attention(dev, dtype, scale_tokens,
                                                                                use_triton, repeat)
    name, date = _device_name(dev), datetime.date.today().isoformat()
    note = ("Triton, reference and alternatives" if use_triton else
            "CPU: torch reference only, token counts reduced 8x (Triton needs a CUDA GPU)")
    command = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    print(f"flexc kernels, {name}, {date}, {str(dtype).replace('torch.', '')}, llama-3.1-8b shapes; {note}")
    print(f"{'case':<21} {'method':<12} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'vs ref':>7} {'max err':>8}  shape")
    ref_ms = {}
    for r in rows:
        if r["method"] == "reference":
            ref_ms[(r["case"], r["shape"])] = r["ms"]
        speedup = ref_ms.get((r["case"], r["shape"]), r["ms"]) / r["ms"]
        err = "" if r["max_err_vs_reference"] is None else f"{r['max_err_vs_reference']:.1e}"
        print(f"{r['case']:<21} {r['method']:<12} {r['ms']:>9.3f} {r['gb_s']:>8.1f} {r['tflop_s']:>8.2f} "
              f"{speedup:>6.1f}x {err:>8}  {r['shape']}")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels-{slug}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": name, "date": date, "command": command, "dtype": str(dtype), "note": note,
                   "torch": torch.__version__, "triton": _triton_version(), "rows": rows}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
