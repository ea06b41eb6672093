"""Tensor-parallel execution on gloo with 2 processes: parity with the single-process run."""
import os
import subprocess
import sys

import pytest

import flexc
from flexc.ir.placements import Shard
from flexc.ir.spec import LoraSpec
from flexc.models import load_model, resolve_model
from flexc.runtime.launch import spawn
from flexc.runtime.protocol import broadcast_object
from flexc.runtime.sharding import load_sharded_model, shard_tensor
from flexc.runtime.tp_runner import TPRegionRunner
from flexc.runtime.regions import RegionRunner
from tests.runtime.utils import save_base_weights
from tests.utils import packed_batch, randomize_lora, rel_err, write_config

TP = 2


def _parity(dims, cm, model, ckpt_dir):
    """On every rank: the sharded graphs with this rank's shards vs RegionRunner on the whole model."""
    cfg = cm.source.config
    batch = None
    if dims.rank == 0:                                           # rank 0 builds the batch, the others receive it
        ids, pos, cu, labels, _ = packed_batch([5, 7, 4], cfg.vocab_size, seed=3)
        batch = {"ids": ids, "pos": pos, "cu": cu, "labels": labels}
    b = broadcast_object(dims, batch)
    if ckpt_dir is None:
        runner = TPRegionRunner(cm, model, dims)                 # shards cut from the model in memory
    else:                                                        # shards read slice by slice from safetensors
        lora = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
        runner = TPRegionRunner(cm, load_sharded_model(cm, ckpt_dir, dims, lora), dims, sharded=True)
    ref = RegionRunner(cm, model)
    logits = runner.forward_logits(b["ids"], b["pos"], b["cu"])
    assert rel_err(logits, ref.forward_logits(b["ids"], b["pos"], b["cu"])) < 1e-5
    got = runner.train_step(b["ids"], b["pos"], b["cu"], b["labels"])
    want = ref.train_step(b["ids"], b["pos"], b["cu"], b["labels"])
    assert rel_err(got.loss_sum, want.loss_sum) < 1e-5
    assert set(got.grads) == set(want.grads) and len(want.grads) == 7 * 2 * cfg.num_hidden_layers
    num_sharded = 0
    for name, g in want.grads.items():
        p = runner.placement(name)
        num_sharded += isinstance(p, Shard)
        local = shard_tensor(g, p, dims.rank, dims.tp)
        assert got.grads[name].shape == local.shape, name
        assert rel_err(got.grads[name], local) < 1e-4, name
    assert num_sharded == 7 * cfg.num_hidden_layers              # one of A/B per adapter is sharded
    # each rank holds only its shard of a column-parallel base weight
    w = runner.layer_params[0].get_parameter("layer.self_attn.q_proj.base_layer.weight")
    assert w.shape[0] == cfg.hidden_size // dims.tp


@pytest.mark.parametrize("arch,passes,from_checkpoint", [("llama", ("parallelize",), True),
                                                         ("qwen2", None, False)])
def test_tp2_matches_single_process(arch, passes, from_checkpoint, tmp_path):
    """Logits and every LoRA gradient (as each rank's shard) at tp=2 equal the single-process run (fp32)."""
    src = resolve_model(write_config(tmp_path, arch))
    # passes=None: the default pipeline, so the sharded graphs are the prune pass's re-partitioned ones
    cm = flexc.compile(src, builtin_passes=passes, seq_len=16, tp=TP, tokens=2048)
    model = load_model(src, LoraSpec(), "fp32", seed=0)
    randomize_lora(model)
    ckpt = save_base_weights(model, tmp_path) if from_checkpoint else None
    spawn(_parity, TP, cm, model, ckpt, start_method="fork", threads=1)   # fork: ranks share cm without pickling


_FORK_AFTER_INDUCTOR = """
from torch._inductor.async_compile import AsyncCompile
from flexc.runtime.launch import spawn

def rank(dims):
    assert AsyncCompile.submit(lambda: 41 + 1).result(timeout=60) == 42     # how Inductor compiles a kernel

assert AsyncCompile.submit(lambda: 1).result() == 1      # the parent compiled: Inductor's compile pool exists
spawn(rank, 1, start_method="fork")
print("ranks done")
"""


def test_forked_rank_compiles_after_the_parent_did():
    """A rank forked from a process that compiled with Inductor gets its kernel compiles done (it inherited
    Inductor's compile thread pool without the threads, and once waited forever on its first kernel)."""
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "2"}       # a pool, as on a machine with 2+ cores
    done = subprocess.run([sys.executable, "-c", _FORK_AFTER_INDUCTOR], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0 and "ranks done" in done.stdout, done.stderr[-2000:]


def test_every_rank_gets_its_shard_in_its_own_storage():
    """A shard is a copy laid out the same on every rank (offset 0, contiguous), even where the slice of the whole
    tensor is already contiguous (rows): a graph compiled on rank 0 is then the same graph on the others, which
    load its kernels from Inductor's cache instead of compiling them again (``TPRegionRunner.compile_turn``)."""
    import torch
    w = torch.arange(24.0).reshape(4, 6)
    for dim in (0, 1):
        shards = [shard_tensor(w, Shard(dim), r, 2) for r in range(2)]
        assert all(s.storage_offset() == 0 and s.is_contiguous() for s in shards)
        assert all(s.untyped_storage().data_ptr() != w.untyped_storage().data_ptr() for s in shards)
        assert [s.stride() for s in shards] == [shards[0].stride()] * 2
        assert torch.equal(torch.cat(shards, dim), w)
