"""The shared Triton plumbing: tile maps, backend choice, and GPU compilation without a GPU.

The interpreter does not catch what only the compiler rejects (dot shapes, loop-carried
types), so every launch the wrappers make at GPU tile sizes is compiled here for sm_90
(H100) with the ptxas that ships in the triton wheel.
"""
import os
import subprocess
import sys

import pytest
import torch

from flexc.kernels import _triton
from flexc.kernels import attention_triton as attn
from flexc.kernels import lora_triton as lora_mod

requires_triton = pytest.mark.skipif(not _triton.triton_importable(), reason="triton is not importable")


def test_tile_map_covers_every_row_once():
    """make_tile_map gives each segment ceil(len/block) tiles in order; spare programs are marked S."""
    cu = torch.tensor([0, 3, 3, 20, 21], dtype=torch.int32)
    tile_seg, tile_cu, max_tiles = _triton.make_tile_map(cu, 4, 21)
    assert max_tiles == 6 + 4
    assert tile_cu.tolist() == [0, 1, 1, 6, 7]
    assert tile_seg.tolist() == [0, 2, 2, 2, 2, 2, 3, 4, 4, 4]


def test_use_triton_rule(monkeypatch):
    """Auto mode runs Triton only for CUDA tensors; 'torch' never; bad values raise ValueError."""
    monkeypatch.delenv("FLEXC_KERNELS", raising=False)
    assert not _triton.use_triton(torch.zeros(1))
    monkeypatch.setenv("FLEXC_KERNELS", "torch")
    assert not _triton.use_triton(torch.zeros(1))
    if _triton.triton_importable():
        monkeypatch.setenv("FLEXC_KERNELS", "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            _triton.use_triton(torch.zeros(1))


_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
        torch.int64: "*i64"}


def _record_launches(monkeypatch):
    """Make every kernel launch record (kernel body, args, constexprs) instead of running; nothing is jitted."""
    calls = []

    def launch(kernel, grid):
        return lambda *args, **kwargs: calls.append((kernel.body, args, kwargs))

    monkeypatch.setattr(_triton.Kernel, "__getitem__", launch)
    return calls


@requires_triton
def test_every_launch_compiles_for_sm90(monkeypatch):
    """Each kernel variant the wrappers launch at GPU tile sizes (bf16, llama-like heads) compiles for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("the triton wheel ships no ptxas")
    if _triton.interpret_enabled():
        # NOTE: this process's triton was imported in interpreter mode (tests/conftest.py), which cannot compile
        # for a GPU: run this test again in a fresh interpreter with compiled-mode triton
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        node = f"{__file__}::test_every_launch_compiles_for_sm90"
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], env=env,
                              capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                  os.path.abspath(__file__)))))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return
    calls = _record_launches(monkeypatch)
    dt, T, D = torch.bfloat16, 48, 128
    q, k = torch.zeros(T, 8, D, dtype=dt), torch.zeros(T, 2, D, dtype=dt)
    cu = torch.tensor([0, 40, 48], dtype=torch.int32)
    cache, bt, ctx = torch.zeros(8, 16, 2, D, dtype=dt), torch.zeros(2, 4, dtype=torch.int32), cu[:2]
    attn.varlen_attention_triton(q, k, k, cu, 0.1)
    attn.paged_attention_triton(q, cache, cache, bt, ctx, cu, 0.1)
    attn.paged_attention_triton(q[:2], cache, cache, bt, ctx, torch.tensor([0, 1, 2], dtype=torch.int32), 0.1)
    attn.varlen_attention_backward_triton(q, q, k, k, q, torch.zeros(8, T), cu, None, 0.1)
    attn.write_kv_triton(k, k, cache, cache, torch.zeros(T, dtype=torch.int64))
    x, A, B = torch.zeros(T, 256, dtype=dt), torch.zeros(3, 16, 256, dtype=dt), torch.zeros(3, 192, 16, dtype=dt)
    seg_starts, seg_adapter = torch.tensor([0, 8, 48], dtype=torch.int32), torch.tensor([0, -1], dtype=torch.int32)
    lora_mod.lora_triton(x, torch.zeros(T, 192, dtype=dt), A, B, seg_starts, seg_adapter, torch.ones(3))
    lora_mod.lora_backward_triton(torch.zeros(T, 192, dtype=dt), x, A, B, seg_starts, seg_adapter, torch.ones(3))

    seen = set()
    for fn, args, constexprs in calls:
        key = (fn.__name__, tuple(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        kernel = triton.JITFunction(fn)
        signature = {name: _PTR[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float) else "i32"
                     for name, a in zip(kernel.arg_names, args)}
        signature.update({name: "constexpr" for name in constexprs})
        triton.compile(ASTSource(kernel, signature, constexprs=dict(constexprs)), target=GPUTarget("cuda", 90, 32))
    assert {name for name, _ in seen} == {"_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel",
                                          "_write_kv_kernel", "_shrink_kernel", "_expand_kernel", "_seg_outer_kernel"}
